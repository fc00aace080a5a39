"""Pure helpers over a fixed-size ring buffer of recorded gradient norms.

A history is a float32 vector ``norm_history`` of length ``window`` whose first
``min(count, window)`` slots hold valid norms (in ring order, which no
statistic here depends on) and whose other slots hold 0: the ring fills from
slot 0 of a zero-initialised buffer.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_adaptive_clip import _checks, _norms


def num_valid(norm_history: jax.Array, count: jax.Array) -> jax.Array:
    """How many slots of ``norm_history`` hold recorded norms."""
    return jnp.minimum(count, norm_history.shape[0])


def push(
    norm_history: jax.Array, next_index: jax.Array, norm: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Writes ``norm`` over the oldest slot; returns the history and the next slot.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_adaptive_clip import history_push
      >>> history_push(jnp.array([1.0, 2.0, 3.0]), jnp.array(1, jnp.int32), jnp.array(9.0))
      (Array([1., 9., 3.], dtype=float32), Array(2, dtype=int32))
    """
    # A NumPy history (a state restored from a checkpoint) has no `.at`.
    norm_history = jnp.asarray(norm_history)
    window = norm_history.shape[0]
    norm_history = norm_history.at[next_index].set(jnp.asarray(norm, norm_history.dtype))
    return norm_history, (next_index + 1) % window


def _mean(norm_history: jax.Array, valid_count: jax.Array) -> jax.Array:
    """Mean of the valid norms (0 when there are none); never overflows."""
    total = jnp.sum(norm_history)

    def overflowed_mean() -> jax.Array:
        # The sum overflows only with norms above float32's max / window; next to
        # those, what scaling down flushes to zero does not count.
        shift = max(norm_history.shape[0] - 1, 0).bit_length()  # 2**shift >= window
        scaled_total = jnp.sum(norm_history * 2.0**-shift)
        return jnp.minimum(scaled_total / valid_count * 2.0**shift, _norms.FLOAT32_MAX)

    return jax.lax.cond(
        jnp.isfinite(total), lambda: total / jnp.maximum(valid_count, 1.0), overflowed_mean
    )


def mean_std(norm_history: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and sample standard deviation (ddof=1, as ``torch.std``) of the valid norms.

    Slots from ``count`` on must hold 0, as they do in every state built by the
    clippers' ``init`` and updated by :func:`push`: the sum then needs no mask.

    The deviations are taken on the norms scaled by a power of two near their
    mean (an exact operation), then scaled back. No valid norm exceeds
    ``num_valid`` times the mean, so no square can overflow, however large the
    norms; with fewer than two valid norms the deviation is 0.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_adaptive_clip import history_mean_std
      >>> norms = jnp.arange(32, dtype=jnp.float32)
      >>> mean, std = history_mean_std(norms, jnp.array(32))
      >>> print(f"{float(mean):.4f} {float(std):.6f}")
      15.5000 9.380832
    """
    valid_count = num_valid(norm_history, count).astype(jnp.float32)
    mean = _mean(norm_history, valid_count)
    inv_unit = _norms.inverse_unit(mean)
    valid = jnp.arange(norm_history.shape[0]) < count
    squared_deviations = jnp.square(norm_history * inv_unit - mean * inv_unit)
    scaled_var = jnp.sum(jnp.where(valid, squared_deviations, 0.0)) / jnp.maximum(
        valid_count - 1.0, 1.0
    )
    return mean, jnp.sqrt(scaled_var) / inv_unit


def percentile(norm_history: jax.Array, count: jax.Array, q: Any) -> jax.Array:
    """The ``q``-th percentile of the valid norms, interpolated as ``numpy.percentile``.

    ``q`` must lie in [0, 100]. A traced ``q`` (an injected hyperparameter)
    cannot be checked: it is clipped into that range, and a NaN ``q`` gives NaN.
    An empty history (``count == 0``) gives ``inf``: no threshold.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_adaptive_clip import history_percentile
      >>> norms = jnp.array([4.0, 1.0, 3.0, 2.0, 0.0])  # last slot not yet valid
      >>> history_percentile(norms, jnp.array(4), 50.0)
      Array(2.5, dtype=float32)
    """
    if not _checks.is_traced(q):
        for value in np.ravel(np.asarray(q, dtype=object)):  # q may hold several percentiles
            _checks.check_real("q", value, low=0.0, high=100.0)
    q = jnp.asarray(q, jnp.float32)
    valid = jnp.arange(norm_history.shape[0]) < count
    # Invalid slots sort to the end, so the first `n` sorted values are the valid norms.
    ordered = jnp.sort(jnp.where(valid, norm_history, jnp.inf))
    n = num_valid(norm_history, count)
    # A NaN q is kept out of the index arithmetic and returned as NaN at the end.
    clipped_q = jnp.where(jnp.isnan(q), 0.0, jnp.clip(q, 0.0, 100.0))
    position = clipped_q / 100.0 * jnp.maximum(n - 1, 0).astype(jnp.float32)
    below = jnp.floor(position).astype(jnp.int32)
    above = jnp.minimum(below + 1, jnp.maximum(n - 1, 0))
    fraction = position - below.astype(jnp.float32)
    low_value, high_value = ordered[below], ordered[above]
    # Written so that equal neighbours return exactly that value.
    value = jnp.where(fraction > 0, low_value + fraction * (high_value - low_value), low_value)
    return jnp.where(jnp.isnan(q), jnp.nan, value)
