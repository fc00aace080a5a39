"""Runs the clippers inside ``jax.shard_map`` (``check_vma=True``) and outside it; saves both.

Launched by ``tests/test_distributed.py`` in a subprocess whose ``XLA_FLAGS``
ask for 8 virtual CPU devices, so that the pytest process keeps its one device.

Two uses are run:

* per-shard ("local"): each device clips its own shard of the gradient, as
  ``optax.clip_by_global_norm`` does inside ``shard_map``, and keeps its own
  state (the first step starts from a replicated state, passed with ``P()``;
  later steps from the per-device states, stacked on a leading axis). Every
  device must get what the same update gives outside ``shard_map`` on its
  shard. The gradient mixes a leaf split over the mesh axis with replicated
  (bfloat16 and scalar) leaves, and some steps send NaN, inf or float32-
  overflowing values to some devices only, so that the careful pass runs on
  those devices while the others take the fast pass.
* data-parallel: the per-device gradient contributions are summed with
  ``psum`` inside ``shard_map``; the state stays replicated (``out_specs=P()``)
  and must match the run outside ``shard_map`` on the summed gradient.

Usage: ``python tests/_shard_map_worker.py OUTPUT.npz``
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import optax_adaptive_clip as oac

NUM_DEVICES = 8
NUM_STEPS = 9
AXIS = "data"
# Local rows of the split leaf: 64 * 80 entries, a full block of the careful pass and a remainder.
LOCAL_ROWS, COLUMNS = 64, 80
NORMAL_SCALES = (1.0, 0.8, 1.2, 0.9, 1.1)
SPIKE_STEPS = (5,)
SPIKE_SCALE = 30.0
# Step -> device -> entry written at w[0, 0] of that device's shard.
BAD_ENTRIES = {3: {2: np.inf, 5: np.nan}, 6: {1: 3e38, 4: -np.inf}}

PyTree = Any


def make_clippers() -> dict[str, Callable[[], optax.GradientTransformation]]:
    return {
        "adaptive_clip": lambda: oac.adaptive_clip(window=4, min_history=2),
        "adaptive_clip_zero": lambda: oac.adaptive_clip(
            window=4, min_history=2, norm_ord=float("inf"), nonfinite="zero"
        ),
        "autoclip": lambda: oac.autoclip(percentile=50.0, window=6),
        "zclip": lambda: oac.zclip(warmup_steps=3, z_thresh=1.5),
        # norm_ord is traced here: the norm's lax.switch picks the reduction.
        "injected_adaptive_clip": lambda: optax.inject_hyperparams(
            oac.adaptive_clip, static_args=("window", "min_history")
        )(window=4, min_history=2, norm_ord=3.0),
        "skip_on_spike": lambda: oac.skip_on_spike(
            optax.adam(1e-2), window=4, num_std=1.0, min_history=2
        ),
    }


def gradients(step: int) -> dict[str, np.ndarray]:
    """Step ``step``'s gradient: ``w`` is split over the devices, ``b`` and ``gain`` replicated."""
    rng = np.random.default_rng(200 + step)
    scale = SPIKE_SCALE if step in SPIKE_STEPS else NORMAL_SCALES[step % len(NORMAL_SCALES)]
    w = scale * rng.normal(size=(NUM_DEVICES * LOCAL_ROWS, COLUMNS))
    for device, value in BAD_ENTRIES.get(step, {}).items():
        w[device * LOCAL_ROWS, 0] = value
    return {
        "w": w.astype(np.float32),
        "b": (scale * rng.normal(size=(40,))).astype(jnp.bfloat16),
        "gain": np.float32(scale * rng.normal()),
    }


def grad_specs() -> dict[str, PartitionSpec]:
    return {"w": PartitionSpec(AXIS), "b": PartitionSpec(), "gain": PartitionSpec()}


def shard_of(grads: dict[str, np.ndarray], device: int) -> dict[str, np.ndarray]:
    rows = slice(device * LOCAL_ROWS, (device + 1) * LOCAL_ROWS)
    return {**grads, "w": grads["w"][rows]}


def flatten(tree: PyTree) -> np.ndarray:
    return np.concatenate(
        [np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(tree)]
    )


def stacked(tree: PyTree) -> PyTree:
    """A leading device axis on every leaf: how a per-device value leaves ``shard_map``."""
    return jax.tree.map(lambda leaf: leaf[None], tree)


def unstacked(tree: PyTree, device: int = 0) -> PyTree:
    """What device ``device`` (or, inside ``shard_map``, this device) holds of a stacked tree."""
    return jax.tree.map(lambda leaf: leaf[device], tree)


def clip_or_skip_count(state: PyTree) -> int:
    """Updates clipped (or steps skipped) so far, read from a clipper's state."""
    stats = oac.clip_stats(state)
    return int(stats.get("clip_count", stats.get("skip_count")))


