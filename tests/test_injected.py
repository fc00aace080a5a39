"""Injected hyperparameters: values no check sees under ``jit`` still keep the contract.

Under ``optax.inject_hyperparams`` a hyperparameter reaches the factory as a tracer,
so the construction-time checks cannot see it. Whatever its value (NaN, inf, out of
range), updates must never be reversed or enlarged and the state must never hold NaN.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_adaptive_clip as oac

# Valid starting values of every numeric hyperparameter, so that each is injected.
_CAPS = {"norm_ord": 2.0, "max_norm": 100.0}
_RING = {**_CAPS, "window": 4, "min_history": 2, "warmup_max_norm": 10.0}
INJECTED = {
    "adaptive_clip": (oac.adaptive_clip, ("window",), {**_RING, "num_std": 1.0}),
    "adaptive_clip_clipped": (
        functools.partial(oac.adaptive_clip, record="clipped"),
        ("window",),
        {**_RING, "num_std": 1.0},
    ),
    "autoclip": (oac.autoclip, ("window",), {**_RING, "percentile": 50.0, "min_history": 1}),
    "zclip": (
        oac.zclip,
        (),
        {**_CAPS, "alpha": 0.9, "z_thresh": 2.0, "warmup_steps": 2, "eps": 1e-6},
    ),
    "skip_on_spike": (
        functools.partial(oac.skip_on_spike, optax.identity()),
        ("window",),
        {**_CAPS, "window": 4, "min_history": 2, "num_std": 2.0},
    ),
}


def _injected(name):
    factory, static_args, kwargs = INJECTED[name]
    tx = optax.inject_hyperparams(factory, static_args=static_args)(**kwargs)
    return tx, jax.jit(tx.update)


# Built and compiled once per clipper; the injected values are state, not constants.
_TRANSFORMS = {name: _injected(name) for name in INJECTED}

any_value = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -1.0, 1e-30, 0.5, 1.0, 150.0, 1e30]),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
)


def _state_arrays(state):
    """Every float array of ``state`` but the injected hyperparameters themselves."""
    kept = state._replace(hyperparams={}, hyperparams_states={})
    return [leaf for leaf in jax.tree.leaves(kept) if jnp.issubdtype(leaf.dtype, jnp.floating)]


@settings(max_examples=80, deadline=None)
@given(
    name=st.sampled_from(sorted(INJECTED)),
    values=st.dictionaries(st.sampled_from(["a", "b", "c", "d", "e", "f"]), any_value),
    norms=st.lists(st.sampled_from([0.0, 1.0, 2.0, 3.0, 50.0, 1e20]), min_size=1, max_size=8),
)
def test_no_injected_value_reverses_an_update_or_puts_nan_in_the_state(name, values, norms):
    tx, update = _TRANSFORMS[name]
    state = tx.init(jnp.zeros(2))
    numeric = sorted(state.hyperparams)
    for key, value in values.items():
        hyperparameter = numeric["abcdef".index(key) % len(numeric)]
        old = state.hyperparams[hyperparameter]
        state.hyperparams[hyperparameter] = jnp.asarray(value).astype(old.dtype)
    direction = np.array([0.6, -0.8], np.float32)
    for norm in norms:
        grad = jnp.asarray(direction * norm)
        out, state = update(grad, state)
        out = np.asarray(out)
        assert np.all(np.isfinite(out)), (values, out)
        for leaf in _state_arrays(state):
            assert not bool(jnp.isnan(leaf).any()), (values, state)
        # Never reversed, never enlarged: a multiple in [0, 1] of the gradient.
        out_norm = float(np.linalg.norm(out.astype(np.float64)))
        assert out_norm <= norm * (1 + 1e-6), (values, out, norm)
        if out_norm > 0:
            cosine = float(out.astype(np.float64) @ direction) / out_norm
            assert cosine > 1 - 1e-5, (values, out, norm)


@pytest.mark.parametrize(
    ("name", "field", "minimum"),
    [
        ("adaptive_clip", "min_history", 2),
        ("skip_on_spike", "min_history", 2),
        ("autoclip", "min_history", 1),
        ("zclip", "warmup_steps", 1),
    ],
)
@pytest.mark.parametrize("value", [0, -5])
def test_injected_counts_below_their_minimum_act_as_the_minimum(name, field, minimum, value):
    """A min_history of 0 used to take statistics of an empty history: a threshold of 0."""
    factory, static_args, kwargs = INJECTED[name]
    below = optax.inject_hyperparams(factory, static_args=static_args)(**kwargs)
    at_minimum = optax.inject_hyperparams(factory, static_args=static_args)(
        **{**kwargs, field: minimum}
    )
    state, expected_state = below.init(jnp.zeros(2)), at_minimum.init(jnp.zeros(2))
    state.hyperparams[field] = jnp.asarray(value, state.hyperparams[field].dtype)
    for norm in (3.0, 3.1, 2.9, 30.0, 3.0):
        grad = jnp.array([norm, 0.0])
        out, state = jax.jit(below.update)(grad, state)
        expected, expected_state = jax.jit(at_minimum.update)(grad, expected_state)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


@pytest.mark.parametrize("name", ["adaptive_clip", "skip_on_spike"])
def test_injected_nan_num_std_is_no_threshold(name):
    """A NaN num_std made a NaN threshold, which counts as none, into num_std=0: the mean."""
    tx, update = _TRANSFORMS[name]
    state = tx.init(jnp.zeros(2))
    for norm in (1.0, 1.1, 0.9):
        _, state = update(jnp.array([norm, 0.0]), state)
    state.hyperparams["num_std"] = jnp.asarray(jnp.nan, state.hyperparams["num_std"].dtype)
    grad = jnp.array([1.05, 0.0])  # above the mean of 1.0, as every other norm is
    out, state = update(grad, state)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(grad))
    # No threshold of its own: only the cap applies.
    assert float(state.inner_state.threshold) == _CAPS["max_norm"]


def test_an_eager_update_checks_injected_values_as_the_constructor_does():
    """Outside jit the factory sees numbers; only a jitted update has to make them harmless."""
    tx, update = _TRANSFORMS["adaptive_clip"]
    state = tx.init(jnp.zeros(2))
    state.hyperparams["num_std"] = jnp.asarray(-1.0, state.hyperparams["num_std"].dtype)
    with pytest.raises(ValueError, match="`num_std` must be in"):
        tx.update(jnp.ones(2), state)
    out, _ = update(jnp.ones(2), state)
    np.testing.assert_array_equal(np.asarray(out), np.ones(2))


@pytest.mark.parametrize("alpha", [-1.0, 5.0])
def test_injected_alpha_outside_zero_one_keeps_zclips_averages_finite(alpha):
    """Before the averages were clipped, such an alpha grew the mean to inf within steps."""
    tx, update = _TRANSFORMS["zclip"]
    state = tx.init(jnp.zeros(2))
    state.hyperparams["alpha"] = jnp.asarray(alpha, state.hyperparams["alpha"].dtype)
    for norm in [1.0, 2.0, 1.0, 2.0] * 20:
        _, state = update(jnp.array([norm, 0.0]), state)
        assert np.isfinite(float(state.inner_state.mean)), float(state.inner_state.mean)
        assert np.isfinite(float(state.inner_state.var)), float(state.inner_state.var)
