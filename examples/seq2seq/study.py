"""Stability study: what gradient clipping buys when the seq2seq example's gradients spike.

One command trains the number-word translator (English -> French) under stress conditions
that make gradients spike, with every clipper, on the same seeds and data, and writes a
markdown table, per-run records and figures to ``--out``::

    python examples/seq2seq/study.py --out runs/seq2seq_study           # full study
    python examples/seq2seq/study.py --quick --out /tmp/seq2seq_quick   # 2 seeds, short runs

Stress conditions (``--conditions``; levels set by the flags named in brackets):

* ``baseline``: no stress.
* ``high-lr``: peak learning rate ``--high-lr-scale`` times the study's stable one.
* ``spikes``: on a random ``--spike-prob`` fraction of steps the loss is multiplied by
  ``--spike-scale`` (a corrupted loss scale: the gradient is that much larger, same
  direction).
* ``noisy``: on a random ``--noise-prob`` fraction of steps every target token of the batch
  is replaced by a random word (corrupted labels).
* ``rnn-spikes``: ``spikes`` with a vanilla tanh RNN cell in place of the GRU.

Clippers (``--clippers``): ``none``, ``global-C`` (``optax.clip_by_global_norm(C)``, any
``C``), ``adaptive``, ``autoclip``, ``zclip`` (the library's defaults). Each is chained in
front of Adam, whose learning rate follows the example's schedule (linear warm-up, cosine
decay to 5 %).

Speed: every seed of a cell trains at once (``jax.vmap`` over seeds of a ``lax.scan`` over
``--eval-every`` steps), and a program is compiled once per clipper and cell type: the
seeds, the stress levels and the step number are array inputs, so all conditions reuse it.
The batch of step ``s`` for seed ``k`` (indices drawn with replacement) and whether that step
is corrupted are pure functions of ``(k, s)``, so every clipper sees the same data and the
same corrupted steps.

A run *diverged* when its loss became non-finite at any step or its final loss (median of
the uncorrupted steps in the last 10 % of training) is not below its loss at step 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `examples.seq2seq` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from examples.seq2seq import data as data_lib
from examples.seq2seq import plots
from examples.seq2seq.config import Config, positive_float, positive_int, probability
from examples.seq2seq.model import Seq2Seq, masked_cross_entropy

PyTree = Any
DEFAULT_CLIPPERS = (
    "none",
    "global-0.1",
    "global-1",
    "global-10",
    "adaptive",
    "autoclip",
    "zclip",
    # Not a default: adaptive_clip with two settings changed, to show why the default fails.
    "adaptive:record=clipped:min_history=4",
)
DEFAULT_CONDITIONS = ("baseline", "spikes", "high-lr", "noisy", "rnn-spikes")


# --- configuration ---------------------------------------------------------------------------


def study_model_config(quick: bool) -> Config:
    """The example's Config, shrunk so that the whole study fits in 30 minutes on 2 cores."""
    fields: dict[str, object] = {
        "number_max": 99_999,
        "train_size": 10_000,
        "test_size": 500,
        "embed_dim": 32,
        "hidden_dim": 64,
        "attention_dim": 64,
        "batch_size": 32,
        "num_steps": 240,
        "warmup_steps": 24,
        "learning_rate": 1e-2,
        "eval_every": 40,
    }
    if quick:
        fields.update(
            train_size=2_000,
            test_size=200,
            embed_dim=16,
            hidden_dim=32,
            attention_dim=32,
            batch_size=32,
            num_steps=60,
            warmup_steps=10,
            eval_every=30,
        )
    return dataclasses.replace(Config(), **fields)


@dataclasses.dataclass(frozen=True)
class Condition:
    """A stress condition: how the study's training is perturbed."""

    name: str
    lr_scale: float = 1.0
    spike_prob: float = 0.0
    spike_scale: float = 1.0
    noise_prob: float = 0.0
    cell: str = "gru"

    def describe(self) -> str:
        parts = [f"cell {self.cell}"]
        if self.lr_scale != 1.0:
            parts.append(f"lr x{self.lr_scale:g}")
        if self.spike_prob:
            parts.append(f"loss x{self.spike_scale:g} on {100 * self.spike_prob:g}% of steps")
        if self.noise_prob:
            parts.append(f"random targets on {100 * self.noise_prob:g}% of steps")
        return ", ".join(parts)