def run_local(mesh: Mesh, make_tx: Callable[[], optax.GradientTransformation]) -> dict:
    """Per-shard clipping inside shard_map, and device by device outside it."""
    tx = make_tx()
    template = jax.tree.map(jnp.zeros_like, shard_of(gradients(0), 0))
    initial_state = tx.init(template)

    def update(grads: PyTree, state: PyTree) -> tuple[PyTree, PyTree]:
        return tx.update(grads, state)

    def step_from_replicated(grads: PyTree, state: PyTree) -> tuple[PyTree, PyTree, PyTree]:
        new_updates, new_state = update(grads, state)
        norm, has_nonfinite = oac.global_norm(grads)
        return stacked(new_updates), stacked(new_state), stacked((norm, has_nonfinite))

    def step_from_stacked(grads: PyTree, state: PyTree) -> tuple[PyTree, PyTree, PyTree]:
        return step_from_replicated(grads, unstacked(state))

    per_device = PartitionSpec(AXIS)
    shard_map = functools.partial(jax.shard_map, mesh=mesh, check_vma=True)
    first_step = jax.jit(
        shard_map(
            step_from_replicated, in_specs=(grad_specs(), PartitionSpec()), out_specs=per_device
        )
    )
    next_step = jax.jit(
        shard_map(step_from_stacked, in_specs=(grad_specs(), per_device), out_specs=per_device)
    )

    inside_updates, inside_norms = [], []
    state = initial_state
    for step in range(NUM_STEPS):
        grads = gradients(step)
        run = first_step if step == 0 else next_step
        new_updates, state, norms = run(grads, state)
        inside_updates.append(
            [flatten(unstacked(new_updates, device)) for device in range(NUM_DEVICES)]
        )
        inside_norms.append(np.stack([np.asarray(field) for field in norms], axis=-1))
    inside_states = [flatten(unstacked(state, device)) for device in range(NUM_DEVICES)]
    events = [clip_or_skip_count(unstacked(state, device)) for device in range(NUM_DEVICES)]

    jitted_update = jax.jit(update)
    jitted_norm = jax.jit(oac.global_norm)
    outside_updates = [[None] * NUM_DEVICES for _ in range(NUM_STEPS)]
    outside_norms = np.zeros((NUM_STEPS, NUM_DEVICES, 2))
    outside_states = []
    for device in range(NUM_DEVICES):
        state = initial_state
        for step in range(NUM_STEPS):
            grads = shard_of(gradients(step), device)
            new_updates, state = jitted_update(grads, state)
            outside_updates[step][device] = flatten(new_updates)
            outside_norms[step, device] = [float(value) for value in jitted_norm(grads)]
        outside_states.append(flatten(state))

    return {
        "events": np.array(events),
        "inside_updates": np.array(inside_updates),
        "outside_updates": np.array(outside_updates),
        "inside_norms": np.array(inside_norms, np.float64),
        "outside_norms": outside_norms,
        "inside_states": np.array(inside_states),
        "outside_states": np.array(outside_states),
    }


def run_data_parallel(mesh: Mesh, make_tx: Callable[[], optax.GradientTransformation]) -> dict:
    """Gradient contributions summed inside shard_map; the state stays replicated."""
    tx = make_tx()
    whole = {name: np.asarray(leaf, np.float32) for name, leaf in gradients(0).items()}
    initial_state = tx.init(whole)

    def contributions(step: int) -> dict[str, np.ndarray]:
        """Per-device parts, shape ``(NUM_DEVICES, *leaf_shape)``, of a finite gradient."""
        rng = np.random.default_rng(500 + step)
        scale = SPIKE_SCALE if step in SPIKE_STEPS else NORMAL_SCALES[step % len(NORMAL_SCALES)]
        parts = {
            name: scale / NUM_DEVICES * rng.normal(size=(NUM_DEVICES, *np.shape(leaf)))
            for name, leaf in whole.items()
        }
        return {name: part.astype(np.float32) for name, part in parts.items()}

    def summed_step(parts: PyTree, state: PyTree) -> tuple[PyTree, PyTree]:
        grads = jax.lax.psum(unstacked(parts), AXIS)
        return tx.update(grads, state)

    replicated = PartitionSpec()
    inside = jax.jit(
        jax.shard_map(
            summed_step,
            mesh=mesh,
            in_specs=(PartitionSpec(AXIS), replicated),
            out_specs=(replicated, replicated),
            check_vma=True,
        )
    )
    outside = jax.jit(
        lambda parts, state: tx.update(jax.tree.map(lambda part: part.sum(axis=0), parts), state)
    )
    results: dict[str, list[np.ndarray]] = {
        key: [] for key in ("inside_updates", "outside_updates", "inside_states", "outside_states")
    }
    per_device = NamedSharding(mesh, PartitionSpec(AXIS))
    inside_state, outside_state = initial_state, initial_state
    for step in range(NUM_STEPS):
        parts = contributions(step)
        new_updates, inside_state = inside(jax.device_put(parts, per_device), inside_state)
        results["inside_updates"].append(flatten(new_updates))
        results["inside_states"].append(flatten(inside_state))
        new_updates, outside_state = outside(parts, outside_state)
        results["outside_updates"].append(flatten(new_updates))
        results["outside_states"].append(flatten(outside_state))
    replicated_state = all(
        leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(inside_state)
    )
    return {key: np.array(value) for key, value in results.items()} | {
        "replicated": np.array(replicated_state),
        "events": np.array(clip_or_skip_count(inside_state)),
    }


def main(output_path: str) -> None:
    devices = np.array(jax.devices())
    if devices.size != NUM_DEVICES:
        raise SystemExit(f"expected {NUM_DEVICES} devices, got {devices.size}")
    mesh = Mesh(devices, (AXIS,))
    saved = {}
    for name, make_tx in make_clippers().items():
        for use, run in (("local", run_local), ("data_parallel", run_data_parallel)):
            for key, value in run(mesh, make_tx).items():
                saved[f"{name}/{use}/{key}"] = value
    np.savez(output_path, **saved)


if __name__ == "__main__":
    main(sys.argv[1])
