"""Global norms of update pytrees and their rescaling.

The norm is accumulated in float32 whatever the leaf dtype. The common case
(finite values, a norm well inside float32's range) costs one fused pass over
the updates; only when that pass returns NaN, inf, or a sum near either end of
float32's range is a careful pass run, under ``jax.lax.cond``, to tell
non-finite entries from overflow and to compute the norm of the imputed values
block by block, every block first scaled by a power of two.

Internally a norm is carried as ``mantissa / inv_unit`` where ``inv_unit`` is
that power of two (1 on the fast path), so that updates whose norm lies beyond
float32's range can still be scaled exactly to a threshold. Entries whose magnitude
lies beyond float32's range (float64 values, complex moduli) count as float32's
largest value, and are scaled from it when an update is clipped, so that the clipped
norm is the threshold (among such entries the direction is not kept).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_adaptive_clip import _checks

# NaN becomes 0 and +-inf becomes +-_IMPUTED_MAGNITUDE (capped to the dtype's
# largest finite value) in "impute" mode, as in the PyTorch prototype.
_IMPUTED_MAGNITUDE = 1e6
FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)
_FLOAT32_TINY = float(jnp.finfo(jnp.float32).tiny)  # the smallest normal float32

NONFINITE_MODES = ("impute", "zero", "propagate")


class NormParts(NamedTuple):
    """A global norm, ``mantissa / inv_unit``, and whether the updates held NaN or inf.

    ``inv_unit`` is a power of two (1 on the fast path) chosen so that
    ``leaf * inv_unit`` and ``mantissa`` stay in range even when the norm itself
    exceeds float32's.
    """

    mantissa: jax.Array
    inv_unit: jax.Array
    has_nonfinite: jax.Array

    @property
    def norm(self) -> jax.Array:
        """The norm in float32, saturated at float32's largest value."""
        return jnp.minimum(self.mantissa / self.inv_unit, FLOAT32_MAX)


def _is_float_leaf(leaf: jax.Array) -> bool:
    return jnp.issubdtype(leaf.dtype, jnp.inexact)


def _varying_axes(value: Any) -> frozenset:
    """The manual mesh axes ``value`` varies over inside ``shard_map`` (none elsewhere).

    ``value`` is an array, a tracer or a ``jax.ShapeDtypeStruct``. JAX 0.10 moved
    this set from ``vma`` to ``manual_axis_type.varying``; JAX releases without
    ``jax.typeof`` have no such types.
    """
    if isinstance(value, jax.ShapeDtypeStruct):
        aval = value
    elif hasattr(jax, "typeof"):
        aval = jax.typeof(value)
    else:
        return frozenset()
    manual_axis_type = getattr(aval, "manual_axis_type", None)
    if manual_axis_type is not None:
        return frozenset(manual_axis_type.varying)
    return frozenset(getattr(aval, "vma", None) or ())


def _union_of_varying_axes(*likes: Any) -> frozenset:
    return frozenset().union(*map(_varying_axes, jax.tree.leaves(likes)))


def _vary_over(tree: Any, axes: frozenset) -> Any:
    """``tree`` typed as varying over ``axes`` (as it is when ``axes`` is empty)."""
    if not axes:
        return tree

    def cast(leaf: Any) -> Any:
        missing = axes - _varying_axes(leaf)
        return jax.lax.pcast(leaf, tuple(missing), to="varying") if missing else leaf

    return jax.tree.map(cast, tree)


def vary_like(tree: Any, *likes: Any) -> Any:
    """``tree`` typed as varying over every mesh axis that a leaf of ``likes`` varies over.

    Inside ``shard_map`` (with ``check_vma``) the branches of ``lax.cond`` and
    ``lax.switch`` and the carry of a loop must agree on these axes, and a value
    built from constants varies over none. ``jax.lax.pcast`` only changes the
    type: it costs nothing at run time, and outside ``shard_map``, where nothing
    varies, ``tree`` is returned as it is.
    """
    return _vary_over(tree, _union_of_varying_axes(*likes))


