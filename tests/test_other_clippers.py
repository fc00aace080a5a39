"""autoclip, zclip and skip_on_spike against NumPy models of their papers' rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference_models import AutoClipper, SpikeSkipper, ZClipper, norm_sequence
from test_adaptive_clip import vector_with_norm

import optax_adaptive_clip as oac


def run_against(model, tx, norms):
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(5))
    for step, norm in enumerate(norms):
        expected_threshold, expected_scale = model.step(norm)
        out, state = update(vector_with_norm(norm, seed=step), state)
        np.testing.assert_allclose(
            float(state.threshold), expected_threshold, rtol=5e-5, err_msg=f"step {step}"
        )
        np.testing.assert_allclose(
            float(jnp.linalg.norm(out)), norm * expected_scale, rtol=5e-5, err_msg=f"step {step}"
        )
    return state


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(("percentile", "window"), [(10.0, 1000), (50.0, 7), (90.0, 16)])
def test_autoclip_matches_numpy_percentile(percentile, window, seed):
    norms = norm_sequence(np.random.default_rng(seed), length=60)
    run_against(AutoClipper(percentile, window), oac.autoclip(percentile, window), norms)


def test_autoclip_hand_example():
    # Norms 4, 1, 3: the 50th percentile of {4, 1, 3} is 3, so 4 passes (it is first:
    # the percentile of {4} is 4), 1 passes, and 3 passes; then 10 is clipped to 3.5.
    tx = oac.autoclip(percentile=50.0, window=10)
    state = tx.init(jnp.zeros(1))
    for norm in (4.0, 1.0, 3.0):
        out, state = tx.update(jnp.array([norm]), state)
        assert not bool(state.last_clipped)
    out, state = tx.update(jnp.array([10.0]), state)
    np.testing.assert_allclose(np.asarray(out), [3.5])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"alpha": 0.9, "z_thresh": 1.5, "warmup_steps": 5},
        {"clip_option": "mean", "warmup_steps": 5},
        {"skip_update_on_spike": True, "warmup_steps": 5, "z_thresh": 2.0},
    ],
)
def test_zclip_matches_numpy_model(options, seed):
    norms = norm_sequence(np.random.default_rng(seed), length=80, spike_every=5)
    state = run_against(ZClipper(**options), oac.zclip(**options), norms)
    assert int(state.clip_count) > 0


def test_zclip_hand_example():
    tx = oac.zclip(warmup_steps=4)
    state = tx.init(jnp.zeros(1))
    for norm in (1.0, 2.0, 1.0, 2.0):
        out, state = tx.update(jnp.array([norm]), state)
        assert not bool(state.last_clipped)
    np.testing.assert_allclose([float(state.mean), float(state.var)], [1.5, 0.25])
    out, state = tx.update(jnp.array([4.0]), state)
    # z = 5 > 2.5: clipped to 1.5 + 2.5 * 0.5 / (5 / 2.5) = 2.125, which feeds the EMA.
    np.testing.assert_allclose(np.asarray(out), [2.125], rtol=1e-5)
    np.testing.assert_allclose(float(state.mean), 0.97 * 1.5 + 0.03 * 2.125, rtol=1e-6)


def test_zclip_max_norm_caps_during_warmup():
    tx = oac.zclip(warmup_steps=10, max_norm=1.0)
    out, state = tx.update(jnp.array([3.0, 4.0]), tx.init(jnp.zeros(2)))
    np.testing.assert_allclose(np.asarray(out), [0.6, 0.8], rtol=1e-6)
    # The warmup statistics still see the raw norm.
    np.testing.assert_allclose(float(state.mean), 5.0)


@pytest.mark.parametrize(
    "options",
    [{}, {"record": "raw"}, {"max_norm": 3.0}, {"record": "raw", "max_norm": 3.0}],
    ids=str,
)
def test_skip_on_spike_leaves_inner_state_untouched(options):
    inner = optax.adam(0.1)
    tx = oac.skip_on_spike(inner, window=8, num_std=3.0, **options)
    update = jax.jit(tx.update)
    params = jnp.zeros(5)
    state = tx.init(params)
    norms = norm_sequence(np.random.default_rng(0), length=60, spike_every=6)
    model = SpikeSkipper(window=8, num_std=3.0, **options)
    skipped_steps = 0
    for step, norm in enumerate(norms):
        expected_threshold, expected_skip = model.step(norm)
        before = state.inner_state
        out, state = update(vector_with_norm(norm, seed=step), state, params)
        np.testing.assert_allclose(float(state.threshold), expected_threshold, rtol=5e-5)
        assert bool(state.last_skipped) == expected_skip, f"step {step}"
        if expected_skip:
            skipped_steps += 1
            np.testing.assert_array_equal(np.asarray(out), np.zeros(5))
            jax.tree.map(np.testing.assert_array_equal, state.inner_state, before)
    assert skipped_steps > 0
    assert int(state.skip_count) == skipped_steps
    # Adam's own step count saw only the steps that were not skipped.
    assert int(state.inner_state[0].count) == len(norms) - skipped_steps
    assert float(oac.clip_stats(state)["skip_fraction"]) == pytest.approx(
        skipped_steps / len(norms)
    )


def test_skip_on_spike_skips_nonfinite_and_passes_extra_args():
    seen = []

    def record_extra_args(updates, state, params=None, *, loss=None):
        seen.append(loss)
        return updates, state

    inner = optax.GradientTransformationExtraArgs(lambda params: (), record_extra_args)
    tx = oac.skip_on_spike(inner, window=4)
    state = tx.init(jnp.zeros(2))
    out, state = tx.update(jnp.array([1.0, 2.0]), state, loss=3.0)
    np.testing.assert_array_equal(np.asarray(out), [1.0, 2.0])
    assert seen and set(seen) == {3.0}  # traced more than once, always with the loss given
    out, state = tx.update(jnp.array([jnp.nan, 2.0]), state, loss=4.0)
    np.testing.assert_array_equal(np.asarray(out), [0.0, 0.0])
    assert int(state.skip_count) == 1 and int(state.nonfinite_count) == 1
    assert int(state.count) == 1  # the NaN gradient's norm was not recorded


def test_skip_on_spike_keeps_the_values_of_a_state_whose_dtype_the_inner_step_changes():
    # optax.adam returns the first moment of an integer parameter as float32.
    params = {"weights": jnp.ones(3), "steps": jnp.array([1, 2], jnp.int32)}
    tx = oac.skip_on_spike(optax.adam(0.1), window=4)
    update = jax.jit(tx.update)
    int_grads = jnp.zeros(2, jnp.int32)
    # One step that runs first, so that the kept state differs from a freshly built one.
    _, state = update({"weights": jnp.ones(3), "steps": int_grads}, tx.init(params), params)
    assert int(state.inner_state[0].count) == 1
    out, skipped_state = update(
        {"weights": jnp.array([jnp.nan, 1.0, 1.0]), "steps": int_grads}, state, params
    )
    assert bool(skipped_state.last_skipped)
    np.testing.assert_array_equal(np.asarray(out["weights"]), np.zeros(3))
    _, ran_state = update({"weights": jnp.ones(3), "steps": int_grads}, state, params)
    assert not bool(ran_state.last_skipped)
    # Both branches return the state in the dtypes adam gives it, the skipped one with
    # the values it had.
    assert jax.tree.map(lambda leaf: leaf.dtype, skipped_state.inner_state) == jax.tree.map(
        lambda leaf: leaf.dtype, ran_state.inner_state
    )
    assert skipped_state.inner_state[0].mu["steps"].dtype == jnp.float32
    jax.tree.map(
        lambda kept, before: np.testing.assert_array_equal(np.asarray(kept), np.asarray(before)),
        skipped_state.inner_state,
        state.inner_state,
    )
