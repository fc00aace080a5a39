"""Training loop: optimizer with a choice of gradient clipping, data-parallel jitted steps,
greedy-decoding evaluation, orbax checkpoints, and the metrics files the plots read.

The loop keeps the device busy: per-step metrics (loss, gradient norm and the clipper's
statistics from ``optax_adaptive_clip.clip_stats``) come back from the jitted step as device
arrays and are copied to the host together every ``log_every`` steps, so there is no
per-step synchronisation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from examples.seq2seq import data as data_lib
from examples.seq2seq.config import CLIP_MODES, Config, applies_to, flag_name
from examples.seq2seq.model import Seq2Seq, masked_cross_entropy

PyTree = Any
MODULE_LABELS = ("encoder", "decoder")
# Flags that may differ between an interrupted run and its resumption: they say how often to
# log, evaluate and save, not what is trained. (--out may not: the resumed run continues the
# logs found there.) --smoke and --compare only choose other fields' values, which are
# compared themselves.
MAY_CHANGE_ON_RESUME = frozenset(
    {
        "resume",
        "stop_at",
        "quiet",
        "log_every",
        "eval_every",
        "checkpoint_every",
        "num_samples",
        "eval_batch_size",
        "checkpoint_dir",
        "smoke",
        "compare",
    }
)


# --- optimizer -------------------------------------------------------------------------------


def _adaptive_clip_library():
    """The library, imported lazily so ``--clip none|global`` runs without it."""
    import optax_adaptive_clip as oac

    return oac


def module_labels(params: dict[str, PyTree]) -> dict[str, PyTree]:
    """Label every parameter with its top-level module name ("encoder" or "decoder")."""
    return {
        name: jax.tree.map(lambda _, name=name: name, subtree) for name, subtree in params.items()
    }


def make_clipper(config: Config) -> optax.GradientTransformation:
    """The gradient transformation ``--clip`` asks for."""
    if config.clip == "none":
        return optax.identity()
    if config.clip == "global":
        return optax.clip_by_global_norm(config.max_norm)
    oac = _adaptive_clip_library()
    if config.clip in ("adaptive", "adaptive-per-module"):
        options = {
            "window": config.window,
            "num_std": config.num_std,
            "min_history": config.min_history,
            "warmup_max_norm": config.warmup_max_norm,
            "record": config.record,
            "nonfinite": config.nonfinite,
        }
        if config.clip == "adaptive":
            return oac.adaptive_clip(**options)
        # One history per module: a spike in the decoder does not raise the encoder's bar.
        per_module = {label: oac.adaptive_clip(**options) for label in MODULE_LABELS}
        return optax.multi_transform(per_module, module_labels)
    if config.clip in ("autoclip", "zclip"):  # at the library's defaults
        return getattr(oac, config.clip)()
    raise ValueError(f"--clip {config.clip!r}: choose from {', '.join(CLIP_MODES)}")


def learning_rate_schedule(config: Config) -> optax.Schedule:
    """Linear warm-up to the peak rate, then cosine decay to 5% of it."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=min(config.warmup_steps, max(config.num_steps - 1, 1)),
        decay_steps=max(config.num_steps, 2),
        end_value=0.05 * config.learning_rate,
    )


def make_optimizer(config: Config) -> optax.GradientTransformation:
    return optax.chain(make_clipper(config), optax.adam(learning_rate_schedule(config)))


def clip_statistics(config: Config, opt_state: PyTree, grad_norm: jax.Array) -> dict:
    """What the clipper did this step, as device scalars (computed inside the jitted step)."""
    if config.clip == "none":
        return {}
    if config.clip == "global":
        return {"threshold": jnp.asarray(config.max_norm), "clipped": grad_norm > config.max_norm}
    return dict(_adaptive_clip_library().clip_stats(opt_state))


# --- jitted steps ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Programs:
    """The compiled functions of a run and the shardings their inputs must have."""

    train_step: Callable
    decode: Callable
    replicated: NamedSharding
    batch_sharded: NamedSharding


