"""One process of a two-process JAX run of ``chain(adaptive_clip, adam)`` over loopback.

``tests/test_distributed.py`` starts two of these (process ids 0 and 1) and
compares what process 0 saves with :func:`run_steps` run in a single process.

Usage::

    python tests/_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUTPUT.npz

Each process owns one CPU device and the half of every sharded leaf that lives
on it; the global norm therefore needs a cross-process all-reduce, done by the
CPU collectives (gloo over TCP).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import optax_adaptive_clip as oac

NUM_STEPS = 50
WINDOW = 8
LEARNING_RATE = 1e-2
NORMAL_SCALES = (1.0, 0.8, 1.2, 0.9, 1.1)
SPIKE_STEPS = (11, 12, 30, 41)
SPIKE_SCALE = 25.0
# The leading dimension of every non-scalar leaf is split between the processes.
LEAF_SHAPES: dict[str, tuple[int, ...]] = {"w": (32, 8), "b": (16,), "v": (8, 4), "gain": ()}
# Bounded waits: a missing peer makes the run fail instead of hanging.
INIT_TIMEOUT_SECONDS = 60
HEARTBEAT_TIMEOUT_SECONDS = 30

PlaceLeaf = Callable[[str, np.ndarray], jax.Array]


def make_optimizer() -> optax.GradientTransformation:
    return optax.chain(oac.adaptive_clip(window=WINDOW), optax.adam(LEARNING_RATE))


def initial_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in LEAF_SHAPES.items()}


def gradients(step: int) -> dict[str, np.ndarray]:
    """Step ``step``'s whole gradient; the scales keep clip decisions far from the threshold."""
    rng = np.random.default_rng(1000 + step)
    scale = SPIKE_SCALE if step in SPIKE_STEPS else NORMAL_SCALES[step % len(NORMAL_SCALES)]
    return {
        name: (scale * rng.normal(size=shape)).astype(np.float32)
        for name, shape in LEAF_SHAPES.items()
    }


def to_host(tree: Any) -> Any:
    """Whole values as numpy arrays, gathered from every process when there are several."""
    if jax.process_count() > 1:
        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


def flatten(tree: Any) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree.leaves(tree)])


def run_steps(place_leaf: PlaceLeaf) -> dict[str, np.ndarray]:
    """``NUM_STEPS`` jitted steps over leaves placed by ``place_leaf``."""
    optimizer = make_optimizer()

    def place(tree: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {name: place_leaf(name, value) for name, value in tree.items()}

    @jax.jit
    def step(params: Any, opt_state: Any, grads: Any) -> tuple[Any, Any, Any]:
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, updates

    params = place(initial_params())
    opt_state = jax.jit(optimizer.init)(params)
    norms, thresholds, clipped, clip_counts, updates_by_step = [], [], [], [], []
    for index in range(NUM_STEPS):
        params, opt_state, updates = step(params, opt_state, place(gradients(index)))
        clip_state = to_host(opt_state[0])
        norms.append(clip_state.last_norm)
        thresholds.append(clip_state.threshold)
        clipped.append(clip_state.last_clipped)
        # Logged as the README's multi-host recipe does.
        clip_counts.append(to_host(oac.clip_stats(opt_state))["clip_count"])
        updates_by_step.append(flatten(to_host(updates)))
    return {
        "norm": np.stack(norms),
        "threshold": np.stack(thresholds),
        "clipped": np.stack(clipped),
        "clip_count": np.stack(clip_counts),
        "updates": np.stack(updates_by_step),
        "params": flatten(to_host(params)),
    }


def run_single_process() -> dict[str, np.ndarray]:
    """The reference: every leaf whole on this process's default device."""
    return run_steps(lambda name, value: jax.device_put(value))


def run_multi_process(process_id: int, num_processes: int, port: int) -> dict[str, np.ndarray]:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=INIT_TIMEOUT_SECONDS,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_SECONDS,
    )
    mesh = Mesh(np.array(jax.devices()), ("hosts",))
    split = NamedSharding(mesh, PartitionSpec("hosts"))
    whole = NamedSharding(mesh, PartitionSpec())

    def place_leaf(name: str, value: np.ndarray) -> jax.Array:
        if value.ndim == 0:
            # A replicated leaf: every process passes the whole value.
            return jax.make_array_from_process_local_data(whole, value, value.shape)
        rows = value.shape[0] // num_processes
        local_rows = value[process_id * rows : (process_id + 1) * rows]
        return jax.make_array_from_process_local_data(split, local_rows, value.shape)

    try:
        return run_steps(place_leaf)
    finally:
        jax.distributed.shutdown()


def main(argv: list[str]) -> None:
    process_id, num_processes, port = (int(argument) for argument in argv[:3])
    results = run_multi_process(process_id, num_processes, port)
    if process_id == 0:
        np.savez(argv[3], **results)


if __name__ == "__main__":
    main(sys.argv[1:])
