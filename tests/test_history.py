"""Statistics over the ring buffer of norms against float64 NumPy; the ring updated in place."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_adaptive_clip as oac
from optax_adaptive_clip._clipping import record_norm

FLOAT32_MAX = float(np.finfo(np.float32).max)
SMALLEST_NORMAL = float(np.finfo(np.float32).tiny)
# XLA:CPU reads subnormal float32 values as 0, so the strategies leave them out.
finite_norms = st.floats(0.0, FLOAT32_MAX, width=32, allow_subnormal=False)


def history_of(norms: list[float], window: int) -> np.ndarray:
    """A history as the clippers build it: the newest ``window`` norms, then zeros."""
    kept = norms[-window:]
    history = np.zeros(window, np.float32)
    history[: len(kept)] = kept
    return history


def assert_matches_float64(norms: list[float], window: int) -> None:
    valid = np.asarray(norms[-window:], np.float32).astype(np.float64)
    mean, std = oac.history_mean_std(
        jnp.asarray(history_of(norms, window)), jnp.array(len(norms), jnp.int32)
    )
    expected_mean = valid.mean() if valid.size else 0.0
    expected_std = valid.std(ddof=1) if valid.size > 1 else 0.0
    # The float32 sum and the rounding of the mean bound the errors; results
    # below float32's smallest normal value may be flushed to zero.
    np.testing.assert_allclose(float(mean), expected_mean, rtol=1e-5, atol=SMALLEST_NORMAL)
    tolerance = 1e-5 * expected_mean + 1e-4 * expected_std + SMALLEST_NORMAL
    assert abs(float(std) - expected_std) <= tolerance


@settings(max_examples=200, deadline=None)
@given(norms=st.lists(finite_norms, max_size=40), window=st.sampled_from([2, 7, 32]))
def test_mean_std_matches_float64_across_float32_range(norms, window):
    assert_matches_float64(norms, window)


@pytest.mark.parametrize(
    "norms",
    [
        [FLOAT32_MAX, FLOAT32_MAX, 3e38, 1.0],  # the sum overflows float32
        [FLOAT32_MAX] * 32,
        [1e-30, 1e30, 5.0],
        [2e-38, 4e-38, 3e-38],  # just above float32's smallest normal value
        [0.0, 0.0, 0.0],
        [0.0, 2.0, 0.0],  # recorded zeros are valid norms, unlike the unfilled slots
        [7.0],
        [],
    ],
    ids=str,
)
@pytest.mark.parametrize("window", [4, 32])
def test_mean_std_at_the_edges(norms, window):
    assert_matches_float64(norms, window)


def test_mean_std_keeps_a_small_spread_around_a_large_mean():
    norms = list(1e3 + np.linspace(-1e-2, 1e-2, 64))
    assert_matches_float64(norms, 64)


@pytest.mark.parametrize("window", [7, 65536, 100003])
@pytest.mark.parametrize("filled", [0.3, 1.7])  # part of the ring, or wrapped around it
def test_mean_std_over_long_and_odd_windows(window, filled):
    rng = np.random.default_rng(window)
    norms = list(rng.lognormal(0.0, 3.0, size=int(filled * window)).astype(np.float32))
    assert_matches_float64(norms, window)
    # Norms near float32's max overflow the plain sum: the scaled fallback takes over.
    assert_matches_float64([FLOAT32_MAX] * 3 + norms[:3], window)


@pytest.mark.parametrize("record", ["raw", "clipped"])
@pytest.mark.parametrize("threshold", [0.0, 2e-38, 3.0, FLOAT32_MAX, np.inf, np.nan], ids=str)
def test_recorded_norm_is_exact_whatever_the_threshold(record, threshold):
    state = oac.adaptive_clip(window=4).init(jnp.zeros(1))
    for norm in [0.0, 1.5e-38, 2.5, 7.0, FLOAT32_MAX]:
        history = record_norm(
            state, jnp.float32(norm), jnp.float32(threshold), record=record, recordable=True
        )
        recorded = np.asarray(history.norms)[0]
        # A NaN threshold (an injected NaN hyperparameter) never enters the history,
        # nor does a threshold of 0 (from a history of zero norms).
        takes_norm = record == "raw" or np.isnan(threshold) or threshold == 0.0
        expected = norm if takes_norm else min(norm, threshold)
        assert recorded == np.float32(expected), (norm, recorded)


@pytest.mark.parametrize("window", [4, 2048])
def test_unfilled_slots_stay_zero_and_statistics_ignore_them(window):
    tx = oac.adaptive_clip(window=window, min_history=2)
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(2))
    norms = [5.0, 1.0, 3.0]
    for norm in norms:
        _, state = update(jnp.array([norm, 0.0]), state)
    np.testing.assert_array_equal(np.asarray(state.norms[len(norms) :]), 0.0)
    mean, std = oac.history_mean_std(state.norms, state.count)
    np.testing.assert_allclose(float(mean), np.mean(norms), rtol=1e-6)
    np.testing.assert_allclose(float(std), np.std(norms, ddof=1), rtol=1e-6)


@pytest.mark.parametrize(
    "make_clipper",
    [
        lambda window: oac.adaptive_clip(window=window),
        lambda window: oac.adaptive_clip(window=window, record="clipped"),
        lambda window: optax.inject_hyperparams(oac.adaptive_clip, static_args="window")(
            window=window, num_std=2.0
        ),
        lambda window: oac.skip_on_spike(optax.identity(), window=window),
    ],
    ids=["raw", "clipped", "inject_hyperparams", "skip_on_spike"],
)
def test_long_history_is_updated_in_place(make_clipper):
    window = 65536
    tx = make_clipper(window)
    grads = jnp.zeros(10, jnp.float32)
    step = jax.jit(tx.update, donate_argnums=(0, 1))
    compiled = step.lower(grads, tx.init(grads)).compile()
    # Were the history written before the statistics have read it, XLA would copy it.
    assert not re.search(rf"f32\[{window}\]\{{0\}} copy\(", compiled.as_text())
    # One window-sized buffer holds the masked deviations.
    assert compiled.memory_analysis().temp_size_in_bytes < 4 * window + 2**15