def impute_nonfinite(leaf: jax.Array) -> jax.Array:
    """Replaces NaN by 0 and +-inf by +-1e6 (capped to the dtype's largest value)."""
    if not _is_float_leaf(leaf):
        return leaf
    big = min(_IMPUTED_MAGNITUDE, float(jnp.finfo(leaf.dtype).max))
    return jnp.nan_to_num(leaf, nan=0.0, posinf=big, neginf=-big)


def _magnitude(leaf: jax.Array) -> jax.Array:
    """Element-wise ``|leaf|`` in float32 (modulus for complex leaves)."""
    if jnp.iscomplexobj(leaf):
        return jnp.abs(leaf).astype(jnp.float32)
    # Cast first: the absolute value of an integer type's most negative value wraps.
    return jnp.abs(leaf.astype(jnp.float32))


def _power_sum(magnitudes: list[jax.Array], kind: str, p: Any) -> jax.Array:
    """``sum |x|^p`` over every element (``max |x|`` for ``kind == "inf"``).

    A NaN entry makes the result NaN or inf, never a finite value.
    """
    if kind == "inf":
        # A vectorised max may drop NaN; as inf it reaches the caller's range check.
        return functools.reduce(
            jnp.maximum,
            [
                jnp.max(jnp.where(jnp.isnan(magnitude), jnp.inf, magnitude), initial=0.0)
                for magnitude in magnitudes
            ],
            jnp.zeros((), jnp.float32),
        )
    per_leaf = [jnp.sum(_power(magnitude, kind, p)) for magnitude in magnitudes]
    return sum(per_leaf, jnp.zeros((), jnp.float32))


def _power(magnitude: jax.Array, kind: str, p: Any) -> jax.Array:
    """``magnitude**p`` element-wise (the magnitude itself for ``kind == "inf"``)."""
    if kind in ("1", "inf"):
        return magnitude
    if kind == "2":
        return jnp.square(magnitude)
    return magnitude**p


def _root(power_sum: jax.Array, kind: str, p: Any) -> jax.Array:
    if kind in ("inf", "1"):
        return power_sum
    if kind == "2":
        return jnp.sqrt(power_sum)
    return power_sum ** (1.0 / p)


# Exponents e for which 2**(2 - e) is a normal, finite float32.
_MIN_EXPONENT, _MAX_EXPONENT = -125, 128
# Entries per block of the careful pass: its temporary buffers are a few of these.
_BLOCK = 4096
# Leaves per loop of the careful pass (see _careful_norm).
_LEAVES_PER_LOOP = 64

