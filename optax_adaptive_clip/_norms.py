"""Global norms of update pytrees and their rescaling.

The norm is accumulated in float32 whatever the leaf dtype. The common case
(finite values, no overflow) costs one fused pass over the updates; only when
that pass returns a non-finite sum is a second, careful pass run, under
``jax.lax.cond``, to tell non-finite entries from overflow and to compute the
norm of the imputed values without overflowing.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_adaptive_clip import _checks

# NaN becomes 0 and +-inf becomes +-_IMPUTED_MAGNITUDE (capped to the dtype's
# largest finite value) in "impute" mode, as in the PyTorch prototype.
_IMPUTED_MAGNITUDE = 1e6

NONFINITE_MODES = ("impute", "zero", "propagate")


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


def _power_sum(updates: Any, kind: str, p: Any) -> jax.Array:
    """``sum |x|^p`` over every element (``max |x|`` for ``kind == "inf"``)."""
    leaves = jax.tree.leaves(updates)
    if kind == "inf":
        return functools.reduce(
            jnp.maximum,
            [jnp.max(_magnitude(leaf), initial=0.0) for leaf in leaves],
            jnp.zeros((), jnp.float32),
        )
    if kind == "1":
        per_leaf = [jnp.sum(_magnitude(leaf)) for leaf in leaves]
    elif kind == "2":
        per_leaf = [jnp.sum(jnp.square(_magnitude(leaf))) for leaf in leaves]
    else:
        per_leaf = [jnp.sum(_magnitude(leaf) ** p) for leaf in leaves]
    return sum(per_leaf, jnp.zeros((), jnp.float32))


def _root(power_sum: jax.Array, kind: str, p: Any) -> jax.Array:
    if kind in ("inf", "1"):
        return power_sum
    if kind == "2":
        return jnp.sqrt(power_sum)
    return power_sum ** (1.0 / p)


def _careful_norm(updates: Any, kind: str, p: Any) -> tuple[jax.Array, jax.Array]:
    """Norm of the imputed updates, scaled by their largest entry so it cannot overflow."""
    has_nonfinite = optax.tree.sum(
        jax.tree.map(lambda leaf: jnp.any(~jnp.isfinite(leaf)), updates)
    ) > 0
    imputed = jax.tree.map(impute_nonfinite, updates)
    largest = _power_sum(imputed, "inf", p)
    if kind == "inf":
        return largest, has_nonfinite
    safe_largest = jnp.where(largest > 0, largest, 1.0)
    normalised = jax.tree.map(lambda leaf: _magnitude(leaf) / safe_largest, imputed)
    norm = safe_largest * _root(_power_sum(normalised, kind, p), kind, p)
    return norm, has_nonfinite


def _kind_of(norm_ord: Any) -> str:
    p = float(norm_ord)
    if math.isinf(p):
        return "inf"
    if p in (1.0, 2.0):
        return str(int(p))
    return "p"


def _static_global_norm(updates: Any, kind: str, p: Any) -> tuple[jax.Array, jax.Array]:
    power_sum = _power_sum(updates, kind, p)
    return jax.lax.cond(
        jnp.isfinite(power_sum),
        lambda: (_root(power_sum, kind, p), jnp.zeros((), bool)),
        lambda: _careful_norm(updates, kind, p),
    )


def global_norm(updates: Any, norm_ord: Any = 2) -> tuple[jax.Array, jax.Array]:
    """Global p-norm of a pytree, and whether it held any NaN or inf.

    Args:
      updates: a pytree of arrays (``None`` leaves and empty trees allowed).
      norm_ord: p of the norm: any p >= 1 or ``float("inf")``. May be a traced
        scalar (as under ``optax.inject_hyperparams``).

    Returns:
      ``(norm, has_nonfinite)``: a float32 scalar, finite unless the true norm
      exceeds float32's range, computed over the updates with NaN read as 0 and
      +-inf as +-1e6; and a bool scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_adaptive_clip import global_norm
      >>> global_norm({"a": jnp.array([3.0, 4.0]), "b": None})
      (Array(5., dtype=float32), Array(False, dtype=bool))
      >>> global_norm([jnp.array([jnp.nan, 2.0])], norm_ord=1)
      (Array(2., dtype=float32), Array(True, dtype=bool))
    """
    if not _checks.is_traced(norm_ord):
        return _static_global_norm(updates, _kind_of(norm_ord), norm_ord)
    p = jnp.asarray(norm_ord, jnp.float32)
    branch = jnp.select([p == 1.0, p == 2.0, jnp.isinf(p)], [0, 1, 2], default=3)
    return jax.lax.switch(
        branch,
        [
            functools.partial(_static_global_norm, kind=kind, p=p)
            for kind in ("1", "2", "inf", "p")
        ],
        updates,
    )


def apply_threshold(
    updates: Any,
    norm: jax.Array,
    threshold: jax.Array,
    has_nonfinite: jax.Array,
    nonfinite: str,
) -> tuple[Any, jax.Array]:
    """Scales ``updates`` to norm ``threshold`` when ``norm > threshold``.

    Non-finite entries are handled by ``nonfinite``: ``"impute"`` replaces them
    (see :func:`impute_nonfinite`) and clips as usual; ``"zero"`` returns zeros;
    ``"propagate"`` returns the updates unchanged.

    Returns:
      ``(new_updates, clipped)``, ``clipped`` a bool scalar. Leaves keep their
      dtype; leaves that are not scaled come back bit-identical.
    """
    clipped = norm > threshold
    if nonfinite != "impute":
        clipped &= ~has_nonfinite
    # The divisor is never 0: where it would be, `clipped` is False (norm <= threshold).
    scale = threshold / jnp.where(clipped, norm, 1.0)

    def scale_leaf(leaf: jax.Array) -> jax.Array:
        if nonfinite == "impute":
            leaf = impute_nonfinite(leaf)
        # Multiplying by a float32 scalar promotes bf16/f16 to float32 for the product.
        new_leaf = jnp.where(clipped, (leaf * scale).astype(leaf.dtype), leaf)
        if nonfinite == "zero":
            new_leaf = jnp.where(has_nonfinite, jnp.zeros_like(leaf), new_leaf)
        return new_leaf

    return jax.tree.map(scale_leaf, updates), clipped
