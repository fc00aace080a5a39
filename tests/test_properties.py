"""Property tests: invariants of every history-based clipper on random norm sequences."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_adaptive_clip as oac

CLIPPERS = {
    "adaptive": functools.partial(oac.adaptive_clip, window=6, min_history=3),
    "adaptive_clipped": functools.partial(oac.adaptive_clip, window=4, record="clipped"),
    "autoclip": functools.partial(oac.autoclip, percentile=25.0, window=6),
    "zclip": functools.partial(oac.zclip, warmup_steps=3),
}

# Compiled once per clipper, shared by every example hypothesis draws.
_UPDATES = {name: jax.jit(make().update) for name, make in CLIPPERS.items()}

norm_values = st.one_of(
    st.floats(min_value=0.0, max_value=1e3),
    st.floats(min_value=1e3, max_value=1e12),  # spikes
    st.just(0.0),
)
directions = st.lists(
    st.floats(min_value=-1.0, max_value=1.0, allow_subnormal=False), min_size=4, max_size=4
)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(CLIPPERS)),
    steps=st.lists(st.tuples(norm_values, directions), min_size=1, max_size=14),
)
def test_invariants(name, steps):
    tx = CLIPPERS[name]()
    update = _UPDATES[name]
    state = tx.init(jnp.zeros(4))
    shapes = jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), state)
    for norm, raw_direction in steps:
        direction = np.asarray(raw_direction, np.float32)
        length = np.linalg.norm(direction)
        grad = direction / length * norm if length > 1e-3 else np.zeros(4, np.float32)
        grad = jnp.asarray(grad, jnp.float32)
        out, state = update(grad, state)
        out_norm = float(jnp.linalg.norm(out))
        in_norm = float(jnp.linalg.norm(grad))
        # Never NaN from finite input, in the output or the state.
        assert np.all(np.isfinite(np.asarray(out)))
        assert not any(bool(jnp.isnan(leaf).any()) for leaf in jax.tree.leaves(state))
        # Post-clip norm never exceeds the threshold beyond rounding, nor the input norm.
        assert out_norm <= float(state.threshold) * (1 + 1e-5) + 1e-30
        assert out_norm <= in_norm * (1 + 1e-6) + 1e-30
        # Direction kept: the output is a non-negative multiple of the input.
        if out_norm > 0:
            cosine = float(jnp.vdot(out, grad)) / (out_norm * in_norm)
            assert cosine > 1 - 1e-5
        # Passing through means bit-identical.
        if not bool(state.last_clipped):
            np.testing.assert_array_equal(np.asarray(out), np.asarray(grad))
        # State shapes and dtypes never change.
        assert jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), state) == shapes
