"""Runs ``chain(adaptive_clip, adam)`` unsharded and under several shardings; saves both.

Launched by ``tests/test_distributed.py`` in a subprocess whose ``XLA_FLAGS``
ask for 8 virtual CPU devices, so that the pytest process keeps its one device.

Usage: ``python tests/_sharded_worker.py OUTPUT.npz``
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import optax_adaptive_clip as oac

NUM_DEVICES = 8
NUM_STEPS = 24
WINDOW = 8
NUM_STD = 1.0
LEARNING_RATE = 1e-2
# Gradient scales cycle through NORMAL_SCALES; these steps get SPIKE_SCALE instead.
NORMAL_SCALES = (1.0, 0.8, 1.2, 0.9, 1.1)
SPIKE_STEPS = (10, 11, 19)
SPIKE_SCALE = 20.0
# Leaf shapes: every dimension that a layout shards is a multiple of the mesh axis.
LEAF_SHAPES: dict[str, tuple[int, ...]] = {
    "w1": (64, 32),
    "b1": (32,),
    "w2": (32, 16),
    "b2": (16,),
    "gain": (),
}

PyTree = Any
StateArrays = dict[str, np.ndarray]


def make_optimizer() -> optax.GradientTransformation:
    return optax.chain(oac.adaptive_clip(window=WINDOW, num_std=NUM_STD), optax.adam(LEARNING_RATE))


def initial_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in LEAF_SHAPES.items()}


def microbatch_gradients(step: int) -> dict[str, np.ndarray]:
    """Per-device gradient contributions, shape ``(NUM_DEVICES, *leaf_shape)``.

    Their sum is step ``step``'s gradient. The scale of each step is chosen so
    that every clip decision is far from its threshold (the reference run
    checks this), and so cannot flip under float32 reordering.
    """
    rng = np.random.default_rng(100 + step)
    scale = SPIKE_SCALE if step in SPIKE_STEPS else NORMAL_SCALES[step % len(NORMAL_SCALES)]
    return {
        name: (scale / NUM_DEVICES * rng.normal(size=(NUM_DEVICES, *shape))).astype(np.float32)
        for name, shape in LEAF_SHAPES.items()
    }


def summed(microbatches: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: value.sum(axis=0, dtype=np.float32) for name, value in microbatches.items()}


def apply_step(params: PyTree, opt_state: Any, grads: PyTree) -> tuple[PyTree, Any, PyTree]:
    updates, opt_state = make_optimizer().update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, updates


def direct_step(params: PyTree, opt_state: Any, grads: PyTree) -> tuple[PyTree, Any, PyTree]:
    """Gradients arrive whole (already reduced) in the parameters' layout."""
    return apply_step(params, opt_state, grads)


def data_parallel_step(
    params: PyTree, opt_state: Any, microbatches: PyTree
) -> tuple[PyTree, Any, PyTree]:
    """Gradients arrive as per-device contributions; their sum is the all-reduce."""
    grads = jax.tree.map(lambda contributions: contributions.sum(axis=0), microbatches)
    return apply_step(params, opt_state, grads)


def clip_state(opt_state: Any) -> oac.AdaptiveClipState:
    return opt_state[0]


def flatten(tree: PyTree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree.leaves(tree)])


def run(
    step: Callable[..., tuple[PyTree, Any, PyTree]],
    place_params: Callable[[PyTree], PyTree],
    place_grads: Callable[[int], PyTree],
    mesh_devices: int,
) -> StateArrays:
    """Runs ``NUM_STEPS`` jitted steps; returns what each step decided and produced."""
    params = place_params(initial_params())
    opt_state = jax.jit(make_optimizer().init)(params)
    jitted = jax.jit(step)
    norms, thresholds, clipped, updates_by_step, replicated = [], [], [], [], []
    for index in range(NUM_STEPS):
        params, opt_state, updates = jitted(params, opt_state, place_grads(index))
        state = clip_state(opt_state)
        norms.append(np.asarray(state.last_norm))
        thresholds.append(np.asarray(state.threshold))
        clipped.append(np.asarray(state.last_clipped))
        updates_by_step.append(flatten(updates))
        # Every field of the clip state is small and must sit whole on every device.
        replicated.append(
            all(
                leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == mesh_devices
                for leaf in jax.tree.leaves(state)
            )
        )
    return {
        "norm": np.stack(norms),
        "threshold": np.stack(thresholds),
        "clipped": np.stack(clipped),
        "updates": np.stack(updates_by_step),
        "params": flatten(params),
        "replicated": np.array(replicated),
        "clip_count": np.asarray(clip_state(opt_state).clip_count),
    }


def leaf_spec(name: str, layout: str) -> PartitionSpec:
    """How ``layout`` splits the parameter (and its gradient) called ``name``."""
    rank = len(LEAF_SHAPES[name])
    if layout == "fully_sharded":
        return PartitionSpec("devices") if rank >= 1 else PartitionSpec()
    if layout == "data_and_model":
        return {2: PartitionSpec("data", "model"), 1: PartitionSpec("model")}.get(
            rank, PartitionSpec()
        )
    raise ValueError(layout)


def main(output_path: str) -> None:
    devices = np.array(jax.devices())
    if devices.size != NUM_DEVICES:
        raise SystemExit(f"expected {NUM_DEVICES} devices, got {devices.size}")
    results: dict[str, StateArrays] = {}

    single = jax.devices()[0]
    results["reference"] = run(
        direct_step,
        lambda params: jax.device_put(params, single),
        lambda index: jax.device_put(summed(microbatch_gradients(index)), single),
        mesh_devices=1,
    )
    results["reference_microbatched"] = run(
        data_parallel_step,
        lambda params: jax.device_put(params, single),
        lambda index: jax.device_put(microbatch_gradients(index), single),
        mesh_devices=1,
    )

    meshes = {
        "fully_sharded": Mesh(devices, ("devices",)),
        "data_and_model": Mesh(devices.reshape(4, 2), ("data", "model")),
    }
    for layout, mesh in meshes.items():
        shardings = {name: NamedSharding(mesh, leaf_spec(name, layout)) for name in LEAF_SHAPES}
        results[layout] = run(
            direct_step,
            lambda params, s=shardings: jax.device_put(params, s),
            lambda index, s=shardings: jax.device_put(summed(microbatch_gradients(index)), s),
            mesh_devices=NUM_DEVICES,
        )

    # Data parallel: parameters replicated, each device holding its own gradient
    # contribution; the sum inside the step is the gradient all-reduce.
    data_mesh = Mesh(devices, ("data",))
    replicated = NamedSharding(data_mesh, PartitionSpec())
    per_device = NamedSharding(data_mesh, PartitionSpec("data"))
    results["data_parallel"] = run(
        data_parallel_step,
        lambda params: jax.device_put(params, replicated),
        lambda index: jax.device_put(microbatch_gradients(index), per_device),
        mesh_devices=NUM_DEVICES,
    )

    np.savez(
        output_path,
        **{
            f"{run_name}/{key}": value
            for run_name, arrays in results.items()
            for key, value in arrays.items()
        },
    )


if __name__ == "__main__":
    main(sys.argv[1])
