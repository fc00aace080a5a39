"""The global norm's careful pass and the rewrite of unchanged updates.

The careful pass runs for NaN/inf and for norms near either end of float32's
range; it reads the updates block by block, so leaf sizes around a block's
length are the edge cases.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_adaptive_clip as oac
from optax_adaptive_clip import _norms

BLOCK = _norms._BLOCK
FLOAT32_MAX = float(np.finfo(np.float32).max)
LEAF_SIZES = [
    (1,),
    (BLOCK - 1,),
    (BLOCK,),
    (BLOCK + 1,),
    (3 * BLOCK + 5, 7, 0, 2 * BLOCK),
]


def reference_norm(leaves: list[np.ndarray], norm_ord: float) -> tuple[float, bool]:
    """The norm of the imputed values in float64, saturated at float32's maximum."""
    flat = np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in leaves])
    has_nonfinite = not np.all(np.isfinite(flat))
    imputed = np.nan_to_num(flat, nan=0.0, posinf=1e6, neginf=-1e6)
    return min(float(np.linalg.norm(imputed, ord=norm_ord)), FLOAT32_MAX), has_nonfinite


@pytest.mark.parametrize("sizes", LEAF_SIZES, ids=str)
@pytest.mark.parametrize("norm_ord", [1, 2, 3, 7.5, float("inf")])
@pytest.mark.parametrize("magnitude", [1e-30, 1e25, 1e37])
@pytest.mark.parametrize("bad_value", [None, np.nan, -np.inf])
def test_careful_pass_matches_float64(sizes, norm_ord, magnitude, bad_value):
    rng = np.random.default_rng(len(sizes) + sum(sizes))
    leaves = [np.float32(magnitude) * rng.standard_normal(size, np.float32) for size in sizes]
    if bad_value is not None:
        leaves[0][rng.integers(sizes[0])] = bad_value
    expected_norm, expected_nonfinite = reference_norm(leaves, norm_ord)

    norm, has_nonfinite = jax.jit(oac.global_norm, static_argnums=1)(
        [jnp.asarray(leaf) for leaf in leaves], norm_ord
    )
    assert bool(has_nonfinite) == expected_nonfinite
    np.testing.assert_allclose(float(norm), expected_norm, rtol=2e-5)


def test_careful_pass_with_a_traced_norm_ord():
    grads = {"a": jnp.full((BLOCK + 3,), 1e30, jnp.float32), "b": jnp.array([jnp.inf, 2.0])}
    for norm_ord in (1.0, 2.0, 3.0, float("inf")):
        norm, has_nonfinite = jax.jit(oac.global_norm)(grads, jnp.float32(norm_ord))
        expected, _ = reference_norm([np.asarray(leaf) for leaf in grads.values()], norm_ord)
        assert bool(has_nonfinite)
        np.testing.assert_allclose(float(norm), expected, rtol=2e-5)


def test_careful_pass_stays_accurate_over_many_blocks():
    leaf = jax.random.uniform(jax.random.key(0), (2**20,), jnp.float32) * 1e25
    norm, _ = jax.jit(oac.global_norm)([leaf])
    expected = np.linalg.norm(np.asarray(leaf, np.float64))
    np.testing.assert_allclose(float(norm), expected, rtol=1e-6)


def test_careful_pass_does_not_drift_over_blocks_of_equal_largest_magnitude():
    # For this mantissa, largest * (1 / largest) rounds to just below 1 in float32; a
    # running sum rescaled by it on every block would lose about 1e-5 over 256 blocks.
    value = np.float32(2.0012453) * np.float32(2.0**60)  # large: the careful pass runs
    leaf = jnp.full((256 * BLOCK,), value, jnp.float32)
    norm, _ = jax.jit(oac.global_norm)([leaf])
    np.testing.assert_allclose(float(norm), float(value) * np.sqrt(leaf.size), rtol=1e-6)


def test_careful_pass_grows_linearly_with_the_number_of_leaves():
    # One lax.switch over every leaf would pass every leaf to each of its branches.
    def jaxpr_size(num_leaves: int) -> int:
        leaves = [jnp.ones((BLOCK + 1,)) for _ in range(num_leaves)]
        return len(str(jax.make_jaxpr(lambda u: _norms._careful_norm(u, "2", 2))(leaves)))

    per_loop = _norms._LEAVES_PER_LOOP
    assert jaxpr_size(4 * per_loop) < 6 * jaxpr_size(per_loop)


def test_careful_pass_reads_bf16_and_complex_leaves():
    grads = [
        jnp.array([3e30, -4e30], jnp.bfloat16),
        jnp.array([3e30 + 4e30j], jnp.complex64),
        jnp.array([jnp.nan], jnp.float16),
    ]
    norm, has_nonfinite = oac.global_norm(grads)
    expected = np.sqrt(2.0) * 5e30  # two norms of 5e30; the NaN reads as 0
    assert bool(has_nonfinite)
    np.testing.assert_allclose(float(norm), expected, rtol=1e-2)  # bf16 rounds the inputs


