"""Side-by-side cost of adaptive clipping against Optax's global-norm clipping.

Run from the repository root::

    python benchmarks/bench_clipping.py            # full run, a few minutes on 2 CPU cores
    python benchmarks/bench_clipping.py --quick    # seconds; checks that the script works

Every variant of one size is compiled and warmed up first, then the variants are
timed in rounds, in a fresh random order each round, so that drifts of a noisy
machine hit all of them alike. Each sample is one or more jitted steps followed by
``jax.block_until_ready``; a variant's time is the median of its samples. Ratios
are reported both as the ratio of medians and as the median of the per-round
ratios (the latter pairs samples taken moments apart).

Buffers: the clip-only steps donate their gradients and state and feed the
clipped gradients back in as the next input, so no step allocates or copies a
gradient-sized buffer; the Adam steps donate parameters and optimizer state and
read the same gradients every step. Every variant of a kind is driven the same
way, so the ratios compare like with like.

Results go to ``benchmarks/results/clipping.json`` and ``.md``, those of ``--quick`` to a
temporary directory (see ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optax_adaptive_clip as oac

NUM_LEAVES = 50
# --quick compiles a dozen steps; fewer leaves keep that to seconds.
QUICK_NUM_LEAVES = 10
DEFAULT_SIZES = (1_000_000, 10_000_000, 50_000_000)
QUICK_SIZES = (100_000,)
WINDOWS = (32, 1024, 65536)
# The eager baseline keeps this many norms, like the PyTorch prototype.
EAGER_WINDOW = 32
# Above this global norm clip_by_global_norm scales; the test gradients' norm is ~1.
GLOBAL_NORM_CAP = 0.5
LEARNING_RATE = 1e-3
ADAPTIVE_SCALING = f"adaptive_clip(max_norm={GLOBAL_NORM_CAP}), scaling every step"
GLOBAL_SCALING = "clip_by_global_norm, scaling every step"
SECOND_PASS = "adaptive_clip(w=32), norm's second pass every step"
GLOBAL_WITH_STATE = "clip_by_global_norm + adaptive_clip's state, passed through"
ZERO_NONFINITE = "adaptive_clip(w=32, nonfinite='zero')"
# Steps per jitted call of the rows that run the clipper inside one compiled loop, as a
# training loop written with lax.scan does.
LOOP_STEPS = 10
IN_LOOP = f", {LOOP_STEPS} steps per compiled loop"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

PyTree = Any


@dataclasses.dataclass
class Variant:
    """One timed configuration: ``run`` performs ``steps_per_sample`` steps and blocks."""

    name: str
    kind: str
    dtype: str
    run: Callable[[], None]
    steps_per_sample: int
    temp_bytes: int | None
    hlo_text: str | None = None
    samples: list[float] = dataclasses.field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def quantile(self, fraction: float) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def leaf_sizes(num_params: int, num_leaves: int) -> list[int]:
    """Splits ``num_params`` over ``num_leaves`` leaves as evenly as possible."""
    base, extra = divmod(num_params, num_leaves)
    return [base + (1 if index < extra else 0) for index in range(num_leaves)]


def make_tree(
    num_params: int, dtype: jnp.dtype, seed: int, num_leaves: int = NUM_LEAVES
) -> dict[str, jax.Array]:
    """A dict of ``num_leaves`` leaves of normal noise whose global norm is about 1.

    Leaves are matrices of 1000 columns where the size allows, as weights are.
    """
    key = jax.random.key(seed)
    leaves = {}
    scale = 1.0 / math.sqrt(num_params)
    for index, size in enumerate(leaf_sizes(num_params, num_leaves)):
        shape = (size // 1000, 1000) if size % 1000 == 0 else (size,)
        key, leaf_key = jax.random.split(key)
        leaf = jax.random.normal(leaf_key, shape, jnp.float32) * scale
        leaves[f"layer_{index:02d}"] = leaf.astype(dtype)
    return jax.block_until_ready(leaves)


def fresh_copy(tree: PyTree) -> PyTree:
    """A copy with buffers of its own, so donating it leaves ``tree`` intact."""
    return jax.block_until_ready(jax.tree.map(lambda leaf: jnp.array(leaf, copy=True), tree))


def compiled_stats(jitted: Any, *args: Any) -> tuple[int | None, str]:
    """Temporary bytes of the compiled step and its optimised HLO text."""
    compiled = jitted.lower(*args).compile()
    memory = compiled.memory_analysis()
    temp_bytes = None if memory is None else int(memory.temp_size_in_bytes)
    return temp_bytes, compiled.as_text()


def with_state_of(
    transformation: optax.GradientTransformation, other: optax.GradientTransformation
) -> optax.GradientTransformation:
    """``transformation`` also carrying ``other``'s state, passed through unchanged.

    Separates what a jitted call pays to take a state's arrays in and out from
    what computing the state costs.
    """

    def init_fn(params: PyTree) -> tuple[Any, Any]:
        return transformation.init(params), other.init(params)

    def update_fn(
        updates: PyTree, state: tuple[Any, Any], params: PyTree | None = None
    ) -> tuple[PyTree, tuple[Any, Any]]:
        inner_state, carried = state
        updates, inner_state = transformation.update(updates, inner_state, params)
        return updates, (inner_state, carried)

    return optax.GradientTransformation(init_fn, update_fn)


def clip_only_variant(
    name: str,
    transformation: optax.GradientTransformation,
    grads: PyTree,
    dtype: str,
    steps_per_sample: int,
    *,
    kind: str = "clip",
    feedback_scale: float | None = None,
    in_loop: bool = False,
) -> Variant:
    """Times ``transformation.update`` alone; clipped updates are fed back as gradients.

    With ``feedback_scale`` the fed-back updates are first multiplied by it, in the
    same jitted step, so that a clipper that halves the norm sees the same norm
    again and scales every step. With ``in_loop`` each jitted call runs
    ``LOOP_STEPS`` steps in a ``lax.fori_loop``, which share the cost of the call.
    """

    def step(updates: PyTree, state: Any) -> tuple[PyTree, Any]:
        updates, state = transformation.update(updates, state)
        if feedback_scale is not None:
            updates = jax.tree.map(lambda leaf: (leaf * feedback_scale).astype(leaf.dtype), updates)
        return updates, state

    def loop_of_steps(updates: PyTree, state: Any) -> tuple[PyTree, Any]:
        return jax.lax.fori_loop(0, LOOP_STEPS, lambda _, carry: step(*carry), (updates, state))

    calls_per_sample = 1 if in_loop else steps_per_sample
    if in_loop:
        steps_per_sample = LOOP_STEPS
    jitted = jax.jit(loop_of_steps if in_loop else step, donate_argnums=(0, 1))
    # States may share one buffer between fields (say, zero counters); donation needs each
    # field to own its buffer.
    carry = [fresh_copy(grads), fresh_copy(transformation.init(grads))]
    temp_bytes, hlo_text = compiled_stats(jitted, *carry)

    def run() -> None:
        updates, state = carry
        for _ in range(calls_per_sample):
            updates, state = jitted(updates, state)
        carry[:] = jax.block_until_ready((updates, state))

    return Variant(name, kind, dtype, run, steps_per_sample, temp_bytes, hlo_text)


def optimizer_variant(
    name: str,
    transformation: optax.GradientTransformation,
    params: PyTree,
    grads: PyTree,
    dtype: str,
    steps_per_sample: int,
) -> Variant:
    """Times a full optimizer step: update, then apply it to the parameters."""

    def step(params: PyTree, state: Any, grads: PyTree) -> tuple[PyTree, Any]:
        updates, state = transformation.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    jitted = jax.jit(step, donate_argnums=(0, 1))
    own_params = fresh_copy(params)
    carry = [own_params, fresh_copy(transformation.init(own_params))]
    temp_bytes, hlo_text = compiled_stats(jitted, *carry, grads)

    def run() -> None:
        params, state = carry
        for _ in range(steps_per_sample):
            params, state = jitted(params, state, grads)
        carry[:] = jax.block_until_ready((params, state))

    return Variant(name, "optimizer", dtype, run, steps_per_sample, temp_bytes, hlo_text)


class EagerHostClipper:
    """What the PyTorch prototype does, written eagerly in JAX.

    The global norm is pulled to the host as a Python float every step (a device
    sync), the last ``window`` norms live in a Python list, their mean and sample
    standard deviation are computed in Python, and the gradients are scaled with
    jnp only when the norm exceeds ``mean + std``. The prototype's NaN/inf
    imputation is left out, which only makes this baseline cheaper.
    """

    def __init__(self, window: int = EAGER_WINDOW) -> None:
        self.window = window
        self.history: list[float] = []

    def __call__(self, grads: PyTree) -> PyTree:
        leaves = jax.tree.leaves(grads)
        per_leaf = jnp.stack([jnp.linalg.norm(leaf.astype(jnp.float32)) for leaf in leaves])
        norm = float(jnp.linalg.norm(per_leaf))
        if len(self.history) == self.window:
            threshold = statistics.mean(self.history) + statistics.stdev(self.history)
            if norm > threshold:
                scale = threshold / norm
                grads = jax.tree.map(lambda leaf: (leaf * scale).astype(leaf.dtype), grads)
        self.history.append(norm)
        del self.history[: -self.window]
        return grads


def eager_variant(grads: PyTree, dtype: str, steps_per_sample: int) -> Variant:
    clipper = EagerHostClipper()

    def run() -> None:
        for _ in range(steps_per_sample):
            jax.block_until_ready(clipper(grads))

    return Variant("eager_host_clip", "clip", dtype, run, steps_per_sample, None)


def build_variants(num_params: int, steps_per_sample: int, num_leaves: int) -> list[Variant]:
    """Every variant for one size; each owns its buffers."""
    variants: list[Variant] = []
    for dtype_name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        grads = make_tree(num_params, dtype, seed=0, num_leaves=num_leaves)
        params = make_tree(num_params, dtype, seed=1, num_leaves=num_leaves)
        windows = WINDOWS if dtype_name == "float32" else (32,)
        for window in windows:
            variants.append(
                clip_only_variant(
                    f"adaptive_clip(w={window})",
                    oac.adaptive_clip(window=window),
                    grads,
                    dtype_name,
                    steps_per_sample,
                )
            )
        variants.append(
            clip_only_variant(
                "clip_by_global_norm",
                optax.clip_by_global_norm(GLOBAL_NORM_CAP),
                grads,
                dtype_name,
                steps_per_sample,
            )
        )
        if dtype_name == "float32":
            # The default imputes NaN and inf in its output pass; "zero" has nothing to
            # impute there. The gap is what keeping the imputation ready costs a step
            # that needs none.
            variants.append(
                clip_only_variant(
                    ZERO_NONFINITE,
                    oac.adaptive_clip(nonfinite="zero"),
                    grads,
                    dtype_name,
                    steps_per_sample,
                )
            )
            variants.append(
                clip_only_variant(
                    GLOBAL_WITH_STATE,
                    with_state_of(optax.clip_by_global_norm(GLOBAL_NORM_CAP), oac.adaptive_clip()),
                    grads,
                    dtype_name,
                    steps_per_sample,
                )
            )
            # Both clip to the same cap and are fed back twice their output, so both
            # scale every step (the rows above scale none after the first).
            scaling = {
                ADAPTIVE_SCALING: oac.adaptive_clip(max_norm=GLOBAL_NORM_CAP),
                GLOBAL_SCALING: optax.clip_by_global_norm(GLOBAL_NORM_CAP),
            }
            for name, transformation in scaling.items():
                variants.append(
                    clip_only_variant(
                        name,
                        transformation,
                        grads,
                        dtype_name,
                        steps_per_sample,
                        kind="clip_scaling",
                        feedback_scale=1.0 / GLOBAL_NORM_CAP,
                    )
                )
            # Inside one compiled loop the steps share the cost of a call, as in a
            # training loop written with lax.scan.
            looped = {
                "adaptive_clip(w=32)": oac.adaptive_clip(),
                ZERO_NONFINITE: oac.adaptive_clip(nonfinite="zero"),
                "clip_by_global_norm": optax.clip_by_global_norm(GLOBAL_NORM_CAP),
            }
            for name, transformation in looped.items():
                variants.append(
                    clip_only_variant(
                        name + IN_LOOP,
                        transformation,
                        grads,
                        dtype_name,
                        steps_per_sample,
                        kind="clip_loop",
                        in_loop=True,
                    )
                )
            # A norm of 1e25 (its square overflows float32's sum) sends every step
            # through the norm's rare second pass.
            variants.append(
                clip_only_variant(
                    SECOND_PASS,
                    oac.adaptive_clip(),
                    jax.tree.map(lambda leaf: leaf * 1e25, grads),
                    dtype_name,
                    steps_per_sample,
                )
            )
        optimizers = {
            "chain(adaptive_clip, adam)": optax.chain(
                oac.adaptive_clip(), optax.adam(LEARNING_RATE)
            ),
            "chain(clip_by_global_norm, adam)": optax.chain(
                optax.clip_by_global_norm(GLOBAL_NORM_CAP), optax.adam(LEARNING_RATE)
            ),
            "adam": optax.adam(LEARNING_RATE),
        }
        for name, transformation in optimizers.items():
            variants.append(
                optimizer_variant(name, transformation, params, grads, dtype_name, steps_per_sample)
            )
        if dtype_name == "float32":
            variants.append(eager_variant(grads, dtype_name, steps_per_sample))
        del params
    return variants


def time_interleaved(variants: Sequence[Variant], *, warmup: int, reps: int, seed: int) -> None:
    """Warms every variant up, then takes ``reps`` samples of each in shuffled rounds."""
    for variant in variants:
        for _ in range(warmup):
            variant.run()
    shuffler = random.Random(seed)
    order = list(variants)
    gc.collect()
    gc.disable()  # A collection inside one sample would be charged to that variant alone.
    try:
        for _ in range(reps):
            shuffler.shuffle(order)
            for variant in order:
                start = time.perf_counter()
                variant.run()
                elapsed = time.perf_counter() - start
                variant.samples.append(elapsed / variant.steps_per_sample)
    finally:
        gc.enable()


@dataclasses.dataclass(frozen=True)
class Comparison:
    """``numerator / denominator`` of per-step times, with an optional target."""

    label: str
    numerator: str
    denominator: str
    dtype: str
    target: float | None = None
    # "at_most": ratio <= target passes; "at_least": ratio >= target passes.
    sense: str = "at_most"
    sizes: tuple[int, ...] | None = None


COMPARISONS = (
    Comparison(
        "adaptive_clip / clip_by_global_norm, no step scaled",
        "adaptive_clip(w=32)",
        "clip_by_global_norm",
        "float32",
        1.05,
    ),
    Comparison(
        "adaptive_clip / clip_by_global_norm carrying the same state, no step scaled",
        "adaptive_clip(w=32)",
        GLOBAL_WITH_STATE,
        "float32",
    ),
    Comparison(
        "clip_by_global_norm carrying adaptive_clip's state / clip_by_global_norm",
        GLOBAL_WITH_STATE,
        "clip_by_global_norm",
        "float32",
    ),
    Comparison(
        "adaptive_clip(nonfinite='zero') / clip_by_global_norm, no step scaled",
        ZERO_NONFINITE,
        "clip_by_global_norm",
        "float32",
    ),
    Comparison(
        "adaptive_clip / adaptive_clip(nonfinite='zero'), no step scaled",
        "adaptive_clip(w=32)",
        ZERO_NONFINITE,
        "float32",
    ),
    Comparison(
        f"adaptive_clip / clip_by_global_norm, {LOOP_STEPS} steps per compiled loop",
        "adaptive_clip(w=32)" + IN_LOOP,
        "clip_by_global_norm" + IN_LOOP,
        "float32",
    ),
    Comparison(
        f"adaptive_clip(nonfinite='zero') / clip_by_global_norm, {LOOP_STEPS} steps per "
        "compiled loop",
        ZERO_NONFINITE + IN_LOOP,
        "clip_by_global_norm" + IN_LOOP,
        "float32",
    ),
    Comparison(
        f"adaptive_clip / adaptive_clip(nonfinite='zero'), {LOOP_STEPS} steps per compiled loop",
        "adaptive_clip(w=32)" + IN_LOOP,
        ZERO_NONFINITE + IN_LOOP,
        "float32",
    ),
    Comparison(
        "adaptive_clip / clip_by_global_norm, every step scaled",
        ADAPTIVE_SCALING,
        GLOBAL_SCALING,
        "float32",
        1.05,
    ),
    Comparison(
        "chain(adaptive_clip, adam) / chain(clip_by_global_norm, adam)",
        "chain(adaptive_clip, adam)",
        "chain(clip_by_global_norm, adam)",
        "float32",
        1.03,
    ),
    Comparison(
        "chain(adaptive_clip, adam) / adam", "chain(adaptive_clip, adam)", "adam", "float32"
    ),
    Comparison(
        "chain(clip_by_global_norm, adam) / adam",
        "chain(clip_by_global_norm, adam)",
        "adam",
        "float32",
    ),
    Comparison(
        "eager host-sync baseline / adaptive_clip (speed-up)",
        "eager_host_clip",
        "adaptive_clip(w=32)",
        "float32",
        3.0,
        "at_least",
        (1_000_000,),
    ),
    Comparison(
        "adaptive_clip, norm's second pass every step / clip_by_global_norm",
        SECOND_PASS,
        "clip_by_global_norm",
        "float32",
    ),
    Comparison(
        "adaptive_clip window 1024 / window 32",
        "adaptive_clip(w=1024)",
        "adaptive_clip(w=32)",
        "float32",
    ),
    Comparison(
        "adaptive_clip window 65536 / window 32",
        "adaptive_clip(w=65536)",
        "adaptive_clip(w=32)",
        "float32",
        1.05,
        "at_most",
        (10_000_000,),
    ),
    Comparison(
        "bf16: adaptive_clip / clip_by_global_norm",
        "adaptive_clip(w=32)",
        "clip_by_global_norm",
        "bfloat16",
    ),
    Comparison(
        "bf16: chain(adaptive_clip, adam) / chain(clip_by_global_norm, adam)",
        "chain(adaptive_clip, adam)",
        "chain(clip_by_global_norm, adam)",
        "bfloat16",
    ),
)

# Temporary memory of each adaptive variant must not exceed that of its optax counterpart.
MEMORY_PAIRS = (
    ("adaptive_clip(w=32)", "clip_by_global_norm"),
    ("adaptive_clip(w=1024)", "clip_by_global_norm"),
    ("adaptive_clip(w=65536)", "clip_by_global_norm"),
    (ADAPTIVE_SCALING, GLOBAL_SCALING),
    ("chain(adaptive_clip, adam)", "chain(clip_by_global_norm, adam)"),
)


def machine_info() -> dict[str, Any]:
    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # Not available on macOS.
        usable_cpus = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus,
        "processor": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(device) for device in jax.devices()],
    }


def evaluate(results: dict[int, dict[str, Variant]]) -> list[dict[str, Any]]:
    """Every comparison at every size, with pass/fail where a target applies."""
    rows = []
    for num_params, by_key in results.items():
        for comparison in COMPARISONS:
            numerator = by_key.get(f"{comparison.dtype}/{comparison.numerator}")
            denominator = by_key.get(f"{comparison.dtype}/{comparison.denominator}")
            if numerator is None or denominator is None:
                continue
            ratio = numerator.median / denominator.median
            paired = statistics.median(
                a / b for a, b in zip(numerator.samples, denominator.samples, strict=True)
            )
            applies = comparison.target is not None and (
                comparison.sizes is None or num_params in comparison.sizes
            )
            passed = None
            if applies:
                if comparison.sense == "at_most":
                    passed = ratio <= comparison.target
                else:
                    passed = ratio >= comparison.target
            rows.append(
                {
                    "num_params": num_params,
                    "comparison": comparison.label,
                    "ratio_of_medians": ratio,
                    "median_of_paired_ratios": paired,
                    "target": (
                        f"{'<=' if comparison.sense == 'at_most' else '>='} {comparison.target}"
                        if applies
                        else None
                    ),
                    "passed": passed,
                }
            )
        for adaptive, reference in MEMORY_PAIRS:
            for dtype in ("float32", "bfloat16"):
                left = by_key.get(f"{dtype}/{adaptive}")
                right = by_key.get(f"{dtype}/{reference}")
                if left is None or right is None or None in (left.temp_bytes, right.temp_bytes):
                    continue
                rows.append(
                    {
                        "num_params": num_params,
                        "comparison": f"temp memory ({dtype}): {adaptive} vs {reference}",
                        "temp_bytes": [left.temp_bytes, right.temp_bytes],
                        "target": "<=",
                        "passed": left.temp_bytes <= right.temp_bytes,
                    }
                )
    return rows


def format_bytes(count: int | None) -> str:
    if count is None:
        return "n/a"
    if count < 1024 * 1024:
        return f"{count / 1024:.1f} KiB"
    return f"{count / 2**20:.1f} MiB"


def markdown_report(
    machine: dict[str, Any],
    settings: dict[str, Any],
    results: dict[int, dict[str, Variant]],
    rows: list[dict[str, Any]],
) -> str:
    lines = [
        "## Adaptive clipping benchmark",
        "",
        f"Machine: {machine['cpu_count']} CPUs ({machine['usable_cpus']} usable), "
        f"{machine['processor']}, {machine['platform']}; jax {machine['jax']}, "
        f"optax {machine['optax']}, backend {machine['backend']}.",
        f"Settings: {settings['num_leaves']} leaves; warm-up {settings['warmup']} samples, "
        f"{settings['reps_by_size']} timed samples per variant by size, interleaved "
        "in shuffled rounds; median per step.",
        "",
        "| params | dtype | variant | median ms/step | p25-p75 ms | vs reference | temp memory |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    references = {
        "clip": "clip_by_global_norm",
        "clip_scaling": GLOBAL_SCALING,
        "clip_loop": "clip_by_global_norm" + IN_LOOP,
        "optimizer": "chain(clip_by_global_norm, adam)",
    }
    for num_params, by_key in results.items():
        for variant in by_key.values():
            reference = by_key.get(f"{variant.dtype}/{references[variant.kind]}")
            relative = f"{variant.median / reference.median:.3f}x" if reference else ""
            lines.append(
                f"| {num_params / 1e6:g}M | {variant.dtype} | {variant.name} "
                f"| {variant.median * 1e3:.3f} "
                f"| {variant.quantile(0.25) * 1e3:.3f}-{variant.quantile(0.75) * 1e3:.3f} "
                f"| {relative} | {format_bytes(variant.temp_bytes)} |"
            )
    lines += [
        "",
        "Reference for clip-only rows: `clip_by_global_norm` (no step scaled after the "
        "first), its every-step-scaled counterpart, or itself in a compiled loop; for "
        "optimizer rows: `chain(clip_by_global_norm, adam)`.",
        "",
        "| params | ratio | ratio of medians | median paired ratio | target | met |",
        "|---:|---|---:|---:|---|---|",
    ]
    for row in rows:
        if "ratio_of_medians" not in row:
            continue
        met = {None: "", True: "yes", False: "**no**"}[row["passed"]]
        lines.append(
            f"| {row['num_params'] / 1e6:g}M | {row['comparison']} "
            f"| {row['ratio_of_medians']:.3f} | {row['median_of_paired_ratios']:.3f} "
            f"| {row['target'] or ''} | {met} |"
        )
    lines += [
        "",
        "| params | temporary memory | adaptive | reference | met |",
        "|---:|---|---:|---:|---|",
    ]
    for row in rows:
        if "temp_bytes" not in row:
            continue
        met = "yes" if row["passed"] else "**no**"
        left, right = row["temp_bytes"]
        lines.append(
            f"| {row['num_params'] / 1e6:g}M | {row['comparison']} "
            f"| {format_bytes(left)} | {format_bytes(right)} | {met} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and few samples: checks that the script runs",
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="total parameter counts (default 1M 10M 50M)",
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed samples per variant (default scales with size)",
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed samples per variant")
    parser.add_argument(
        "--leaves",
        type=int,
        default=None,
        help=f"leaves per pytree (default {NUM_LEAVES}; {QUICK_NUM_LEAVES} with --quick)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the interleaving order")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results path without suffix: writes .json and .md (default "
        "benchmarks/results/clipping; with --quick, a temporary directory)",
    )
    parser.add_argument(
        "--dump-hlo",
        type=Path,
        default=None,
        help="directory to write each compiled step's optimised HLO to",
    )
    return parser.parse_args(argv)


def default_reps(num_params: int) -> int:
    """Enough samples for a stable median of a ~5% difference; the run takes a few minutes."""
    if num_params <= 20_000_000:
        return 100
    return 40


def default_steps_per_sample(num_params: int) -> int:
    """Several steps per sample where one step is too short to time on its own."""
    return max(1, min(10, 5_000_000 // num_params))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    reps_by_size = {size: args.reps or (5 if args.quick else default_reps(size)) for size in sizes}
    num_leaves = args.leaves or (QUICK_NUM_LEAVES if args.quick else NUM_LEAVES)
    machine = machine_info()
    print(f"machine: {json.dumps(machine)}", file=sys.stderr)

    results: dict[int, dict[str, Variant]] = {}
    for num_params in sizes:
        started = time.perf_counter()
        variants = build_variants(num_params, default_steps_per_sample(num_params), num_leaves)
        time_interleaved(variants, warmup=warmup, reps=reps_by_size[num_params], seed=args.seed)
        results[num_params] = {f"{v.dtype}/{v.name}": v for v in variants}
        if args.dump_hlo is not None:
            args.dump_hlo.mkdir(parents=True, exist_ok=True)
            for variant in variants:
                if variant.hlo_text is not None:
                    file_name = "".join(c if c.isalnum() else "_" for c in variant.name)
                    path = args.dump_hlo / f"{num_params}_{variant.dtype}_{file_name}.hlo.txt"
                    path.write_text(variant.hlo_text)
        for variant in variants:
            variant.run = None  # type: ignore[assignment]  # drops the buffers
            variant.hlo_text = None
        del variants
        gc.collect()
        print(
            f"{num_params:,} params done in {time.perf_counter() - started:.1f} s", file=sys.stderr
        )

    rows = evaluate(results)
    settings = {
        "warmup": warmup,
        "reps_by_size": reps_by_size,
        "quick": args.quick,
        "num_leaves": num_leaves,
        "seed": args.seed,
    }
    report = markdown_report(machine, settings, results, rows)
    print(report)

    payload = {
        "machine": machine,
        "settings": settings,
        "timings": [
            {
                "num_params": num_params,
                "dtype": variant.dtype,
                "variant": variant.name,
                "median_seconds": variant.median,
                "p25_seconds": variant.quantile(0.25),
                "p75_seconds": variant.quantile(0.75),
                "steps_per_sample": variant.steps_per_sample,
                "temp_size_in_bytes": variant.temp_bytes,
                "samples_seconds": variant.samples,
            }
            for num_params, by_key in results.items()
            for variant in by_key.values()
        ],
        "comparisons": rows,
    }
    # A --quick run only checks the script; it must not replace the committed results.
    out = args.out or (
        Path(tempfile.mkdtemp()) / "clipping" if args.quick else RESULTS_DIR / "clipping"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(report)
    print(f"wrote {out.with_suffix('.json')} and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
