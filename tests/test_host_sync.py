"""The clippers never talk to the host: no transfers, no callbacks, one compilation.

A training step that synchronises with the host every update stalls the
accelerator; one that retraces recompiles. These tests pin both down for every
clipper in the library, driven through many steps with spikes and non-finite
gradients so that every branch of the update is taken.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend import core as jax_core

import optax_adaptive_clip as oac

NUM_STEPS = 200
# Every SPIKE_PERIOD-th gradient is scaled up by SPIKE_FACTOR; one step is NaN.
SPIKE_PERIOD = 17
SPIKE_FACTOR = 50.0
NAN_STEP = 101
LEARNING_RATE = 1e-3

OptimizerFactory = Callable[[], optax.GradientTransformation]

# Small windows and warm-ups so that the statistics are in use long before step 200.
OPTIMIZERS: dict[str, OptimizerFactory] = {
    "adaptive_clip": lambda: optax.chain(oac.adaptive_clip(window=16), optax.adam(LEARNING_RATE)),
    "autoclip": lambda: optax.chain(oac.autoclip(window=16), optax.adam(LEARNING_RATE)),
    "zclip": lambda: optax.chain(oac.zclip(warmup_steps=10), optax.adam(LEARNING_RATE)),
    "skip_on_spike": lambda: oac.skip_on_spike(optax.adam(LEARNING_RATE), window=16, num_std=3.0),
}


def make_params() -> dict[str, jax.Array]:
    return {
        "dense": {"kernel": jnp.ones((8, 4), jnp.float32), "bias": jnp.zeros((4,), jnp.float32)},
        "embedding": jnp.full((5, 3), 0.5, jnp.float32),
    }


def gradient_sequence(params: Any, num_steps: int) -> list[Any]:
    """Noisy gradients with regular spikes and one NaN step, already on the device."""
    rng = np.random.default_rng(0)
    sequence = []
    for step in range(num_steps):
        factor = SPIKE_FACTOR if step % SPIKE_PERIOD == SPIKE_PERIOD - 1 else 1.0
        grads = jax.tree.map(
            lambda leaf, f=factor: f * rng.normal(size=leaf.shape).astype(np.float32), params
        )
        if step == NAN_STEP:
            grads["embedding"][0, 0] = np.nan
        sequence.append(jax.device_put(grads))
    return jax.block_until_ready(sequence)


def make_step(
    optimizer: optax.GradientTransformation,
) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    def step(params: Any, opt_state: Any, grads: Any) -> tuple[Any, Any]:
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def events_seen(opt_state: Any) -> int:
    """Clips or skips recorded so far: shows that the spikes did take the clipping branch."""
    stats = jax.device_get(oac.clip_stats(opt_state))
    return int(stats.get("clip_count", stats.get("skip_count", 0)))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_steps_run_with_device_to_host_transfers_disallowed(name: str) -> None:
    optimizer = OPTIMIZERS[name]()
    params = jax.device_put(make_params())
    opt_state = jax.device_put(optimizer.init(params))
    gradients = gradient_sequence(params, NUM_STEPS)
    step = jax.jit(make_step(optimizer))

    # The first call traces and compiles under the guard too: a constant built on the host
    # during tracing is embedded in the program, not transferred.
    with jax.transfer_guard("disallow"):
        for grads in gradients:
            params, opt_state = step(params, opt_state, grads)
        jax.block_until_ready((params, opt_state))

    assert events_seen(opt_state) > 0
    finite = jax.tree.map(lambda leaf: bool(jnp.all(jnp.isfinite(leaf))), params)
    assert all(jax.tree.leaves(finite)), "a NaN gradient leaked into the parameters"


def test_transfer_guard_catches_host_inputs() -> None:
    """Negative control: the guard is active and catches a gradient left on the host.

    On the CPU backend device arrays live in host memory, so reading one back
    (``float(norm)``) is not a transfer and the guard cannot see it; the jaxpr
    test below is what rules out callbacks to the host on every backend.
    """
    optimizer = OPTIMIZERS["adaptive_clip"]()
    params = jax.device_put(make_params())
    opt_state = jax.device_put(optimizer.init(params))
    host_grads = jax.tree.map(np.asarray, params)
    step = jax.jit(make_step(optimizer))
    with jax.transfer_guard("disallow"), pytest.raises(Exception, match=r"[Dd]isallowed"):
        step(params, opt_state, host_grads)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_traced_and_compiled_once_over_many_steps(name: str) -> None:
    optimizer = OPTIMIZERS[name]()
    params = make_params()
    # init runs eagerly, outside jit: its arrays must already have the dtypes and weak
    # types the update returns, or the second call would retrace.
    opt_state = optimizer.init(params)
    gradients = gradient_sequence(params, 60)

    traced_step = chex.assert_max_traces(make_step(optimizer), n=1)
    step = jax.jit(traced_step)
    for grads in gradients:
        params, opt_state = step(params, opt_state, grads)
    jax.block_until_ready(params)
    assert step._cache_size() == 1  # One compiled executable.
    chex.clear_trace_counter()


def iter_primitive_names(jaxpr: jax_core.Jaxpr) -> Iterator[str]:
    """Names of every primitive in ``jaxpr`` and in any jaxpr nested in its equations
    (cond branches, scan and while bodies, pjit, custom_jvp/vjp rules, ...)."""
    for equation in jaxpr.eqns:
        yield equation.primitive.name
        for parameter in equation.params.values():
            yield from _primitives_in_parameter(parameter)


def _primitives_in_parameter(parameter: Any) -> Iterator[str]:
    if isinstance(parameter, jax_core.ClosedJaxpr):
        yield from iter_primitive_names(parameter.jaxpr)
    elif isinstance(parameter, jax_core.Jaxpr):
        yield from iter_primitive_names(parameter)
    elif isinstance(parameter, tuple | list):
        for item in parameter:
            yield from _primitives_in_parameter(item)


def host_interacting_primitives(function: Callable[..., Any], *args: Any) -> set[str]:
    closed = jax.make_jaxpr(function)(*args)
    return {
        name for name in iter_primitive_names(closed.jaxpr) if "callback" in name or "debug" in name
    }


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_update_has_no_callbacks_or_debug_primitives(name: str) -> None:
    optimizer = OPTIMIZERS[name]()
    params = make_params()
    opt_state = optimizer.init(params)
    grads = gradient_sequence(params, 1)[0]
    assert host_interacting_primitives(make_step(optimizer), params, opt_state, grads) == set()


def test_primitive_walk_finds_callbacks_nested_in_cond() -> None:
    """Negative control: the walk does reach into sub-jaxprs."""

    def noisy(x: jax.Array) -> jax.Array:
        def report(value: jax.Array) -> jax.Array:
            jax.debug.print("x = {}", value)
            return value

        return jax.lax.cond(x.sum() > 0, report, lambda value: value, x)

    found = host_interacting_primitives(noisy, jnp.ones(3))
    assert any("callback" in name or "debug" in name for name in found)
