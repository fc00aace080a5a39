"""Extreme values and long runs: huge norms, overflow, saturation, x64, labels."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_adaptive_clip as oac

INT32_MAX = np.iinfo(np.int32).max
FLOAT32_MAX = float(np.finfo(np.float32).max)


def assert_no_nan(state):
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            assert not bool(jnp.isnan(leaf).any()), state


def test_complex_leaves_use_the_modulus():
    norm, _ = oac.global_norm([jnp.array([3.0 + 4.0j, 0.0])])
    assert float(norm) == pytest.approx(5.0)
    tx = oac.adaptive_clip(window=2, max_norm=1.0)
    grad = jnp.array([3.0 + 4.0j, 0.0 - 0.0j], jnp.complex64)
    out, _ = tx.update(grad, tx.init(grad))
    np.testing.assert_allclose(np.asarray(out), [0.6 + 0.8j, 0.0], rtol=1e-6)


@pytest.mark.parametrize("huge", [3e38, FLOAT32_MAX])
def test_huge_recorded_norm_keeps_statistics_finite(huge):
    tx = oac.adaptive_clip(window=3, min_history=2, max_norm=1.0)
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(2))
    for grad in ([huge, 0.0], [1.0, 0.0], [3.0, 4.0]):
        out, state = update(jnp.array(grad, jnp.float32), state)
        assert_no_nan(state)
    # The cap still applies after a huge norm entered the history.
    np.testing.assert_allclose(np.asarray(out), [0.6, 0.8], rtol=1e-6)
    mean, std = oac.history_mean_std(state.norms, state.count)
    assert np.isfinite(float(mean)) and not np.isnan(float(std))


def test_norm_beyond_float32_range_is_clipped_exactly_with_direction_kept():
    grad = jnp.array([3e38, -3e38, 1.0], jnp.float32)  # norm 4.2e38 > float32's max
    norm, has_nonfinite = oac.global_norm(grad)
    assert float(norm) == FLOAT32_MAX and not bool(has_nonfinite)
    tx = oac.adaptive_clip(window=2, max_norm=2.0)
    out, state = jax.jit(tx.update)(grad, tx.init(grad))
    np.testing.assert_allclose(np.asarray(out), [np.sqrt(2.0), -np.sqrt(2.0), 0.0], atol=1e-6)
    assert float(state.norms[0]) == FLOAT32_MAX
    bf16_out, _ = tx.update(grad.astype(jnp.bfloat16), tx.init(grad))
    np.testing.assert_allclose(np.asarray(bf16_out, np.float32)[:2], [1.414, -1.414], rtol=1e-2)


def test_tiny_threshold_over_large_norm_does_not_underflow_to_zero():
    tx = oac.adaptive_clip(window=2, max_norm=1e-21)
    out, _ = jax.jit(tx.update)(jnp.array([1e18, 0.0]), tx.init(jnp.zeros(2)))
    np.testing.assert_allclose(np.asarray(out), [1e-21, 0.0], rtol=1e-6)


def test_float64_values_beyond_float32_range_never_make_nan():
    with jax.enable_x64(True):
        tx = oac.adaptive_clip(window=2, min_history=2, max_norm=1.0)
        state = tx.init(jnp.zeros(2, jnp.float64))
        for grad in ([1e300, 1.0], [1.0, 0.0], [3.0, 4.0]):
            out, state = tx.update(jnp.array(grad, jnp.float64), state)
            assert_no_nan(state)
            if grad[0] == 1e300:
                # Counted as float32's largest value.
                assert float(state.last_norm) == FLOAT32_MAX
        np.testing.assert_allclose(np.asarray(out), [0.6, 0.8], rtol=1e-6)


@pytest.mark.parametrize(
    ("grad", "expected"),
    [
        ([1e39, 1e39], [0.5**0.5, 0.5**0.5]),
        ([1e300, 0.0], [1.0, 0.0]),
        ([1e300, 1e10], [1.0, 0.0]),
        # Both count as float32's largest value: their direction is not kept (documented).
        ([1e300, -5e299], [0.5**0.5, -(0.5**0.5)]),
    ],
)
def test_float64_values_beyond_float32_range_are_clipped_as_counted(grad, expected):
    # The norm counts them as float32's largest value; scaled as they were, a clipped
    # update used to keep a norm of 2.9 (and of 2.9e261 for 1e300) with max_norm=1.
    with jax.enable_x64(True):
        tx = oac.adaptive_clip(window=2, max_norm=1.0)
        out, _ = jax.jit(tx.update)(jnp.array(grad, jnp.float64), tx.init(jnp.zeros(2)))
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6, atol=1e-9)
        complex_grad = jnp.array(grad, jnp.float64) * (0.6 + 0.8j)
        out, _ = jax.jit(tx.update)(complex_grad, tx.init(complex_grad))
        assert np.linalg.norm(np.asarray(out)) == pytest.approx(1.0, rel=1e-6)
        np.testing.assert_allclose(np.asarray(out), np.array(expected) * (0.6 + 0.8j), atol=1e-6)


# The clippers that scale updates, each capped at a threshold of 1.
CAPPED_AT_ONE = {
    "adaptive_clip": lambda: oac.adaptive_clip(window=2, max_norm=1.0),
    "autoclip": lambda: oac.autoclip(window=2, max_norm=1.0),
    "zclip": lambda: oac.zclip(max_norm=1.0),
}


@pytest.mark.parametrize("make_clipper", CAPPED_AT_ONE.values(), ids=CAPPED_AT_ONE)
@pytest.mark.parametrize(
    ("grad", "expected"),
    [
        ([3e38 + 3e38j], [0.5 + 0.5j]),
        ([3e38 + 3e38j, 1.0], [0.5 + 0.5j, 0.0]),
        ([-3e38 + 2e38j, 1e30j], [-0.6 + 0.4j, 0.0]),  # |-3 + 2j| > 3.4: counted as 3.4
    ],
)
def test_complex64_moduli_beyond_float32_range_are_clipped_as_counted(make_clipper, grad, expected):
    # Their modulus overflows float32, so the norm counts it as float32's largest value;
    # scaled as it was, [3e38 + 3e38j] came out with modulus 1.25 for max_norm=1.
    tx = make_clipper()
    grad = jnp.array(grad, jnp.complex64)
    out, _ = jax.jit(tx.update)(grad, tx.init(grad))
    assert out.dtype == jnp.complex64
    assert np.linalg.norm(np.asarray(out, np.complex128)) == pytest.approx(1.0, rel=1e-6)
    direction = np.array(expected) / np.linalg.norm(expected)
    np.testing.assert_allclose(np.asarray(out), direction, atol=1e-6)


@pytest.mark.parametrize(
    ("norm_ord", "grad", "max_norm"),
    [(1, 1e20, 1e-19), (math.inf, 1e29, 1e-10), (2, 1e14, 1e-25), (2, 1e16, 1e-25)],
)
def test_threshold_far_below_a_norm_in_float32_range_scales_exactly(norm_ord, grad, max_norm):
    # threshold / norm below float32's normal range used to be flushed to 0 on the fast path;
    # the last case takes the careful path, which was exact already: both must agree.
    tx = oac.adaptive_clip(window=2, max_norm=max_norm, norm_ord=norm_ord)
    out, state = jax.jit(tx.update)(jnp.array([grad, 0.0]), tx.init(jnp.zeros(2)))
    assert bool(state.last_clipped)
    np.testing.assert_allclose(np.asarray(out), [max_norm, 0.0], rtol=1e-6)


def test_most_negative_integers_have_their_true_magnitude():
    norm, _ = oac.global_norm([jnp.array([-128], jnp.int8)], norm_ord=1)
    assert float(norm) == 128.0
    norm, _ = oac.global_norm([jnp.array([np.iinfo(np.int32).min], jnp.int32)], norm_ord=math.inf)
    assert float(norm) == 2.0**31


def test_python_scalar_leaves_are_arrays_to_every_clipper():
    for tx in (oac.adaptive_clip(window=2, max_norm=1.0), oac.zclip(max_norm=1.0)):
        out, _ = jax.jit(tx.update)({"a": 5.0, "b": jnp.zeros(2)}, tx.init({"a": 0.0}))
        assert float(out["a"]) == pytest.approx(1.0)
    assert float(oac.global_norm({"a": 3.0, "b": 4})[0]) == 5.0
    norms, _ = oac.history_push(jnp.zeros(2), jnp.array(0), 2.5)
    assert float(norms[0]) == 2.5


@pytest.mark.parametrize("alpha", [0.97, 0.5])
@pytest.mark.parametrize("huge", [3e38, 1e30])
def test_zclip_statistics_survive_huge_norms(huge, alpha):
    tx = oac.zclip(alpha=alpha, warmup_steps=2)
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(2))
    for grad in ([1.0, 0.0], [huge, huge], [1.0, 0.0], [2.0, 0.0], [huge, 0.0], [1.0, 1.0]):
        _, state = update(jnp.array(grad, jnp.float32), state)
        assert_no_nan(state)
    assert np.isfinite(float(state.mean)) and np.isfinite(float(state.var))


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
@pytest.mark.parametrize("make_clipper", CAPPED_AT_ONE.values(), ids=CAPPED_AT_ONE)
def test_float8_leaves_are_clipped_and_keep_their_dtype(make_clipper, dtype):
    # Eight-bit floats have no implicit promotion to float32 in JAX.
    tx = make_clipper()
    update = jax.jit(tx.update)
    grad = {"w": jnp.array([3.0, 4.0], dtype), "small": jnp.array([0.0, 0.0], dtype)}
    out, state = update(grad, tx.init(grad))
    assert out["w"].dtype == dtype and out["small"].dtype == dtype
    assert float(state.last_norm) == 5.0
    np.testing.assert_allclose(np.asarray(out["w"], np.float32), [0.6, 0.8], rtol=0.15)
    unclipped = {"w": jnp.array([0.5, 0.25], dtype), "small": jnp.array([0.0, 0.125], dtype)}
    out, _ = update(unclipped, state)
    chex.assert_trees_all_equal(out, unclipped)


@pytest.mark.skipif(not hasattr(jnp, "float8_e8m0fnu"), reason="no float8_e8m0fnu in this jax")
def test_float_formats_without_zero_are_rejected():
    # float8_e8m0fnu (a scale format) cannot hold 0: its NaN could not be imputed and
    # the norm, then the state, turned NaN.
    grad = {"w": jnp.array([2.0, 4.0], jnp.float8_e8m0fnu)}
    for tx in (oac.adaptive_clip(window=2), oac.autoclip(window=2), oac.zclip()):
        with pytest.raises(ValueError, match="`updates` holds a float8_e8m0fnu leaf"):
            jax.jit(tx.update)(grad, tx.init(grad))
    with pytest.raises(ValueError, match="`updates` holds a float8_e8m0fnu leaf"):
        oac.global_norm(grad)


def test_zclip_mean_of_norms_at_float32s_top_stays_finite_and_spikes_are_clipped_after():
    # At alpha=0.5 XLA folds alpha * mean + (1 - alpha) * norm into (mean + norm) / 2,
    # whose sum overflowed: an infinite mean let every later spike through.
    tx = oac.zclip(alpha=0.5, warmup_steps=2)
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(1))
    for norm in [3e38, 3.4e38, 3.4e38]:
        _, state = update(jnp.array([norm], jnp.float32), state)
        assert np.isfinite(float(state.mean)), float(state.mean)
    for _ in range(50):
        _, state = update(jnp.array([1.0], jnp.float32), state)
    out, state = update(jnp.array([1e30], jnp.float32), state)
    assert bool(state.last_clipped)
    assert float(out[0]) < 1e30


def test_zclip_spike_test_alone_decides_at_the_boundary():
    # A norm whose z-score rounds to exactly z_thresh: not a spike, so untouched,
    # even though it lies one rounding error above mean + z_thresh * (std + eps).
    tx = oac.zclip(warmup_steps=1)
    state = tx.init(jnp.zeros(1))._replace(
        count=jnp.int32(5),
        mean=jnp.float32(1.3306957483291626),
        var=jnp.float32(0.3443825840950012),
    )
    grad = jnp.array([2.7978012561798096], jnp.float32)
    out, after = jax.jit(tx.update)(grad, state)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(grad))
    assert not bool(after.last_clipped)


def test_counters_saturate_while_the_ring_keeps_turning():
    tx = oac.adaptive_clip(window=4, num_std=0.0)
    state = tx.init(jnp.zeros(2))._replace(
        norms=jnp.array([1.0, 2.0, 3.0, 4.0]),
        count=jnp.int32(INT32_MAX - 1),
        next_index=jnp.int32(3),
        clip_count=jnp.int32(INT32_MAX),
        nonfinite_count=jnp.int32(INT32_MAX),
    )
    update = jax.jit(tx.update)
    for value in (5.0, 6.0, 7.0):
        _, state = update(jnp.array([value, 0.0]), state)
    assert int(state.count) == INT32_MAX
    assert int(state.clip_count) == INT32_MAX
    # Oldest first: slot 3 got 5, then slots 0 and 1 got 6 and 7.
    np.testing.assert_allclose(np.asarray(state.norms), [6.0, 7.0, 3.0, 5.0])
    assert int(state.next_index) == 2
    _, state = update(jnp.array([jnp.nan, 0.0]), state)
    assert int(state.nonfinite_count) == INT32_MAX
    assert 0.0 <= float(oac.clip_stats(state)["clip_fraction"]) <= 1.0


def test_fractions_count_every_update():
    skip = oac.skip_on_spike(optax.sgd(0.1), window=2, num_std=0.0)
    state = skip.init(jnp.zeros(1))
    for grad in (1.0, 2.0, jnp.nan, 9.0):  # the NaN and the 9 are skipped
        _, state = skip.update(jnp.array([grad]), state)
    assert float(oac.clip_stats(state)["skip_fraction"]) == pytest.approx(2 / 4)

    zclip = oac.zclip(warmup_steps=2, skip_update_on_spike=True)
    state = zclip.init(jnp.zeros(1))
    for grad in (1.0, 1.1, 50.0, 60.0):  # both spikes clipped, neither folded in
        _, state = zclip.update(jnp.array([grad]), state)
    stats = oac.clip_stats(state)
    assert int(state.count) == 2 and int(stats["clip_count"]) == 2
    assert float(stats["clip_fraction"]) == pytest.approx(2 / 4)


def test_float64_hyperparameters_keep_the_state_float32():
    with jax.enable_x64(True):
        for tx in (
            oac.adaptive_clip(window=2, num_std=np.float64(1.0), max_norm=np.float64(5.0)),
            oac.zclip(alpha=np.float64(0.9), warmup_steps=1),
            optax.inject_hyperparams(oac.adaptive_clip, static_args=("window",))(window=2),
        ):
            params = jnp.zeros(2, jnp.float64)
            state = tx.init(params)
            dtypes = jax.tree.map(lambda leaf: leaf.dtype, state)

            def body(state, grad, tx=tx, params=params):
                return tx.update(grad, state, params)[1], None

            grads = jnp.arange(12, dtype=jnp.float64).reshape(6, 2)
            state, _ = jax.lax.scan(body, state, grads)
            assert jax.tree.map(lambda leaf: leaf.dtype, state) == dtypes


def test_single_clipper_under_multi_transform_carries_its_label():
    params = {"enc": jnp.zeros(2), "dec": jnp.zeros(2)}
    tx = optax.multi_transform(
        {"enc": oac.adaptive_clip(window=2), "dec": optax.sgd(0.1)}, {"enc": "enc", "dec": "dec"}
    )
    assert set(oac.clip_stats(tx.init(params))) == {
        "enc/norm",
        "enc/threshold",
        "enc/clipped",
        "enc/clip_count",
        "enc/clip_fraction",
        "enc/nonfinite_count",
        "enc/history_size",
    }


class _TwoClipStates(NamedTuple):
    encoder: Any
    decoder: Any


def test_labels_fall_back_to_indices_and_field_names():
    first = oac.adaptive_clip(window=2).init(jnp.zeros(1))
    second = oac.zclip().init(jnp.zeros(1))

    def norm_keys(state):
        return sorted(key for key in oac.clip_stats(state) if key.endswith("norm"))

    # Dict keys (multi_transform labels) when they tell the states apart...
    assert norm_keys({"first": first, "first_again": second}) == ["first/norm", "first_again/norm"]
    # ...else every key, index and field name on the path.
    assert norm_keys({"a": (first, second)}) == ["a/0/norm", "a/1/norm"]
    assert norm_keys((first, second)) == ["0/norm", "1/norm"]
    assert norm_keys(_TwoClipStates(first, second)) == ["decoder/norm", "encoder/norm"]


@pytest.mark.parametrize("norm_ord", [1, 2, 3, float("inf")])
@pytest.mark.parametrize("magnitude", [1e-25, 1e-12, 1e12, 1e30, 1e38])
def test_clipping_is_exact_across_float32_range(norm_ord, magnitude):
    grad = jnp.array([magnitude, -magnitude / 2, magnitude / 4], jnp.float32)
    norm, _ = oac.global_norm(grad, norm_ord)
    expected_norm = np.linalg.norm(np.asarray(grad, np.float64), ord=norm_ord)
    np.testing.assert_allclose(float(norm), min(expected_norm, FLOAT32_MAX), rtol=1e-5)
    cap = magnitude * 1e-3
    tx = oac.adaptive_clip(window=2, norm_ord=norm_ord, max_norm=cap)
    out, _ = jax.jit(tx.update)(grad, tx.init(grad))
    np.testing.assert_allclose(
        np.asarray(out, np.float64), np.asarray(grad, np.float64) * cap / expected_norm, rtol=1e-5
    )


def _update_norms(tx, grads):
    """Global norms of the updates ``tx`` returns for ``grads``, one step each."""
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(2))
    norms = []
    for grad in grads:
        out, state = update(jnp.asarray(grad, jnp.float32), state)
        assert_no_nan(state)
        norms.append(float(jnp.linalg.norm(out)))
    return np.array(norms)


def _noisy_norms(scale, num_steps, seed=0):
    rng = np.random.default_rng(seed)
    return [[scale * (1.0 + 0.1 * rng.standard_normal()), 0.0] for _ in range(num_steps)]


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: oac.adaptive_clip(min_history=4, num_std=2.0, record="clipped"),
        lambda: oac.skip_on_spike(optax.sgd(1.0), window=4),
        lambda: oac.zclip(),
    ],
    ids=["adaptive_clip-clipped", "skip_on_spike", "zclip"],
)
def test_clippers_that_record_their_clip_recover_from_a_history_of_zero_norms(make_tx):
    # A module whose gradient is 0 for its first steps (frozen, or a LoRA factor
    # next to a zero one) gives a threshold of 0; recording min(norm, 0) would hold
    # it there and zero every later update.
    norms = _update_norms(make_tx(), [[0.0, 0.0]] * 30 + _noisy_norms(5.0, 200))
    assert norms[-50:].mean() > 4.5


def test_zclip_skipping_spikes_takes_one_norm_after_a_warmup_of_zero_norms():
    # As documented: averages without spread take the first norm as it came (holding it
    # back as a spike would clip to 0 for good); from then on they have spread, and a
    # lasting rise is held back as spikes.
    alpha, z_thresh, eps = 0.97, 2.5, 1e-6
    tx = oac.zclip(alpha, z_thresh, warmup_steps=3, skip_update_on_spike=True, eps=eps)
    state = tx.init(jnp.zeros(1))
    for norm in [0.0] * 3 + [5.0] * 50:
        out, state = tx.update(jnp.array([norm]), state)
    assert int(state.count) == 4 and int(state.num_updates) == 53
    mean = (1 - alpha) * 5.0
    std = np.sqrt((1 - alpha) * (5.0 - mean) ** 2)
    z = (5.0 - mean) / (std + eps)
    np.testing.assert_allclose(float(state.mean), mean, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out), [mean + z_thresh * std * z_thresh / z], rtol=1e-5)


def test_clip_stats_counts_by_value():
    tx = oac.adaptive_clip(window=2, max_norm=1.0)
    state = tx.init(jnp.zeros(2))
    for grad in ([3.0, 4.0], [jnp.nan, 1.0], [6.0, 8.0], [0.3, 0.4]):
        _, state = tx.update(jnp.array(grad), state)
    stats = oac.clip_stats(state)
    assert (int(stats["clip_count"]), int(stats["nonfinite_count"])) == (2, 1)

    skipper = oac.skip_on_spike(optax.sgd(1.0), window=2, num_std=0.0)
    state = skipper.init(jnp.zeros(1))
    for grad in (1.0, 2.0, 9.0, jnp.inf, 1.0):
        _, state = skipper.update(jnp.array([grad]), state)
    stats = oac.clip_stats(state)
    # 9.0 is a spike and inf is not finite: both skipped; only inf counts as non-finite.
    assert (int(stats["skip_count"]), int(stats["nonfinite_count"])) == (2, 1)
    assert float(stats["skip_fraction"]) == pytest.approx(2 / 5)


def test_clipped_record_keeps_taking_norms_after_a_history_of_zero_norms():
    tx = oac.adaptive_clip(window=8, min_history=4, record="clipped")
    state = tx.init(jnp.zeros(2))
    for _ in range(4):
        _, state = tx.update(jnp.zeros(2), state)
    out, state = tx.update(jnp.array([3.0, 4.0]), state)
    # Clipped to the zero threshold once, but recorded as it came.
    assert float(state.threshold) == 0.0
    np.testing.assert_array_equal(np.asarray(out), [0.0, 0.0])
    assert float(state.norms[4]) == 5.0
    out, state = tx.update(jnp.array([3.0, 4.0]), state)
    assert float(state.threshold) > 0.0 and float(jnp.linalg.norm(out)) > 0.0


def test_clipped_record_follows_a_lasting_rise_through_the_std_headroom():
    # As documented: at num_std=1 the threshold barely follows a tenfold rise,
    # at num_std=2 it reaches the new level.
    grads = _noisy_norms(1.0, 100) + _noisy_norms(10.0, 400, seed=1)
    slow = _update_norms(oac.adaptive_clip(min_history=4, record="clipped"), grads)
    fast = _update_norms(oac.adaptive_clip(min_history=4, num_std=2.0, record="clipped"), grads)
    assert slow[-100:].mean() < 2.0
    assert fast[-100:].mean() > 9.0


@pytest.mark.parametrize(
    "options", [{}, {"clip_option": "mean"}, {"skip_update_on_spike": True}], ids=str
)
def test_zclip_treats_a_sudden_lasting_rise_as_spikes(options):
    # As documented: the rule clips a norm ten times its mean towards the mean, and
    # its averages only see what it applied.
    grads = _noisy_norms(1.0, 100) + _noisy_norms(10.0, 400, seed=1)
    norms = _update_norms(oac.zclip(**options), grads)
    assert norms[-100:].max() < 1.1


def test_autoclip_with_clipped_record_keeps_a_low_threshold_low():
    # As documented: every recorded norm is at most the percentile it was clipped to,
    # so after three zero norms the threshold stays far below the norms that follow;
    # the paper's record="raw" follows them.
    grads = [[0.0, 0.0]] * 3 + _noisy_norms(5.0, 1500)
    clipped = _update_norms(oac.autoclip(record="clipped"), grads)
    raw = _update_norms(oac.autoclip(), grads)
    assert clipped[-100:].max() < 0.01
    assert raw[-100:].mean() > 4.0


def test_clip_stats_of_states_stacked_by_scan():
    # history_size used to read the stacking axis (40 steps) as the window (8).
    tx = oac.adaptive_clip(window=8)

    def step(state, grad):
        _, state = tx.update(grad, state)
        return state, state

    grads = jnp.linspace(1.0, 2.0, 40)[:, None] * jnp.ones((40, 3))
    _, states = jax.lax.scan(step, tx.init(jnp.zeros(3)), grads)
    stats = oac.clip_stats(states)
    expected_sizes = np.minimum(np.arange(1, 41), 8)
    np.testing.assert_array_equal(np.asarray(stats["history_size"]), expected_sizes)
    assert stats["clip_fraction"].shape == (40,)