def make_programs(
    config: Config, graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, length: int
) -> Programs:
    """Jit the train step and greedy decoding over a 1-D data-parallel mesh of all devices."""
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharded = NamedSharding(mesh, PartitionSpec("data"))

    def train_step(params: PyTree, opt_state: PyTree, batch: dict):
        def loss_fn(params: PyTree) -> jax.Array:
            model = nnx.merge(graphdef, params)
            logits = model(batch["source"], batch["decoder_input"])
            return masked_cross_entropy(logits, batch["target"])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss, "grad_norm": grad_norm}
        metrics.update(clip_statistics(config, opt_state, grad_norm))
        return params, opt_state, metrics

    def decode(params: PyTree, source: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params).greedy_decode(source, length)

    return Programs(
        train_step=jax.jit(
            train_step,
            in_shardings=(replicated, replicated, batch_sharded),
            out_shardings=(replicated, replicated, replicated),
            donate_argnums=(0, 1),
        ),
        decode=jax.jit(
            decode, in_shardings=(replicated, batch_sharded), out_shardings=batch_sharded
        ),
        replicated=replicated,
        batch_sharded=batch_sharded,
    )


# --- evaluation ------------------------------------------------------------------------------


def evaluate(
    programs: Programs,
    params: PyTree,
    dataset: data_lib.Dataset,
    batch_size: int,
    num_samples: int,
) -> tuple[dict[str, float], list[tuple[str, str, str]]]:
    """Token and exact-match accuracy of greedy decoding on the test split, and samples.

    A target token counts as right when the decoder emits it at the same position; EOS is
    a token, so stopping early or late is an error. A sentence is an exact match when every
    token up to and including its EOS is right.
    """
    correct_tokens = total_tokens = exact = sentences = 0
    predictions = []
    for batch in data_lib.eval_batches(dataset.test, batch_size):
        source = jax.device_put(batch["source"], programs.batch_sharded)
        predicted = np.asarray(programs.decode(params, source))[: batch["count"]]
        target = batch["target"][: batch["count"]]
        mask = target != data_lib.PAD
        right = (predicted == target) | ~mask
        correct_tokens += int(np.sum((predicted == target) & mask))
        total_tokens += int(np.sum(mask))
        exact += int(np.sum(np.all(right, axis=1)))
        sentences += batch["count"]
        predictions.extend(predicted[: max(num_samples - len(predictions), 0)])
    samples = [
        (dataset.test.source_text[i], dataset.test.target_text[i], dataset.target_vocab.decode(p))
        for i, p in enumerate(predictions)
    ]
    metrics = {"token_accuracy": correct_tokens / total_tokens, "exact_match": exact / sentences}
    return metrics, samples


# --- checkpoints -----------------------------------------------------------------------------


def make_checkpoint_manager(config: Config):
    """An orbax manager keeping the two newest checkpoints, or ``None`` without a directory."""
    if config.checkpoint_dir is None:
        return None
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    return ocp.CheckpointManager(Path(config.checkpoint_dir).absolute(), options=options)


def save_checkpoint(manager, step: int, state: dict, meta: dict) -> None:
    import orbax.checkpoint as ocp

    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )


def checkpoint_meta(manager) -> dict | None:
    """The meta of the newest checkpoint, if any: step, clip steps and config (a seed in
    checkpoints written before the config was saved).

    Read on its own, so that flags can be checked before the state is restored: a state
    of another structure (another --clip) fails to restore with an orbax tree dump.
    """
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return None
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_checkpoint(manager, step: int, state: dict) -> dict:
    """Checkpoint ``step`` restored onto the shapes and shardings of ``state``."""
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    )
    return restored["state"]