# Reads one block of a leaf: a row index to the float32 magnitudes of its (imputed)
# entries and whether each was NaN or inf, zero-padded to _BLOCK entries.
_BlockReader = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def _block_magnitudes(values: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Magnitudes beyond float32's range (float64 entries, complex moduli) count as its largest.
    magnitudes = jnp.minimum(_magnitude(impute_nonfinite(values)), FLOAT32_MAX)
    return magnitudes, ~jnp.isfinite(values)


def _block_readers(leaves: list[jax.Array]) -> tuple[list[_BlockReader], np.ndarray, np.ndarray]:
    """Readers covering every leaf in blocks, and for each block its reader and row.

    A leaf gets one reader for its full blocks, row ``r`` being its entries
    ``[r * _BLOCK, (r + 1) * _BLOCK)``, and one for its remainder, padded with
    zeros (which add nothing to any norm).
    """
    readers: list[_BlockReader] = []
    reader_of_block: list[int] = []
    row_of_block: list[int] = []
    for leaf in leaves:
        flat = leaf.reshape(-1)
        num_rows, remainder = divmod(flat.shape[0], _BLOCK)
        # Slicing and padding happen inside the readers, where they fuse into the
        # read of one block; outside, they would copy the leaf.
        if num_rows:

            def read_row(
                row: jax.Array, flat: jax.Array = flat, num_rows: int = num_rows
            ) -> tuple[jax.Array, jax.Array]:
                if flat.shape[0] <= _checks.INT32_MAX:
                    # A dynamic slice of the flat leaf: a static slice to whole rows
                    # first is copied out for bfloat16 leaves on XLA:CPU.
                    start = row * _BLOCK
                    return _block_magnitudes(jax.lax.dynamic_slice_in_dim(flat, start, _BLOCK))
                # The offset of a row would overflow int32; index a view of whole rows.
                rows = flat[: num_rows * _BLOCK].reshape(num_rows, _BLOCK)
                return _block_magnitudes(jax.lax.dynamic_index_in_dim(rows, row, keepdims=False))

            reader_of_block += [len(readers)] * num_rows
            row_of_block += range(num_rows)
            readers.append(read_row)
        if remainder:

            def read_remainder(
                row: jax.Array, flat: jax.Array = flat, start: int = num_rows * _BLOCK
            ) -> tuple[jax.Array, jax.Array]:
                del row
                # Padding the outputs, not the values, keeps the padded values unmaterialised.
                padding = (0, _BLOCK - (flat.shape[0] - start))
                magnitudes, nonfinite = _block_magnitudes(flat[start:])
                return jnp.pad(magnitudes, padding), jnp.pad(nonfinite, padding)

            reader_of_block.append(len(readers))
            row_of_block.append(0)
            readers.append(read_remainder)
    return readers, np.asarray(reader_of_block, np.int32), np.asarray(row_of_block, np.int32)


def inverse_unit(value: jax.Array) -> jax.Array:
    """``2**(2 - e)`` with ``value < 2**e``: a normal float32 bringing ``value`` into [2, 4)."""
    _, exponent = jnp.frexp(jnp.where(value > 0, value, 1.0))
    return jnp.ldexp(
        jnp.ones((), jnp.float32), 2 - jnp.clip(exponent, _MIN_EXPONENT, _MAX_EXPONENT)
    )


def _relative_to(values: jax.Array, largest: jax.Array) -> jax.Array:
    """``values / largest`` for ``0 <= values <= largest``; 0 where ``largest`` is 0.

    A correctly rounded quotient, so that ``largest / largest`` is exactly 1, of
    both terms first brought into float32's normal range by the same power of two.
    """
    scale = inverse_unit(largest)
    return (values * scale) / jnp.where(largest > 0, largest * scale, 1.0)


class _PartialNorm(NamedTuple):
    """A power sum relative to ``largest`` magnitude, and whether any entry was NaN or inf."""

    largest: jax.Array
    power_sum: jax.Array
    has_nonfinite: jax.Array


def _merge(first: _PartialNorm, second: _PartialNorm, kind: str, p: Any) -> _PartialNorm:
    """Both power sums relative to the larger of their largest magnitudes, combined."""
    largest = jnp.maximum(first.largest, second.largest)

    def rescaled(part: _PartialNorm) -> jax.Array:
        return part.power_sum * _power(_relative_to(part.largest, largest), kind, p)

    combine = jnp.maximum if kind == "inf" else jnp.add
    return _PartialNorm(
        largest,
        combine(rescaled(first), rescaled(second)),
        first.has_nonfinite | second.has_nonfinite,
    )


def _loop_over_blocks(leaves: list[jax.Array], kind: str, p: Any) -> _PartialNorm:
    """The imputed power sum of ``leaves`` (not empty), one block per loop iteration."""
    readers, reader_of_block, row_of_block = _block_readers(leaves)
    num_blocks = len(reader_of_block)
    reader_of_block, row_of_block = jnp.asarray(reader_of_block), jnp.asarray(row_of_block)

    # Under shard_map, every reader's outputs vary over the mesh axes of any of the
    # leaves, and the carry over those and a traced p's, as the branches and the loop
    # require.
    leaf_axes = _union_of_varying_axes(leaves)
    readers = [lambda row, read=read: _vary_over(read(row), leaf_axes) for read in readers]

    def add_block(block: int, partial: _PartialNorm) -> _PartialNorm:
        magnitudes, nonfinite = jax.lax.switch(reader_of_block[block], readers, row_of_block[block])
        block_largest = jnp.max(magnitudes)
        block_sum = _power_sum([_relative_to(magnitudes, block_largest)], kind, p)
        return _merge(partial, _PartialNorm(block_largest, block_sum, jnp.any(nonfinite)), kind, p)

    nothing = _vary_over(
        _PartialNorm(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((), bool)),
        leaf_axes | _union_of_varying_axes(p),
    )
    return jax.lax.fori_loop(0, num_blocks, add_block, nothing)


def _careful_norm(updates: Any, kind: str, p: Any) -> NormParts:
    """Norm of the imputed updates, block by block, relative to the largest magnitude.

    Loops read the updates in blocks of ``_BLOCK`` entries, take each block's
    power sum relative to its largest magnitude, and merge it into a running
    power sum kept relative to the largest magnitude seen so far. Nothing can
    overflow, and what underflows is negligible next to the largest entry's term
    of 1. The loops' buffers are a few blocks whatever the size of the updates.

    Each loop covers up to ``_LEAVES_PER_LOOP`` leaves: every loop and every
    reduction in the compiled step adds a fixed cost to each of its executions,
    even in a branch that is not taken, so loops or reductions per leaf would
    cost every step; but one loop for all leaves would compile in time quadratic
    in their number, as every branch of its ``lax.switch`` takes every leaf.
    """
    leaves = [leaf for leaf in jax.tree.leaves(updates) if leaf.size]
    if not leaves:
        return NormParts(jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32), jnp.zeros((), bool))
    groups = [
        leaves[start : start + _LEAVES_PER_LOOP]
        for start in range(0, len(leaves), _LEAVES_PER_LOOP)
    ]
    total = functools.reduce(
        lambda first, second: _merge(first, second, kind, p),
        [_loop_over_blocks(group, kind, p) for group in groups],
    )
    # The norm is largest * root(power_sum), carried as mantissa / inv_unit.
    inv_unit = inverse_unit(total.largest)
    mantissa = total.largest * inv_unit
    if kind != "inf":  # the inf-norm is the largest magnitude itself
        mantissa *= _root(total.power_sum, kind, p)
    return NormParts(mantissa, inv_unit, total.has_nonfinite)


