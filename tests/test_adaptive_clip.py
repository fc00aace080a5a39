"""adaptive_clip: the reference semantics, option by option."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from reference_models import PrototypeClipper, norm_sequence

import optax_adaptive_clip as oac


def vector_with_norm(norm: float, size: int = 5, seed: int = 0, ord: float = 2) -> jax.Array:
    direction = np.random.default_rng(seed).normal(size=size).astype(np.float32)
    return jnp.asarray(direction / np.linalg.norm(direction, ord=ord) * norm)


def feed(tx, norms, size: int = 5, state=None, update=None):
    """Runs one update per norm; returns the outputs and the final state."""
    state = tx.init(jnp.zeros(size)) if state is None else state
    update = tx.update if update is None else update
    outputs = []
    for step, norm in enumerate(norms):
        out, state = update(vector_with_norm(norm, size, seed=step), state)
        outputs.append(out)
    return outputs, state


class ReferenceNumbersTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_prototype_reference_statistics(self):
        tx = oac.adaptive_clip()
        update = self.variant(tx.update)
        _, state = feed(tx, range(31), update=update)
        # After 31 norms no statistics are used yet.
        self.assertEqual(float(state.threshold), math.inf)
        _, state = feed(tx, [31], state=state, update=update)
        mean, std = oac.history_mean_std(state.norms, state.count)
        np.testing.assert_allclose(float(mean), 15.5, rtol=1e-7)
        np.testing.assert_allclose(float(std), 9.3808315, rtol=1e-6)

        limit = 15.5 + 9.3808315
        above = vector_with_norm(limit * 1.001, seed=1)
        clipped, after = update(above, state)
        np.testing.assert_allclose(float(jnp.linalg.norm(clipped)), limit, rtol=1e-6)
        np.testing.assert_allclose(float(after.threshold), limit, rtol=1e-6)
        self.assertTrue(bool(after.last_clipped))
        # Direction kept.
        np.testing.assert_allclose(
            np.asarray(clipped) / np.linalg.norm(clipped),
            np.asarray(above) / np.linalg.norm(above),
            rtol=1e-5,
        )

        below = vector_with_norm(limit * 0.999, seed=2)
        passed, after = update(below, state)
        np.testing.assert_array_equal(np.asarray(passed), np.asarray(below))
        self.assertFalse(bool(after.last_clipped))
        self.assertEqual(int(after.clip_count), 0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_ring_buffer_is_fifo(self):
        tx = oac.adaptive_clip(window=4, num_std=100.0)
        update = self.variant(tx.update)
        _, state = feed(tx, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], update=update)
        # The two oldest norms fell out; slots 0 and 1 were overwritten in order.
        np.testing.assert_allclose(np.asarray(state.norms), [5.0, 6.0, 3.0, 4.0], rtol=1e-6)
        self.assertEqual(int(state.count), 6)
        self.assertEqual(int(state.next_index), 2)
        mean, _ = oac.history_mean_std(state.norms, state.count)
        np.testing.assert_allclose(float(mean), 4.5, rtol=1e-6)


class OptionsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_warmup_max_norm_then_statistics(self):
        tx = oac.adaptive_clip(window=8, min_history=3, warmup_max_norm=2.0)
        update = self.variant(tx.update)
        outputs, state = feed(tx, [5.0, 1.0, 1.5], update=update)
        np.testing.assert_allclose(float(jnp.linalg.norm(outputs[0])), 2.0, rtol=1e-6)
        np.testing.assert_allclose(float(jnp.linalg.norm(outputs[1])), 1.0, rtol=1e-6)
        # Third norm recorded: statistics from 5, 1, 1.5 are now in force.
        outputs, state = feed(tx, [100.0], state=state, update=update)
        expected = np.mean([5.0, 1.0, 1.5]) + np.std([5.0, 1.0, 1.5], ddof=1)
        np.testing.assert_allclose(float(state.threshold), expected, rtol=1e-6)
        np.testing.assert_allclose(float(jnp.linalg.norm(outputs[0])), expected, rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_max_norm_caps_always(self):
        tx = oac.adaptive_clip(window=4, max_norm=0.5)
        update = self.variant(tx.update)
        outputs, state = feed(tx, [1.0, 0.2, 3.0, 1.0, 1.0, 40.0], update=update)
        for out in outputs:
            self.assertLessEqual(float(jnp.linalg.norm(out)), 0.5 * (1 + 1e-6))
        np.testing.assert_allclose(float(jnp.linalg.norm(outputs[1])), 0.2, rtol=1e-6)
        self.assertEqual(int(state.clip_count), 5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_record_clipped_keeps_spikes_out_of_history(self):
        raw = oac.adaptive_clip(window=4, record="raw")
        clipped = oac.adaptive_clip(window=4, record="clipped")
        norms = [1.0, 1.2, 0.8, 1.0, 50.0]
        _, raw_state = feed(raw, norms, update=self.variant(raw.update))
        _, clipped_state = feed(clipped, norms, update=self.variant(clipped.update))
        np.testing.assert_allclose(float(raw_state.norms[0]), 50.0, rtol=1e-6)
        np.testing.assert_allclose(
            float(clipped_state.norms[0]), float(clipped_state.threshold), rtol=1e-6
        )
        self.assertLess(float(clipped_state.norms[0]), 2.0)

    @parameterized.parameters(1, 2, 3, math.inf)
    def test_norm_ord(self, norm_ord):
        tx = oac.adaptive_clip(window=2, norm_ord=norm_ord)
        state = tx.init(jnp.zeros(5))
        for step, norm in enumerate([1.0, 2.0]):
            _, state = tx.update(vector_with_norm(norm, seed=step, ord=norm_ord), state)
        np.testing.assert_allclose(np.asarray(state.norms), [1.0, 2.0], rtol=1e-5)
        threshold = 1.5 + np.std([1.0, 2.0], ddof=1)
        out, state = tx.update(vector_with_norm(10.0, seed=9, ord=norm_ord), state)
        np.testing.assert_allclose(
            np.linalg.norm(np.asarray(out), ord=norm_ord), threshold, rtol=1e-5
        )

    def test_zero_norm_does_not_produce_nan(self):
        tx = oac.adaptive_clip(window=2)
        state = tx.init(jnp.zeros(3))
        for _ in range(4):
            out, state = jax.jit(tx.update)(jnp.zeros(3), state)
        np.testing.assert_array_equal(np.asarray(out), np.zeros(3))
        self.assertEqual(float(state.threshold), 0.0)
        self.assertFalse(bool(state.last_clipped))
        self.assertFalse(any(bool(jnp.isnan(leaf).any()) for leaf in jax.tree.leaves(state)))


class NonFiniteTest(chex.TestCase):
    def _spoiled(self):
        return {
            "w": jnp.array([jnp.nan, 3.0, jnp.inf, -jnp.inf], jnp.float32),
            "h": jnp.array([jnp.inf, 1.0], jnp.float16),
        }

    @chex.variants(with_jit=True, without_jit=True)
    def test_impute(self):
        tx = oac.adaptive_clip(window=2)
        state = tx.init(self._spoiled())
        out, state = self.variant(tx.update)(self._spoiled(), state)
        np.testing.assert_array_equal(np.asarray(out["w"]), [0.0, 3.0, 1e6, -1e6])
        # 1e6 is beyond float16's range: capped to its largest finite value.
        np.testing.assert_array_equal(np.asarray(out["h"]), [65504.0, 1.0])
        expected_norm = np.sqrt(9.0 + 2e12 + 65504.0**2 + 1.0)
        np.testing.assert_allclose(float(state.last_norm), expected_norm, rtol=1e-6)
        np.testing.assert_allclose(float(state.norms[0]), expected_norm, rtol=1e-6)
        self.assertEqual(int(state.count), 1)
        self.assertEqual(int(state.nonfinite_count), 1)

    @chex.variants(with_jit=True, without_jit=True)
    def test_zero(self):
        tx = oac.adaptive_clip(window=2, nonfinite="zero")
        clean = {"w": jnp.ones(4), "h": jnp.ones(2, jnp.float16)}
        _, state = tx.update(clean, tx.init(clean))
        out, after = self.variant(tx.update)(self._spoiled(), state)
        chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, clean))
        np.testing.assert_array_equal(np.asarray(after.norms), np.asarray(state.norms))
        self.assertEqual(int(after.count), 1)
        self.assertEqual(int(after.nonfinite_count), 1)
        self.assertEqual(int(after.clip_count), 0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_propagate(self):
        tx = oac.adaptive_clip(window=2, nonfinite="propagate", max_norm=1.0)
        spoiled = self._spoiled()
        out, state = self.variant(tx.update)(spoiled, tx.init(spoiled))
        chex.assert_trees_all_equal(out, spoiled)
        self.assertEqual(int(state.count), 0)
        self.assertEqual(int(state.nonfinite_count), 1)

    @parameterized.parameters("impute", "zero", "propagate")
    def test_state_never_nan(self, nonfinite):
        tx = oac.adaptive_clip(window=3, min_history=2, nonfinite=nonfinite)
        update = jax.jit(tx.update)
        state = tx.init(jnp.zeros(2))
        for grad in ([1.0, 1.0], [jnp.nan, 1.0], [jnp.inf, 0.0], [2.0, 1.0], [jnp.nan] * 2):
            _, state = update(jnp.asarray(grad, jnp.float32), state)
            for leaf in jax.tree.leaves(state):
                self.assertFalse(bool(jnp.isnan(leaf).any()), msg=str(state))

    def test_huge_finite_values_do_not_overflow(self):
        tx = oac.adaptive_clip(window=2)
        grad = jnp.full((4,), 1e30, jnp.float32)  # the sum of squares overflows float32
        out, state = jax.jit(tx.update)(grad, tx.init(grad))
        np.testing.assert_allclose(float(state.last_norm), 2e30, rtol=1e-6)
        self.assertEqual(int(state.nonfinite_count), 0)
        chex.assert_trees_all_equal(out, grad)


class DtypeTest(parameterized.TestCase):
    @parameterized.parameters(jnp.bfloat16, jnp.float16, jnp.float32, jnp.complex64)
    def test_dtype_kept_and_norm_in_float32(self, dtype):
        tx = oac.adaptive_clip(window=2, max_norm=1.0)
        grad = (jnp.arange(1, 7).astype(jnp.float32) * 10).astype(dtype)
        out, state = jax.jit(tx.update)(grad, tx.init(grad))
        self.assertEqual(out.dtype, jnp.dtype(dtype))
        self.assertEqual(state.last_norm.dtype, jnp.float32)
        expected = np.linalg.norm(np.abs(np.asarray(grad).astype(np.complex128)))
        np.testing.assert_allclose(float(state.last_norm), expected, rtol=1e-3)
        # Post-clip norm is the threshold up to the leaf dtype's rounding.
        rtol = 1e-2 if dtype in (jnp.bfloat16, jnp.float16) else 1e-6
        np.testing.assert_allclose(
            np.linalg.norm(np.asarray(out).astype(np.complex128)), 1.0, rtol=rtol
        )

    def test_float64_leaf(self):
        with jax.enable_x64(True):
            tx = oac.adaptive_clip(window=2, max_norm=1.0)
            grad = jnp.array([3.0, 4.0], jnp.float64)
            out, state = tx.update(grad, tx.init(grad))
            self.assertEqual(out.dtype, jnp.float64)
            self.assertEqual(state.last_norm.dtype, jnp.float32)
            np.testing.assert_allclose(np.asarray(out), [0.6, 0.8], rtol=1e-7)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"window": 8, "num_std": 0.5},
        {"window": 8, "min_history": 3, "warmup_max_norm": 2.0, "record": "clipped"},
        {"window": 5, "num_std": 2.0, "max_norm": 20.0},
    ],
)
def test_matches_numpy_model_step_by_step(options, seed):
    norms = norm_sequence(np.random.default_rng(seed), length=90)
    model = PrototypeClipper(**options)
    tx = oac.adaptive_clip(**options)
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(5))
    for step, norm in enumerate(norms):
        expected_threshold, expected_scale = model.step(norm)
        grad = vector_with_norm(norm, seed=step)
        out, state = update(grad, state)
        np.testing.assert_allclose(float(state.threshold), expected_threshold, rtol=2e-5)
        np.testing.assert_allclose(
            float(jnp.linalg.norm(out)), norm * expected_scale, rtol=2e-5, err_msg=f"step {step}"
        )
        assert bool(state.last_clipped) == (expected_scale < 1.0)