def resume_mismatches(config: Config, meta: dict) -> list[str]:
    """The run-defining flags ``config`` gives other values than the checkpointed run had.

    Flags the run's ``--clip`` mode ignores are not compared. A checkpoint from before the
    config was saved holds only the seed to compare.
    """
    saved = meta.get("config") or {"seed": meta.get("seed", config.seed)}
    now = dataclasses.asdict(config)
    return [
        f"{flag_name(name)} {saved[name]!r} in the checkpoint, {now[name]!r} now"
        for name in sorted((saved.keys() & now.keys()) - MAY_CHANGE_ON_RESUME)
        if saved[name] != now[name] and applies_to(name, [config.clip])
    ]


# --- metrics files -----------------------------------------------------------------------------


def to_json_value(value: Any) -> Any:
    """Plain JSON for a host scalar: ints stay ints, non-finite floats become null."""
    value = np.asarray(value)
    if value.dtype == bool:
        return bool(value)
    if np.issubdtype(value.dtype, np.integer):
        return int(value)
    number = float(value)
    return number if math.isfinite(number) else None


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_jsonl(path: Path, keep: Callable[[dict], bool]) -> list[dict]:
    """Drop rows a resumed run will write again (logged after the checkpoint it resumes).

    Returns the rows kept: the history the resumed run continues from.
    """
    rows = [row for row in read_jsonl(path) if keep(row)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def format_number(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``, or "n/a" for a null metric: a non-finite loss or norm
    (a diverged run), or a number a run could not measure."""
    return "n/a" if value is None else format(value, spec)


def final_loss(losses: list[float | None]) -> float | None:
    """Mean of the last logged losses; None (JSON null) if there are none or one is not finite
    (a non-finite loss is logged as null)."""
    if not losses or any(loss is None for loss in losses):
        return None
    return float(np.mean(losses))


def any_clipped(row: dict) -> bool:
    """Whether any clipper (one, or one per module) clipped at this step."""
    return any(bool(v) for k, v in row.items() if k == "clipped" or k.endswith("/clipped"))


def params_digest(params: PyTree) -> str:
    """SHA-256 of every parameter's bytes, to compare runs for bit-identical results."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(params)):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


# --- the loop ------------------------------------------------------------------------------


def build_model(config: Config, dataset: data_lib.Dataset) -> Seq2Seq:
    """The model ``config`` describes, sized to the dataset's vocabularies."""
    return Seq2Seq(
        len(dataset.source_vocab),
        len(dataset.target_vocab),
        config.embed_dim,
        config.hidden_dim,
        config.attention_dim,
        rngs=nnx.Rngs(config.seed),
        cell=config.cell,
    )


def check_device_count(config: Config) -> int:
    """The number of devices, which must divide the batch: each gets an equal share."""
    device_count = jax.device_count()
    if config.batch_size % device_count:
        raise SystemExit(
            f"--batch-size {config.batch_size} is not divisible by the {device_count} devices"
        )
    return device_count


def train_and_evaluate(config: Config, dataset: data_lib.Dataset, started: float) -> dict:
    """Train as ``config`` says, write the metrics files and return the summary.

    ``started`` is the ``time.perf_counter()`` the wall time is measured from.
    """
    device_count = check_device_count(config)
    eval_batch_size = -(-config.eval_batch_size // device_count) * device_count
    out_dir = Path(config.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    manager = make_checkpoint_manager(config)
    resumed = None  # meta of the checkpoint this run resumes from
    if manager is not None and config.resume:
        resumed = checkpoint_meta(manager)
        logged = out_dir / "metrics.jsonl"
        if resumed is None and logged.exists() and logged.stat().st_size:
            # Starting over would overwrite the logs of the run that was meant to go on
            # (a mistyped --checkpoint-dir, say).
            manager.close()
            raise SystemExit(
                f"--resume: no checkpoint in {config.checkpoint_dir}, but {out_dir} holds a "
                "run's logs; give that run's --checkpoint-dir, or another --out to start anew."
            )
        if resumed is None:
            tqdm.write(f"no checkpoint in {config.checkpoint_dir}: starting from step 0")
        elif mismatches := resume_mismatches(config, resumed):
            manager.close()
            raise SystemExit(
                f"--resume: the checkpoint in {config.checkpoint_dir} was made with other "
                "flags:\n  " + "\n  ".join(mismatches) + "\nGive the checkpointed run's "
                "values, or start a new run in another --checkpoint-dir."
            )

    def new_model() -> Seq2Seq:
        return build_model(config, dataset)

    # Initialise inside one jitted function: run eagerly, every initializer of every layer
    # would be compiled on its own, which takes longer than compiling the train step.
    graphdef, _ = nnx.split(nnx.eval_shape(new_model), nnx.Param)
    optimizer = make_optimizer(config)
    programs = make_programs(config, graphdef, optimizer, dataset.max_target_length)

    @jax.jit
    def initial_state() -> tuple[PyTree, PyTree]:
        params = nnx.to_pure_dict(nnx.state(new_model(), nnx.Param))
        return params, optimizer.init(params)

    params, opt_state = jax.device_put(initial_state(), programs.replicated)
    # The whole schedule at once: one small computation instead of one per log window.
    learning_rates = np.asarray(learning_rate_schedule(config)(np.arange(config.num_steps)))

    metrics_path, eval_path = out_dir / "metrics.jsonl", out_dir / "eval.jsonl"
    start_step, clip_steps = 0, 0
    kept_rows: list[dict] = []  # metrics rows of the steps before a resumed checkpoint
    eval_metrics: dict[str, float] = {}
    eval_step = None  # the step eval_metrics were measured at
    end_step = config.num_steps if config.stop_at is None else min(config.stop_at, config.num_steps)

    def is_eval_step(completed: int) -> bool:
        return completed % config.eval_every == 0 or completed == config.num_steps

    if resumed is not None:
        state = {"params": params, "opt_state": opt_state}
        state = restore_checkpoint(manager, int(resumed["step"]), state)
        params, opt_state = state["params"], state["opt_state"]
        start_step, clip_steps = int(resumed["step"]), int(resumed["clip_steps"])
        kept_rows = truncate_jsonl(metrics_path, lambda row: row["step"] < start_step)
        # An evaluation made only because a run stopped at this step (--stop-at between two
        # evaluations) goes, unless this run ends there too: eval.jsonl then ends as an
        # unbroken run's does.
        keep_last_eval = is_eval_step(start_step) or start_step >= end_step
        kept_evals = truncate_jsonl(
            eval_path,
            lambda row: row["step"] < start_step or (row["step"] == start_step and keep_last_eval),
        )
        if kept_evals:  # a run resumed at its end evaluates nothing new: report the last one
            eval_metrics = dict(kept_evals[-1])
            eval_step = eval_metrics.pop("step")
        tqdm.write(f"resumed from step {start_step} of {config.checkpoint_dir}")
    else:
        metrics_path.write_text("")
        eval_path.write_text("")

    pending: list[tuple[int, dict]] = []  # (step, device metrics) not yet copied to the host
    # Continue the final-loss window and clip statistics from the rows already logged, so a
    # resumed run (even one resumed at its end, which runs no step) reports what an unbroken
    # run would.
    last_row: dict = kept_rows[-1] if kept_rows else {}
    recent_losses: list[float | None] = [row["loss"] for row in kept_rows[-config.log_every :]]
    timed_steps, timed_seconds, eval_seconds = 0, 0.0, 0.0
    window_start, first_window = time.perf_counter(), True
    progress = tqdm(
        total=config.num_steps, initial=start_step, disable=config.quiet, desc=config.clip
    )

    def flush() -> None:
        """Copy pending metrics to the host, append them to metrics.jsonl, time the window."""
        nonlocal pending, last_row, clip_steps, timed_steps, timed_seconds, first_window
        nonlocal window_start
        if not pending:
            return
        host = jax.device_get([metrics for _, metrics in pending])
        now = time.perf_counter()
        if not first_window:  # the first window includes compilation
            timed_steps += len(pending)
            timed_seconds += now - window_start
        first_window = False
        with metrics_path.open("a") as sink:
            for (step, _), values in zip(pending, host, strict=True):
                row = {"step": step, "lr": float(learning_rates[step])}
                row.update({name: to_json_value(value) for name, value in values.items()})
                clip_steps += any_clipped(row)
                row["clip_steps"] = clip_steps
                sink.write(json.dumps(row) + "\n")
                recent_losses.append(row["loss"])
        del recent_losses[: -config.log_every]
        last_row = row
        progress.update(len(pending))
        progress.set_postfix(
            loss=format_number(row["loss"], ".3f"),
            gnorm=format_number(row["grad_norm"], ".2f"),
            clips=clip_steps,
        )
        pending = []
        window_start = time.perf_counter()

    def run_eval(completed: int) -> None:
        nonlocal eval_metrics, eval_step, eval_seconds, window_start
        began = time.perf_counter()
        eval_metrics, samples = evaluate(
            programs, params, dataset, eval_batch_size, config.num_samples
        )
        eval_step = completed
        with eval_path.open("a") as sink:
            sink.write(json.dumps({"step": completed, **eval_metrics}) + "\n")
        tqdm.write(
            f"step {completed}: token accuracy {eval_metrics['token_accuracy']:.4f}, "
            f"exact match {eval_metrics['exact_match']:.4f}"
        )
        for source, reference, prediction in samples:
            mark = "ok " if prediction == reference else "BAD"
            tqdm.write(f"  {mark} {source!r} -> {prediction!r} (want {reference!r})")
        eval_seconds += time.perf_counter() - began
        window_start = time.perf_counter()

    for step in range(start_step, end_step):
        batch = data_lib.train_batch(dataset.train, step, config.batch_size, config.seed)
        batch = jax.device_put(batch, programs.batch_sharded)
        params, opt_state, step_metrics = programs.train_step(params, opt_state, batch)
        pending.append((step, step_metrics))
        completed = step + 1
        is_last = completed == end_step
        do_eval = is_eval_step(completed)
        do_save = manager is not None and (completed % config.checkpoint_every == 0 or is_last)
        if is_last or do_eval or do_save or len(pending) >= config.log_every:
            flush()
        if do_eval:
            run_eval(completed)
        if do_save:
            # The config is what --resume checks its flags against.
            meta = {
                "step": completed,
                "clip_steps": clip_steps,
                "config": dataclasses.asdict(config),
            }
            save_checkpoint(manager, completed, {"params": params, "opt_state": opt_state}, meta)
            window_start = time.perf_counter()  # saving is not step time
    progress.close()
    if manager is not None:
        manager.wait_until_finished()
        manager.close()

    completed = max(end_step, start_step)
    # The reported accuracy must be that of the final parameters: evaluate again unless the
    # last evaluation was at this step (in the loop, or kept from the run resumed at its end).
    if eval_step != completed:  # e.g. --stop-at between two evaluations
        run_eval(completed)
    wall_time = time.perf_counter() - started
    library_stats = {
        k: v for k, v in last_row.items() if k not in ("step", "lr", "loss", "grad_norm")
    }
    summary = {
        "clip": config.clip,
        "steps": completed,
        "final_loss": final_loss(recent_losses),
        **{f"final_{name}": value for name, value in eval_metrics.items()},
        "clip_steps": clip_steps,
        "clip_fraction": clip_steps / completed if completed else 0.0,
        "last_clip_stats": library_stats,
        "step_time_ms": 1e3 * timed_seconds / timed_steps if timed_steps else None,
        "steps_per_sec": timed_steps / timed_seconds if timed_seconds else None,
        "eval_time_s": eval_seconds,
        "wall_time_s": wall_time,
        "devices": device_count,
        "params_sha256": params_digest(params),
        "data": dataset.info,
        "config": dataclasses.asdict(config),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