def make_conditions(args: argparse.Namespace) -> list[Condition]:
    spikes = {"spike_prob": args.spike_prob, "spike_scale": args.spike_scale}
    known = {
        "baseline": Condition("baseline"),
        "high-lr": Condition("high-lr", lr_scale=args.high_lr_scale),
        "spikes": Condition("spikes", **spikes),
        "noisy": Condition("noisy", noise_prob=args.noise_prob),
        "rnn-spikes": Condition("rnn-spikes", cell="rnn", **spikes),
        "rnn": Condition("rnn", cell="rnn"),
        "rnn-high-lr": Condition("rnn-high-lr", lr_scale=args.high_lr_scale, cell="rnn"),
    }
    names = [name for name in args.conditions.split(",") if name]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"unknown condition(s) {unknown}; choose from {sorted(known)}")
    return [known[name] for name in names]


def _option_value(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(text.lower(), text)


def make_clip(name: str) -> optax.GradientTransformation:
    """The gradient transformation a clipper name stands for.

    ``none``; ``global-C`` (``optax.clip_by_global_norm(C)``); ``adaptive``, ``autoclip``,
    ``zclip`` at the library's defaults, or with options after colons, e.g.
    ``adaptive:record=clipped:min_history=4``.
    """
    import optax_adaptive_clip as oac

    if name == "none":
        return optax.identity()
    if name.startswith("global-"):
        try:
            max_norm = positive_float(name.removeprefix("global-"))
        except argparse.ArgumentTypeError as error:
            raise SystemExit(f"clipper {name!r}: C {error}") from None
        return optax.clip_by_global_norm(max_norm)
    base, *settings = name.split(":")
    factories = {"adaptive": oac.adaptive_clip, "autoclip": oac.autoclip, "zclip": oac.zclip}
    if base not in factories or not all("=" in setting for setting in settings):
        raise SystemExit(
            f"unknown clipper {name!r}: none, global-C, or adaptive, autoclip, zclip "
            "optionally followed by :option=value"
        )
    options = {key: _option_value(value) for key, value in (x.split("=", 1) for x in settings)}
    try:
        return factories[base](**options)
    except (TypeError, ValueError) as error:  # an unknown option, or a value out of range
        raise SystemExit(f"clipper {name!r}: {error}") from None


# --- programs --------------------------------------------------------------------------------


@dataclasses.dataclass
class Programs:
    """Compiled functions of one cell type for every clipper at once, shared by conditions.

    The trained models are stacked along a leading axis of ``len(clippers) * len(seeds)``
    rows, clipper-major: the forward and backward pass is one ``vmap`` over all rows (one
    copy of the model in the compiled program), then each clipper's slice of the gradients
    goes through that clipper and Adam.
    """

    init: Callable  # seeds -> (params, opt_states)
    chunk: Callable  # (params, opt_states, seeds, stress, start) -> (params, opt_states, metrics)
    evaluate: Callable  # params -> (token accuracy, exact match), one per row


def _clip_report(name: str, opt_state: PyTree, grad_norm: jax.Array):
    """Threshold applied and whether the gradient was clipped, for one seed."""
    if name == "none":
        return jnp.asarray(jnp.inf, jnp.float32), jnp.asarray(False)
    if name.startswith("global-"):
        threshold = jnp.asarray(float(name.removeprefix("global-")), jnp.float32)
        return threshold, grad_norm > threshold
    import optax_adaptive_clip as oac

    stats = oac.clip_stats(opt_state)
    return stats["threshold"].astype(jnp.float32), stats["clipped"]


def build_programs(
    config: Config, dataset: data_lib.Dataset, clippers: Sequence[str], cell: str, num_seeds: int
) -> Programs:
    source_vocab, target_vocab = len(dataset.source_vocab), len(dataset.target_vocab)
    length = dataset.max_target_length
    train_source = jnp.asarray(dataset.train.source)
    train_target = jnp.asarray(dataset.train.target)
    test_source = jnp.asarray(dataset.test.source)
    test_target = jnp.asarray(dataset.test.target)
    chunk_steps, batch_size = config.eval_every, config.batch_size
    txs = [optax.chain(make_clip(name), optax.scale_by_adam()) for name in clippers]
    num_clippers = len(clippers)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=1.0,
        warmup_steps=config.warmup_steps,
        decay_steps=config.num_steps,
        end_value=0.05,
    )

    def new_model(key: jax.Array) -> Seq2Seq:
        dims = (config.embed_dim, config.hidden_dim, config.attention_dim)
        return Seq2Seq(source_vocab, target_vocab, *dims, rngs=nnx.Rngs(key), cell=cell)

    graphdef, _ = nnx.split(nnx.eval_shape(lambda: new_model(jax.random.key(0))), nnx.Param)

    def keys(seed: jax.Array) -> tuple[jax.Array, jax.Array]:
        init_key, data_key = jax.random.split(jax.random.key(seed))
        return init_key, data_key

    def init_params(seed: jax.Array) -> PyTree:
        return nnx.to_pure_dict(nnx.state(new_model(keys(seed)[0]), nnx.Param))

    def init(seeds: jax.Array):
        params = jax.vmap(init_params)(seeds)
        opt_states = [jax.vmap(tx.init)(params) for tx in txs]
        stacked = jax.tree.map(lambda x: jnp.concatenate([x] * num_clippers), params)
        return stacked, opt_states

    def batch_for(seed: jax.Array, step: jax.Array, stress: dict) -> tuple[dict, dict]:
        key = jax.random.fold_in(keys(seed)[1], step)
        index_key, spike_key, noise_key, token_key = jax.random.split(key, 4)
        indices = jax.random.randint(index_key, (batch_size,), 0, train_source.shape[0])
        source, target = train_source[indices], train_target[indices]
        spiked = jax.random.uniform(spike_key) < stress["spike_prob"]
        noisy = jax.random.uniform(noise_key) < stress["noise_prob"]
        random_words = jax.random.randint(token_key, target.shape, data_lib.UNK + 1, target_vocab)
        target = jnp.where(noisy & (target != data_lib.PAD), random_words, target)
        bos = jnp.full((batch_size, 1), data_lib.BOS, target.dtype)
        batch = {
            "source": source,
            "decoder_input": jnp.concatenate([bos, target[:, :-1]], axis=1),
            "target": target,
        }
        return batch, {"spiked": spiked, "noisy": noisy}

    def gradient(params: PyTree, seed: jax.Array, step: jax.Array, stress: dict):
        batch, flags = batch_for(seed, step, stress)
        factor = jnp.where(flags["spiked"], stress["spike_scale"], 1.0)

        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(batch["source"], batch["decoder_input"])
            loss = masked_cross_entropy(logits, batch["target"])
            return loss * factor, loss

        (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, grads, flags

    def chunk(params, opt_states, seeds, stress, start):
        row_seeds = jnp.tile(seeds, num_clippers)

        def step_fn(carry, step):
            params, opt_states = carry
            loss, grads, flags = jax.vmap(gradient, in_axes=(0, 0, None, None))(
                params, row_seeds, step, stress
            )
            grad_norm = jax.vmap(optax.tree.norm)(grads)
            updates, new_states, thresholds, clipped = [], [], [], []
            for index, (name, tx) in enumerate(zip(clippers, txs, strict=True)):
                rows = slice(index * num_seeds, (index + 1) * num_seeds)
                part = jax.tree.map(lambda x, rows=rows: x[rows], (grads, params))
                update, state = jax.vmap(tx.update)(part[0], opt_states[index], part[1])
                threshold, was_clipped = jax.vmap(lambda s, g, name=name: _clip_report(name, s, g))(
                    state, grad_norm[rows]
                )
                updates.append(update)
                new_states.append(state)
                thresholds.append(threshold)
                clipped.append(was_clipped)
            updates = jax.tree.map(lambda *xs: jnp.concatenate(xs), *updates)
            lr = stress["learning_rate"] * schedule(step)
            params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
            metrics = {
                "loss": loss,
                "grad_norm": grad_norm,
                "threshold": jnp.concatenate(thresholds),
                "clipped": jnp.concatenate(clipped),
                **flags,
            }
            return (params, new_states), metrics

        steps = start + jnp.arange(chunk_steps)
        (params, opt_states), metrics = jax.lax.scan(step_fn, (params, opt_states), steps)
        return params, opt_states, jax.tree.map(lambda x: x.T, metrics)  # (rows, steps)

    def evaluate_one(params):
        predicted = nnx.merge(graphdef, params).greedy_decode(test_source, length)
        mask = test_target != data_lib.PAD
        right = (predicted == test_target) | ~mask
        token = jnp.sum((predicted == test_target) & mask) / jnp.sum(mask)
        return token, jnp.mean(jnp.all(right, axis=1))

    return Programs(
        init=jax.jit(init),
        chunk=jax.jit(chunk, donate_argnums=(0, 1)),
        evaluate=jax.jit(jax.vmap(evaluate_one)),
    )


# --- one condition: every clipper, every seed ------------------------------------------------


def train_condition(
    programs: Programs,
    config: Config,
    condition: Condition,
    clippers: Sequence[str],
    seeds: Sequence[int],
) -> dict[str, dict[str, np.ndarray]]:
    """Per clipper: per-step metrics ``(seeds, steps)`` and evaluations ``(seeds, evals)``."""
    seed_array = jnp.asarray(seeds, dtype=jnp.uint32)
    stress = {
        "learning_rate": jnp.float32(config.learning_rate * condition.lr_scale),
        "spike_prob": jnp.float32(condition.spike_prob),
        "spike_scale": jnp.float32(condition.spike_scale),
        "noise_prob": jnp.float32(condition.noise_prob),
    }
    params, opt_states = programs.init(seed_array)
    chunks, evals = [], []
    for start in range(0, config.num_steps, config.eval_every):
        params, opt_states, metrics = programs.chunk(
            params, opt_states, seed_array, stress, jnp.int32(start)
        )
        chunks.append(metrics)
        evals.append(jax.block_until_ready(programs.evaluate(params)))
    host_chunks, host_evals = jax.device_get((chunks, evals))
    rows = {
        name: np.concatenate([chunk[name] for chunk in host_chunks], axis=1)
        for name in host_chunks[0]
    }
    rows["eval_token_accuracy"] = np.stack([token for token, _ in host_evals], axis=1)
    rows["eval_exact_match"] = np.stack([exact for _, exact in host_evals], axis=1)
    count = len(seeds)
    return {
        name: {key: values[i * count : (i + 1) * count] for key, values in rows.items()}
        for i, name in enumerate(clippers)
    }


def summarize_run(curves: dict[str, np.ndarray], index: int, config: Config, target: float):
    """The record of one run (one seed) of a cell."""
    loss = curves["loss"][index].astype(np.float64)
    corrupted = curves["spiked"][index] | curves["noisy"][index]
    tail = slice(int(0.9 * loss.size), None)
    clean_tail = loss[tail][~corrupted[tail]]
    final_loss = float(np.median(clean_tail)) if clean_tail.size else float(np.median(loss[tail]))
    nonfinite = not np.all(np.isfinite(loss))
    diverged = nonfinite or not final_loss < float(loss[0])
    exact = curves["eval_exact_match"][index]
    eval_steps = config.eval_every * (1 + np.arange(exact.size))
    reached = np.nonzero(exact >= target)[0]
    return {
        "diverged": bool(diverged),
        "nonfinite": bool(nonfinite),
        "initial_loss": float(loss[0]),
        "final_loss": final_loss if math.isfinite(final_loss) else None,
        "exact_match": float(exact[-1]),
        "token_accuracy": float(curves["eval_token_accuracy"][index][-1]),
        "steps_to_target": int(eval_steps[reached[0]]) if reached.size else None,
        "clip_fraction": float(np.mean(curves["clipped"][index])),
        "corrupted_steps": int(np.sum(corrupted)),
        "max_grad_norm": float(np.nanmax(curves["grad_norm"][index])),
    }


# --- finished conditions, kept for --resume --------------------------------------------------

SETUP_KEY = "setup"  # clippers' arrays are stored as "clipper/name", so this can't clash


# Packages whose upgrade can change a condition's results.
VERSIONED_PACKAGES = ("optax-adaptive-clip", "jax", "jaxlib", "optax", "flax")


@functools.cache  # read once per run, not once per condition
def package_versions() -> dict[str, str]:
    """Installed versions of :data:`VERSIONED_PACKAGES` (``"not installed"`` if absent)."""
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def condition_setup(
    condition: Condition, config: Config, seeds: Sequence[int], clippers: Sequence[str]
) -> dict:
    """What a condition's results depend on, as it reads back from the cache's JSON: the
    flags, and the versions of the packages that compute it. (A change to the code of an
    editable install that keeps its version is not seen.)

    Seeds and clippers count as whole lists: they set how many rows the compiled program
    vmaps over, which changes the last bits of every run: a clipper trained alone would not
    reproduce, bit for bit, the same clipper trained next to others.
    """
    setup = {
        "condition": dataclasses.asdict(condition),
        "config": dataclasses.asdict(config),
        "seeds": list(seeds),
        "clippers": list(clippers),
        "versions": package_versions(),
    }
    return json.loads(json.dumps(setup))


def _setup_changes(saved: dict, wanted: dict) -> str:
    """What differs, like ``condition.spike_prob 0.03 -> 0.5; clippers [...] -> [...]``."""
    changes = []
    for part, new in wanted.items():
        old = saved.get(part)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += [
                f"{part}.{field} {old.get(field, 'unset')!r} -> {new.get(field, 'unset')!r}"
                for field in sorted(old.keys() | new.keys())
                if old.get(field, "unset") != new.get(field, "unset")
            ]
        elif old != new:
            changes.append(f"{part} {old!r} -> {new!r}")
    return "; ".join(changes) or "the stored setup differs"


def save_condition(path: Path, setup: dict, by_clipper: dict[str, dict[str, np.ndarray]]) -> None:
    path.parent.mkdir(exist_ok=True)
    # Written under another name, then renamed: a run killed mid-write leaves no broken cache.
    partial = path.with_suffix(".partial.npz")
    np.savez_compressed(
        partial,
        **{SETUP_KEY: np.asarray(json.dumps(setup))},
        **{
            f"{clipper}/{key}": values
            for clipper, curves in by_clipper.items()
            for key, values in curves.items()
        },
    )
    partial.replace(path)


def load_condition(path: Path, setup: dict) -> tuple[dict | None, str | None]:
    """``(results, None)`` if the cache at ``path`` was made with ``setup``, else ``(None, why)``.

    A cache without a stored setup is never trusted: nothing says what it was made with.
    """
    with np.load(path) as saved:
        if SETUP_KEY not in saved.files:
            return None, "it was written by an older study.py that did not record its setup"
        saved_setup = json.loads(saved[SETUP_KEY].item())
        if saved_setup != setup:
            return None, "it was made with another setup: " + _setup_changes(saved_setup, setup)
        return {
            clipper: {
                key.split("/", 1)[1]: saved[key]
                for key in saved.files
                if key.split("/", 1)[0] == clipper
            }
            for clipper in setup["clippers"]
        }, None


# --- table and figures -----------------------------------------------------------------------


def _spread(values: Sequence[float], fmt: str) -> str:
    if not values:
        return "-"
    values = sorted(values)
    median = float(np.median(values))
    if len(values) == 1:
        return format(median, fmt)
    return f"{format(median, fmt)} [{format(values[0], fmt)}, {format(values[-1], fmt)}]"


TABLE_COLUMNS = (
    "condition",
    "clipper",
    "diverged",
    "failed (exact match < 50 %)",
    "exact match % (median [min, max])",
    "steps to target (median [min, max]; reached)",
    "clip fraction % (median)",
    "final loss (median)",
)


def markdown_table(records: list[dict], conditions: list[Condition], clippers: list[str]) -> str:
    lines = [
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for condition in conditions:
        for clipper in clippers:
            runs = [
                r for r in records if r["condition"] == condition.name and r["clipper"] == clipper
            ]
            if not runs:
                continue
            reached = [r["steps_to_target"] for r in runs if r["steps_to_target"] is not None]
            steps = f"{_spread(reached, '.0f')}; {len(reached)}/{len(runs)}"
            losses = [r["final_loss"] for r in runs if r["final_loss"] is not None]
            final_loss = f"{np.median(losses):.3f}" if len(losses) == len(runs) else "nan"
            cells = [
                condition.name,
                clipper,
                f"{sum(r['diverged'] for r in runs)}/{len(runs)}",
                f"{sum(r['exact_match'] < 0.5 for r in runs)}/{len(runs)}",
                _spread([100 * r["exact_match"] for r in runs], ".1f"),
                steps,
                f"{100 * np.median([r['clip_fraction'] for r in runs]):.1f}",
                final_loss,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_losses(path: Path, all_curves: dict, conditions: list[Condition], clippers: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(conditions), len(clippers)
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.0 * cols, 1.7 * rows), sharex=True, sharey=True, squeeze=False
    )
    for i, condition in enumerate(conditions):
        for j, clipper in enumerate(clippers):
            ax = axes[i][j]
            curves = all_curves.get((condition.name, clipper))
            if curves is None:
                ax.set_visible(False)
                continue
            loss = curves["loss"]
            for seed_loss in loss:
                finite = np.isfinite(seed_loss)
                ax.plot(np.nonzero(finite)[0], seed_loss[finite], lw=0.6, alpha=0.8)
                if not finite.all():  # where the loss became NaN/inf
                    ax.plot(np.argmin(finite), 50.0, "kx", ms=5)
            ax.set_yscale("log")
            ax.set_ylim(1e-3, 80)
            ax.tick_params(labelsize=6)
            if i == 0:
                ax.set_title(clipper, fontsize=8)
            if j == 0:
                ax.set_ylabel(condition.name, fontsize=8)
    title = "training loss (each line one seed; x: loss became NaN/inf)"
    fig.suptitle(title, fontsize=9)
    fig.supxlabel("step", fontsize=8)
    plots.save_figure(fig, path, dpi=56)


def plot_norms(path: Path, all_curves: dict, condition: Condition, clippers: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(clippers), figsize=(2.0 * len(clippers), 2.2), sharey=True, squeeze=False
    )
    for ax, clipper in zip(axes[0], clippers, strict=True):
        curves = all_curves.get((condition.name, clipper))
        if curves is None:
            ax.set_visible(False)
            continue
        norm, threshold = curves["grad_norm"][0], curves["threshold"][0]
        applied = np.where(curves["clipped"][0], np.minimum(norm, threshold), norm)
        steps = np.arange(norm.size)
        ax.plot(steps, norm, color="0.7", lw=0.6, label="before clipping")
        ax.plot(steps, applied, color="C0", lw=0.6, label="after clipping")
        clipped = curves["clipped"][0]
        ax.plot(steps[clipped], applied[clipped], "r.", ms=2, label="clipped")
        ax.set_yscale("log")
        ax.set_title(clipper, fontsize=8)
        ax.tick_params(labelsize=6)
    axes[0][0].set_ylabel("gradient norm", fontsize=8)
    axes[0][0].legend(fontsize=5, loc="upper right")
    fig.suptitle(
        f"gradient norm under '{condition.name}' ({condition.describe()}), seed 0", fontsize=9
    )
    plots.save_figure(fig, path, dpi=72)


# --- main ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/seq2seq_study", help="output directory")
    parser.add_argument("--quick", action="store_true", help="2 seeds, tiny model, short runs")
    parser.add_argument(
        "--seeds", type=positive_int, default=None, help="seeds per cell (5; quick 2)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="override the training steps"
    )
    parser.add_argument("--conditions", default=",".join(DEFAULT_CONDITIONS))
    parser.add_argument("--clippers", default=",".join(DEFAULT_CLIPPERS))
    parser.add_argument("--high-lr-scale", type=positive_float, default=20.0)
    parser.add_argument("--spike-prob", type=probability, default=0.03)
    parser.add_argument("--spike-scale", type=positive_float, default=1e4)
    parser.add_argument("--noise-prob", type=probability, default=0.05)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse conditions an earlier run into --out finished with the same setup "
        "(condition, model and data, seeds, clippers); train the others",
    )
    parser.add_argument(
        "--target", type=probability, default=0.9, help="exact match for steps-to-target"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    # The CPU runtime of jax 0.10.2 hung now and then in full runs (every thread idle, the host
    # waiting on a result), with and without this; synchronous dispatch at least keeps one
    # computation in flight. Stop a hung run and rerun it with --resume.
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    began = time.perf_counter()
    config = study_model_config(args.quick)
    if args.steps is not None:
        config = dataclasses.replace(config, num_steps=args.steps)
    if config.num_steps % config.eval_every:
        raise SystemExit(f"--steps must be a multiple of {config.eval_every}")
    seeds = list(range(args.seeds if args.seeds is not None else (2 if args.quick else 5)))
    conditions = make_conditions(args)
    clippers = [name for name in args.clippers.split(",") if name]
    for name in clippers:
        make_clip(name)  # fail early on a bad name
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    dataset = data_lib.load_dataset(config)
    print(f"data: {json.dumps(dataset.info)}", flush=True)
    records: list[dict] = []
    reused: list[str] = []
    all_curves: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    runs_path = out / "runs.jsonl"
    runs_path.write_text("")
    for cell in sorted({condition.cell for condition in conditions}):
        compile_began = time.perf_counter()
        programs = build_programs(config, dataset, clippers, cell, len(seeds))
        first = True
        for condition in (c for c in conditions if c.cell == cell):
            condition_began = time.perf_counter()
            cache = out / "conditions" / f"{condition.name}.npz"
            wanted = condition_setup(condition, config, seeds, clippers)
            by_clipper = None
            if args.resume and cache.exists():  # finished by an earlier run
                by_clipper, mismatch = load_condition(cache, wanted)
                if mismatch:
                    print(
                        f"{condition.name}: retraining, not reusing {cache}: {mismatch}", flush=True
                    )
                else:
                    reused.append(condition.name)
            if by_clipper is None:
                by_clipper = train_condition(programs, config, condition, clippers, seeds)
                save_condition(cache, wanted, by_clipper)
            elapsed = time.perf_counter() - (compile_began if first else condition_began)
            print(
                f"{condition.name} ({condition.describe()}): {elapsed:.1f} s"
                + (" incl. compilation" if first else ""),
                flush=True,
            )
            first = False
            for clipper, curves in by_clipper.items():
                all_curves[(condition.name, clipper)] = curves
                runs = [
                    {
                        "condition": condition.name,
                        "clipper": clipper,
                        "seed": seed,
                        **summarize_run(curves, index, config, args.target),
                    }
                    for index, seed in enumerate(seeds)
                ]
                records.extend(runs)
                with runs_path.open("a") as sink:
                    sink.writelines(json.dumps(record) + "\n" for record in runs)
                print(
                    f"  {clipper:>10}: diverged {sum(r['diverged'] for r in runs)}/{len(runs)}, "
                    "exact match " + " ".join(f"{r['exact_match']:.3f}" for r in runs),
                    flush=True,
                )

    np.savez_compressed(
        out / "curves.npz",
        **{
            f"{condition}/{clipper}/{name}": values
            for (condition, clipper), curves in all_curves.items()
            for name, values in curves.items()
        },
    )
    table = markdown_table(records, conditions, clippers)
    wall = time.perf_counter() - began
    study_fields = ("number_max", "train_size", "test_size", "embed_dim", "hidden_dim")
    study_fields += ("attention_dim", "batch_size", "num_steps", "warmup_steps", "learning_rate")
    setup = {name: getattr(config, name) for name in study_fields}
    given = argv if argv is not None else sys.argv[1:]
    command = "python examples/seq2seq/study.py " + " ".join(
        arg
        for arg in given
        if arg != "--resume"  # a resumed run ends as an unbroken one
    )
    header = [
        "# Stability study",
        "",
        f"Command: `{command.strip()}` ({wall / 60:.1f} min"
        + (f", resumed: reused {', '.join(reused)} from an earlier run" if reused else "")
        + f", {jax.device_count()} device(s)).",
        f"Seeds {seeds}; model and data: `{json.dumps(setup)}`; "
        f"target exact match {args.target:g}; evaluated every {config.eval_every} steps "
        f"on {config.test_size} held-out numbers.",
        "",
        "Conditions:",
        "",
        *[f"* `{c.name}`: {c.describe()}" for c in conditions],
        "",
        "Diverged: the loss became NaN/inf, or the final loss (median of the uncorrupted "
        "steps of the last 10 %) is not below the loss at step 0. Failed: final exact match "
        "below 50 % (includes runs that stalled without diverging). Spread: [min, max] over "
        "seeds. Steps to target: first evaluation at or above the target; `-` if never.",
        "",
        "",
    ]
    (out / "study.md").write_text("\n".join(header) + table)
    plot_losses(out / "loss_curves.png", all_curves, conditions, clippers)
    stressed = [c for c in conditions if c.spike_prob] or conditions
    plot_norms(out / "clipped_norms.png", all_curves, stressed[0], clippers)
    summary = {
        "wall_time_s": wall,
        "seeds": seeds,
        "setup": setup,
        "runs": len(records),
        "versions": package_versions(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table)
    print(f"wall time {wall:.1f} s -> {out}")
    return summary


if __name__ == "__main__":
    main()
