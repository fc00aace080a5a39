"""Global norms of update pytrees and their rescaling.

The norm is accumulated in float32 whatever the leaf dtype. The common case
(finite values, a norm well inside float32's range) costs one fused pass over
the updates; only when that pass returns NaN, inf, or a sum near either end of
float32's range is a careful pass run, under ``jax.lax.cond``, to tell
non-finite entries from overflow and to compute the norm of the imputed values
with every entry first scaled by a power of two.

Internally a norm is carried as ``mantissa / inv_unit`` where ``inv_unit`` is
that power of two (1 on the fast path), so that updates whose norm lies beyond
float32's range can still be scaled exactly to a threshold. Float64 entries
beyond float32's range count as float32's largest value.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_adaptive_clip import _checks

# NaN becomes 0 and +-inf becomes +-_IMPUTED_MAGNITUDE (capped to the dtype's
# largest finite value) in "impute" mode, as in the PyTorch prototype.
_IMPUTED_MAGNITUDE = 1e6
_FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)

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
        return jnp.minimum(self.mantissa / self.inv_unit, _FLOAT32_MAX)


def _is_float_leaf(leaf: jax.Array) -> bool:
    return jnp.issubdtype(leaf.dtype, jnp.inexact)


def impute_nonfinite(leaf: jax.Array) -> jax.Array:
    """Replaces NaN by 0 and +-inf by +-1e6 (capped to the dtype's largest value)."""
    if not _is_float_leaf(leaf):
        return leaf
    big = min(_IMPUTED_MAGNITUDE, float(jnp.finfo(leaf.dtype).max))
    return jnp.nan_to_num(leaf, nan=0.0, posinf=big, neginf=-big)


def _magnitude(leaf: jax.Array) -> jax.Array:
    """Element-wise ``|leaf|`` in float32 (modulus for complex leaves)."""
    return jnp.abs(leaf).astype(jnp.float32)


def _power_sum(magnitudes: list[jax.Array], kind: str, p: Any) -> jax.Array:
    """``sum |x|^p`` over every element (``max |x|`` for ``kind == "inf"``)."""
    if kind == "inf":
        return functools.reduce(
            jnp.maximum,
            [jnp.max(magnitude, initial=0.0) for magnitude in magnitudes],
            jnp.zeros((), jnp.float32),
        )
    if kind == "1":
        per_leaf = [jnp.sum(magnitude) for magnitude in magnitudes]
    elif kind == "2":
        per_leaf = [jnp.sum(jnp.square(magnitude)) for magnitude in magnitudes]
    else:
        per_leaf = [jnp.sum(magnitude**p) for magnitude in magnitudes]
    return sum(per_leaf, jnp.zeros((), jnp.float32))


def _root(power_sum: jax.Array, kind: str, p: Any) -> jax.Array:
    if kind in ("inf", "1"):
        return power_sum
    if kind == "2":
        return jnp.sqrt(power_sum)
    return power_sum ** (1.0 / p)


# Exponents e for which 2**(2 - e) is a normal, finite float32.
_MIN_EXPONENT, _MAX_EXPONENT = -125, 128
# Row length of the careful pass's reduction (see _row_length).
_ROW = 4096


class _ScaledSum(NamedTuple):
    """A partial ``sum |x|^p`` as ``largest^p * scaled_sum``, and whether any x was NaN/inf.

    For a general p, ``largest`` holds ``max p*log|x|`` and ``scaled_sum`` the sum of
    ``exp(p*log|x| - largest)``, so that combining two sums needs no traced p.
    """

    largest: jax.Array
    scaled_sum: jax.Array
    nonfinite: jax.Array


def _combine_scaled_sums(kind: str):
    """The reducer of :class:`_ScaledSum` partial results: it never overflows."""

    def rescale(smaller: jax.Array, largest: jax.Array) -> jax.Array:
        """The factor a partial sum at scale ``smaller`` takes at scale ``largest``."""
        if kind == "p":
            return jnp.exp(smaller - largest)
        ratio = jnp.where(largest > 0, smaller / largest, 0.0)
        if kind == "1":
            return ratio
        if kind == "2":
            return ratio * ratio
        return jnp.zeros_like(ratio)  # "inf": only the largest entry counts

    def combine(left: tuple, right: tuple) -> tuple:
        left_largest, left_sum, left_nonfinite = left
        right_largest, right_sum, right_nonfinite = right
        left_wins = left_largest >= right_largest
        largest = jnp.where(left_wins, left_largest, right_largest)
        smaller = jnp.where(left_wins, right_largest, left_largest)
        kept_sum = jnp.where(left_wins, left_sum, right_sum)
        rescaled_sum = jnp.where(left_wins, right_sum, left_sum)
        return (
            largest,
            kept_sum + rescaled_sum * rescale(smaller, largest),
            jnp.maximum(left_nonfinite, right_nonfinite),
        )

    return combine


def _reduce_scaled_sums(parts: _ScaledSum, axis: int, kind: str) -> _ScaledSum:
    # Identity element; for a general p the scale is a log, whose zero is -inf.
    empty_scale = -jnp.inf if kind == "p" else 0.0
    identity = tuple(jnp.asarray(value, jnp.float32) for value in (empty_scale, 0.0, 0.0))
    reduced = jax.lax.reduce(tuple(parts), identity, _combine_scaled_sums(kind), (axis,))
    return _ScaledSum(*reduced)


def _row_length(size: int) -> int:
    """The divisor of ``size`` closest to ``_ROW``.

    A general ``lax.reduce`` folds entries one after the other; reducing rows
    and then the row results keeps both sequences, and their rounding error,
    short, without slicing (which could copy the leaf), while the row results
    stay a small buffer.
    """
    small_divisors = [d for d in range(1, math.isqrt(size) + 1) if size % d == 0]
    divisors = small_divisors + [size // d for d in small_divisors]
    return min(divisors, key=lambda length: abs(length - _ROW), default=1)


def _leaf_scaled_sum(leaf: jax.Array, kind: str, p: Any) -> _ScaledSum:
    flat = leaf.reshape(-1)
    # Magnitudes beyond float32's range (float64 leaves) count as its largest value.
    magnitude = jnp.minimum(jnp.abs(impute_nonfinite(flat)).astype(jnp.float32), _FLOAT32_MAX)
    if kind == "p":
        scale = jnp.where(magnitude > 0, p * jnp.log(magnitude), -jnp.inf)
    else:
        scale = magnitude
    entries = _ScaledSum(
        scale, (magnitude > 0).astype(jnp.float32), (~jnp.isfinite(flat)).astype(jnp.float32)
    )
    rows = _ScaledSum(*(entry.reshape(-1, _row_length(flat.shape[0])) for entry in entries))
    return _reduce_scaled_sums(_reduce_scaled_sums(rows, 1, kind), 0, kind)


def _careful_norm(updates: Any, kind: str, p: Any) -> NormParts:
    """Norm of the imputed updates, by partial sums rescaled to their largest entry.

    A general ``lax.reduce`` fuses the imputation into one pass per leaf and
    materialises nothing, so this branch adds no gradient-sized buffer to the
    compiled step; under ``lax.cond`` it costs nothing when not taken.
    """
    per_leaf = [_leaf_scaled_sum(leaf, kind, p) for leaf in jax.tree.leaves(updates)]
    if not per_leaf:
        return NormParts(jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32), jnp.zeros((), bool))
    stacked = _ScaledSum(*(jnp.stack(parts) for parts in zip(*per_leaf, strict=True)))
    total = _reduce_scaled_sums(stacked, 0, kind)
    has_nonfinite = total.nonfinite > 0
    if kind == "p":
        # log2 of the norm; -inf for a zero norm.
        log2_norm = (total.largest + jnp.log(total.scaled_sum)) / (p * math.log(2.0))
        exponent = jnp.where(jnp.isfinite(log2_norm), jnp.ceil(log2_norm), 0.0)
        exponent = jnp.clip(exponent, _MIN_EXPONENT, _MAX_EXPONENT).astype(jnp.int32)
        inv_unit = jnp.ldexp(jnp.ones((), jnp.float32), 2 - exponent)
        mantissa = jnp.where(jnp.isfinite(log2_norm), jnp.exp2(log2_norm + 2 - exponent), 0.0)
        return NormParts(mantissa, inv_unit, has_nonfinite)
    # inv_unit = 2**(2 - e) with largest < 2**e: the largest entry times it stays
    # below 4, and it is a normal float32 (>= 2**-126) even for float32's maximum.
    _, exponent = jnp.frexp(jnp.where(total.largest > 0, total.largest, 1.0))
    inv_unit = jnp.ldexp(
        jnp.ones((), jnp.float32), 2 - jnp.clip(exponent, _MIN_EXPONENT, _MAX_EXPONENT)
    )
    mantissa = total.largest * inv_unit
    if kind != "inf":
        mantissa *= _root(total.scaled_sum, kind, p)
    return NormParts(mantissa, inv_unit, has_nonfinite)


def _kind_of(norm_ord: Any) -> str:
    p = float(norm_ord)
    if math.isinf(p):
        return "inf"
    if p in (1.0, 2.0):
        return str(int(p))
    return "p"


def _static_norm_parts(updates: Any, kind: str, p: Any) -> NormParts:
    power_sum = _power_sum([_magnitude(leaf) for leaf in jax.tree.leaves(updates)], kind, p)
    # Rare path: NaN or inf in the updates, or a norm so large or small that its
    # reciprocal (XLA may divide by multiplying) or its squares would leave float32's
    # normal range; all-zero updates too, as their squares may have underflowed.
    in_range = (power_sum >= 2.0**-100) & (power_sum <= 2.0**100)
    return jax.lax.cond(
        in_range,
        lambda: NormParts(
            _root(power_sum, kind, p), jnp.ones((), jnp.float32), jnp.zeros((), bool)
        ),
        lambda: _careful_norm(updates, kind, p),
    )


def norm_parts(updates: Any, norm_ord: Any = 2) -> NormParts:
    """The global ``norm_ord``-norm of ``updates`` as :class:`NormParts`.

    ``norm_ord`` may be a traced scalar (as under ``optax.inject_hyperparams``);
    the matching reduction is then picked with ``lax.switch``.
    """
    if not _checks.is_traced(norm_ord):
        return _static_norm_parts(updates, _kind_of(norm_ord), norm_ord)
    p = jnp.asarray(norm_ord, jnp.float32)
    branch = jnp.select([p == 1.0, p == 2.0, jnp.isinf(p)], [0, 1, 2], default=3)
    return jax.lax.switch(
        branch,
        [
            functools.partial(_static_norm_parts, kind=kind, p=p)
            for kind in ("1", "2", "inf", "p")
        ],
        updates,
    )


def global_norm(updates: Any, norm_ord: Any = 2) -> tuple[jax.Array, jax.Array]:
    """Global p-norm of a pytree, and whether it held any NaN or inf.

    Args:
      updates: a pytree of arrays (``None`` leaves and empty trees allowed).
      norm_ord: p of the norm: any p >= 1 or ``float("inf")``. May be a traced
        scalar (as under ``optax.inject_hyperparams``).

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
    parts = norm_parts(updates, norm_ord)
    return parts.norm, parts.has_nonfinite


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
    clipped = parts.mantissa > threshold * parts.inv_unit
    if nonfinite != "impute":
        clipped &= ~parts.has_nonfinite
    # threshold / norm as (threshold / mantissa) * inv_unit, applied in two exact-
    # enough products: the ratio alone may leave float32's range. The divisor is
    # never 0 where it is used: there the norm exceeds a threshold >= 0.
    ratio = threshold / jnp.where(clipped, parts.mantissa, 1.0)

    def scale_leaf(leaf: jax.Array) -> jax.Array:
        if nonfinite == "impute":
            leaf = impute_nonfinite(leaf)
        # The float32 scalars promote bf16/f16 leaves to float32 for the product.
        scaled = (leaf * parts.inv_unit * ratio).astype(leaf.dtype)
        new_leaf = jnp.where(clipped, scaled, leaf)
        if nonfinite == "zero":
            new_leaf = jnp.where(parts.has_nonfinite, jnp.zeros_like(leaf), new_leaf)
        return new_leaf

    return jax.tree.map(scale_leaf, updates), clipped