def _kind_of(norm_ord: Any) -> str:
    p = float(norm_ord)
    if math.isinf(p):
        return "inf"
    if p in (1.0, 2.0):
        return str(int(p))
    return "p"


def _reduction_input(leaf: jax.Array) -> jax.Array:
    """``leaf`` as the fast pass's reduction reads it.

    XLA:CPU converts a bfloat16 leaf to float32 into a separate, leaf-sized
    buffer when the leaf is read both by the norm's reduction and by the
    rescaling; read through an optimisation barrier, the conversion stays inside
    the reduction. The barrier is lowered for CPU only; other backends, and
    other dtypes, read the leaf directly.
    """
    if leaf.dtype != jnp.bfloat16:
        return leaf
    return jax.lax.platform_dependent(
        leaf, cpu=jax.lax.optimization_barrier, default=lambda unchanged: unchanged
    )


def _static_norm_parts(updates: Any, kind: str, p: Any) -> NormParts:
    leaves = jax.tree.leaves(updates)
    power_sum = _power_sum([_magnitude(_reduction_input(leaf)) for leaf in leaves], kind, p)
    # Terms below float32's normal range may be flushed to zero; they total at most
    # size * 2**-126, under float32's precision of any sum above size * 2**-102.
    size = sum(leaf.size for leaf in leaves)
    smallest_exact = max(2.0**-100, size * 2.0**-102)
    # Rare path: NaN or inf in the updates, or a norm so large or small that its
    # reciprocal (XLA may divide by multiplying) or its terms would leave float32's
    # normal range; all-zero updates too, as their terms may have underflowed.
    in_range = (power_sum >= smallest_exact) & (power_sum <= 2.0**100)
    # Under shard_map both branches, and every branch of norm_parts' switch, vary
    # over the mesh axes of the updates and of a traced p. (The careful branch's
    # values do through its loop, but not when every leaf is empty.)
    axes = _union_of_varying_axes(updates, p)
    return jax.lax.cond(
        in_range,
        lambda: _vary_over(
            NormParts(_root(power_sum, kind, p), jnp.ones((), jnp.float32), jnp.zeros((), bool)),
            axes,
        ),
        lambda: _vary_over(_careful_norm(updates, kind, p), axes),
    )