def count_reductions(function, *args) -> int:
    """Reductions in the jaxpr of ``function``, nested jaxprs (loops, branches) included."""
    text = str(jax.make_jaxpr(function)(*args))
    return len(re.findall(r"\breduce_(?:sum|max|min|or|and|prod)\b", text))


def test_careful_pass_shares_its_reductions_between_leaves():
    # Every reduction in the compiled step costs each execution a little, taken or
    # not; the careful pass holds one set per loop of up to _LEAVES_PER_LOOP leaves.
    def careful(updates):
        return _norms._careful_norm(updates, "2", 2)

    one_loop = count_reductions(careful, [jnp.ones((BLOCK + 1,))])
    leaves = [jnp.ones((BLOCK + 1,)) for _ in range(2 * _norms._LEAVES_PER_LOOP)]
    assert 0 < count_reductions(careful, leaves) <= 2 * one_loop


def _temp_bytes(function, *args, donate: bool) -> int:
    donate_argnums = tuple(range(len(args))) if donate else ()
    compiled = jax.jit(function, donate_argnums=donate_argnums).lower(*args).compile()
    memory = compiled.memory_analysis()
    if memory is None:
        pytest.skip("this backend reports no memory analysis")
    return memory.temp_size_in_bytes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_step_adds_no_gradient_sized_buffer(dtype):
    tx = oac.adaptive_clip()
    grads = {f"w{index}": jnp.zeros((1000, 1000), dtype) for index in range(4)}
    clip_temp = _temp_bytes(tx.update, grads, tx.init(grads), donate=True)
    # What this XLA version needs to reduce the float32 squares of the same leaves
    # (some versions materialise the squares): the clipper may add a fixed few tens
    # of KiB to it (the careful pass's blocks), never 16 MB of float32 gradients, nor
    # 16 MB of bfloat16 gradients converted to float32.
    norm_temp = _temp_bytes(
        lambda tree: sum(jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in tree.values()),
        grads,
        donate=False,
    )
    assert clip_temp < norm_temp + 2**16


def test_careful_pass_reads_leaves_beyond_int32_offsets_by_rows():
    # Beyond 2**31 entries a block's int32 offset would wrap and read the wrong
    # entries; such a leaf is read through a view of whole rows. Only lowered here:
    # running it would need a 4 GiB leaf.
    num_rows = 2**31 // BLOCK + 1
    huge = jax.ShapeDtypeStruct((num_rows * BLOCK,), jnp.bfloat16)
    careful = jax.jit(lambda leaf: _norms._careful_norm([leaf], "2", 2).mantissa)
    assert f"tensor<{num_rows}x{BLOCK}xbf16>" in careful.lower(huge).as_text()


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_reduction_barrier_is_lowered_for_cpu_only(platform):
    # Only XLA:CPU needs the barrier that keeps a bfloat16 leaf's conversion inside
    # the norm's reduction; elsewhere it could only stand in the way of fusion.
    grads = {"w": jnp.ones((8, 8), jnp.bfloat16), "b": jnp.ones((8,), jnp.float32)}
    tx = oac.adaptive_clip()
    lowered = jax.jit(tx.update).trace(grads, tx.init(grads)).lower(lowering_platforms=(platform,))
    barriers = lowered.as_text().count("optimization_barrier")
    assert barriers == (1 if platform == "cpu" else 0)


def test_unchanged_updates_come_back_bit_identical():
    tiny = np.float32(1e-40)  # subnormal: a product by 1.0 may flush it to zero
    grads = jnp.array([tiny, -0.0, 1.0, -2.5], jnp.float32)
    tx = oac.adaptive_clip(window=2, max_norm=10.0)
    out, state = jax.jit(tx.update)(grads, tx.init(grads))
    assert not bool(state.last_clipped)
    assert np.asarray(out).tobytes() == np.asarray(grads).tobytes()


def test_imputed_update_that_is_not_clipped_keeps_its_finite_entries_exactly():
    grads = jnp.array([np.float32(1e-40), -0.0, jnp.nan, -jnp.inf], jnp.float32)
    tx = oac.adaptive_clip(window=2)  # no threshold yet: nothing is clipped
    out, state = jax.jit(tx.update)(grads, tx.init(grads))
    assert not bool(state.last_clipped) and int(state.nonfinite_count) == 1
    expected = np.array([1e-40, -0.0, 0.0, -1e6], np.float32)
    assert np.asarray(out).tobytes() == expected.tobytes()