def _check_signed_floats(updates: Any) -> None:
    """Rejects float formats without negative values (scale formats such as float8_e8m0fnu).

    They hold no zero, so NaN could be neither imputed nor zeroed, and the norm
    and the state would turn NaN.
    """
    for leaf in jax.tree.leaves(updates):
        if _is_float_leaf(leaf) and float(jnp.finfo(leaf.dtype).min) >= 0:
            raise ValueError(
                f"`updates` holds a {leaf.dtype} leaf, a float format without sign or "
                "zero; use a signed float dtype (float32, bfloat16, float16, float8_e4m3fn, "
                "...) for gradients."
            )


def norm_parts(updates: Any, norm_ord: Any = 2) -> NormParts:
    """The global ``norm_ord``-norm of ``updates`` as :class:`NormParts`.

    ``norm_ord`` may be a traced scalar (as under ``optax.inject_hyperparams``);
    the matching reduction is then picked with ``lax.switch``.
    """
    updates = jax.tree.map(jnp.asarray, updates)  # Python scalars count as leaves too
    _check_signed_floats(updates)
    if not _checks.is_traced(norm_ord):
        return _static_norm_parts(updates, _kind_of(norm_ord), norm_ord)
    # Unchecked when injected (see _checks): a p below 1, or NaN, counts as 1.
    p = jnp.asarray(norm_ord, jnp.float32)
    p = jnp.where(p >= 1.0, p, 1.0)
    branch = jnp.select([p == 1.0, p == 2.0, jnp.isinf(p)], [0, 1, 2], default=3)
    return jax.lax.switch(
        branch,
        [functools.partial(_static_norm_parts, kind=kind, p=p) for kind in ("1", "2", "inf", "p")],
        updates,
    )


def global_norm(updates: Any, norm_ord: Any = 2) -> tuple[jax.Array, jax.Array]:
    """Global p-norm of a pytree, and whether it held any NaN or inf.

    Args:
      updates: a pytree of arrays (``None`` leaves and empty trees allowed).
      norm_ord: p of the norm: any p >= 1 or ``float("inf")``. May be a traced
        scalar (as under ``optax.inject_hyperparams``), which cannot be checked:
        a traced p below 1, or NaN, counts as 1.

    Returns:
      ``(norm, has_nonfinite)``: a float32 scalar computed over the updates with
      NaN read as 0 and +-inf as +-1e6, saturated at float32's largest value
      (never inf or NaN); and a bool scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_adaptive_clip import global_norm
      >>> global_norm({"a": jnp.array([3.0, 4.0]), "b": None})
      (Array(5., dtype=float32), Array(False, dtype=bool))
      >>> global_norm([jnp.array([jnp.nan, 2.0])], norm_ord=1)
      (Array(2., dtype=float32), Array(True, dtype=bool))
    """
    _checks.check_norm_ord(norm_ord)
    parts = norm_parts(updates, norm_ord)
    return parts.norm, parts.has_nonfinite


def _within_float32_range(leaf: jax.Array) -> jax.Array:
    """``leaf`` with magnitudes beyond float32's range brought down to its largest value.

    The norm counts such magnitudes (of float64 entries, and complex moduli, which
    exceed float32's range by up to sqrt(2) even in complex64) as float32's largest
    value; scaling the leaf as it counts keeps a clipped update within the threshold.
    Other leaves are returned as they are.
    """
    if not _is_float_leaf(leaf):
        return leaf
    if not jnp.iscomplexobj(leaf):
        if float(jnp.finfo(leaf.dtype).max) <= FLOAT32_MAX:
            return leaf
        return jnp.clip(leaf, -FLOAT32_MAX, FLOAT32_MAX)
    # The modulus of the halved leaf cannot overflow to inf, even in complex64.
    half_magnitude = jnp.abs(leaf * 0.5)
    half_max = FLOAT32_MAX / 2
    return jnp.where(half_magnitude > half_max, leaf * (half_max / half_magnitude), leaf)


def apply_threshold(
    updates: Any,
    parts: NormParts,
    threshold: jax.Array,
    nonfinite: str,
) -> tuple[Any, jax.Array]:
    """Scales ``updates`` to norm ``threshold`` when their norm exceeds it.

    Non-finite entries are handled by ``nonfinite``: ``"impute"`` replaces them
    (see :func:`impute_nonfinite`) and clips as usual; ``"zero"`` returns zeros;
    ``"propagate"`` returns the updates unchanged.

    Returns:
      ``(new_updates, clipped)``, ``clipped`` a bool scalar. Leaves keep their
      dtype; leaves that are not scaled come back bit-identical.
    """
    updates = jax.tree.map(jnp.asarray, updates)
    clipped = parts.mantissa > threshold * parts.inv_unit
    if nonfinite != "impute":
        clipped &= ~parts.has_nonfinite
    # threshold / norm as (threshold / mantissa) * inv_unit, applied in two exact-
    # enough products: the ratio alone may leave float32's range. The divisor is
    # never 0 where it is used: there the norm exceeds a threshold >= 0.
    mantissa = jnp.where(clipped, parts.mantissa, 1.0)
    # On the fast path the mantissa is the norm itself (inv_unit is 1), and a threshold
    # far below it gives a ratio under float32's normal range, which CPUs flush to 0.
    # Then the norm's power of two moves into the first product, as on the careful path.
    shift = jnp.where(threshold < _FLOAT32_TINY * mantissa, inverse_unit(mantissa), 1.0)
    inv_unit = parts.inv_unit * shift
    ratio = threshold / (mantissa * shift)

    changed = clipped if nonfinite == "propagate" else clipped | parts.has_nonfinite

    def scale_leaf(leaf: jax.Array) -> jax.Array:
        fixed = leaf
        if nonfinite == "impute":
            # Under the flag, updates without NaN or inf pass through bit-identical. (A
            # lax.cond of its own for the imputation makes XLA copy the updates into the
            # conditional's outputs; a lax.while_loop run at most once copies gradients
            # that are not donated, as in a chain with Adam.) The imputation costs small
            # leaves a little even when nothing changes: XLA:CPU splits a kernel into
            # parallel tasks when its element-wise operations outnumber the bytes it reads
            # and writes (8 per float32 entry), and this one has 11. Eight are possible by
            # imputing without the flag and multiplying unclipped updates by 1, but then a
            # scaled step imputes every entry (1.06-1.17x clip_by_global_norm at 10M
            # instead of 1.01x) and an unclipped one loses its subnormal entries.
            fixed = jnp.where(parts.has_nonfinite, impute_nonfinite(leaf), leaf)
        # The float32 scalars promote bf16/f16 leaves to float32 for the product; 8-bit
        # floats have no implicit promotion in JAX, so they are converted explicitly.
        factor = _within_float32_range(fixed)
        if _is_float_leaf(leaf) and leaf.dtype.itemsize == 1:
            factor = factor.astype(jnp.float32)
        scaled = (factor * inv_unit * ratio).astype(leaf.dtype)
        new_leaf = jnp.where(clipped, scaled, fixed)
        if nonfinite == "zero":
            new_leaf = jnp.where(parts.has_nonfinite, jnp.zeros_like(leaf), new_leaf)
        # Selecting `leaf` itself when nothing changes lets the compiler drop the
        # rewrite of a donated buffer, so an update that is not clipped costs only its norm.
        return jnp.where(changed, new_leaf, leaf)

    return jax.tree.map(scale_leaf, updates), clipped
