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
    window = norm_history.shape[0]
    norm_history = norm_history.at[next_index].set(norm.astype(norm_history.dtype))
    return norm_history, (next_index + 1) % window


def mean_std(norm_history: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and sample standard deviation (ddof=1, as ``torch.std``) of the valid norms.

    Slots from ``count`` on must hold 0, as they do in every state built by the
    clippers' ``init`` and updated by :func:`push`: the largest norm and the sum
    then need no mask, which keeps long histories fast on XLA:CPU, where a
    masked reduction is several times slower.

    Both statistics are computed on the norms scaled by a power of two near
    their largest value (an exact operation), then scaled back, so that huge
    norms cannot overflow the squares; with fewer than two valid norms the
    deviation is 0.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_adaptive_clip import history_mean_std
      >>> norms = jnp.arange(32, dtype=jnp.float32)
      >>> mean, std = history_mean_std(norms, jnp.array(32))
      >>> print(f"{float(mean):.4f} {float(std):.6f}")
      15.5000 9.380832
    """
    valid_count = num_valid(norm_history, count).astype(jnp.float32)
    largest = jnp.max(norm_history)
    # unit = 2**(e - 2) with largest < 2**e: scaling by it is exact, and both it and
    # its reciprocal are normal float32 values (a product is much cheaper than a division).
    _, exponent = jnp.frexp(jnp.where(largest > 0, largest, 1.0))
    exponent = jnp.clip(exponent, -124, 128)
    unit = jnp.ldexp(jnp.ones((), norm_history.dtype), exponent - 2)
    scaled = norm_history * jnp.ldexp(jnp.ones((), norm_history.dtype), 2 - exponent)
    scaled_mean = jnp.sum(scaled) / jnp.maximum(valid_count, 1.0)
    # Valid slots weigh 1 and the others 0: on XLA:CPU a product is cheaper than a
    # select. Every scaled deviation is below 4, so none turns a weight of 0 into NaN.
    weight = jnp.clip(count - jnp.arange(norm_history.shape[0]), 0, 1).astype(scaled.dtype)
    squared_deviations = jnp.square(scaled - scaled_mean) * weight
    scaled_var = jnp.sum(squared_deviations) / jnp.maximum(valid_count - 1.0, 1.0)
    return scaled_mean * unit, jnp.sqrt(scaled_var) * unit


def percentile(norm_history: jax.Array, count: jax.Array, q: Any) -> jax.Array:
    """The ``q``-th percentile of the valid norms, interpolated as ``numpy.percentile``.

    Example:
      >>> import jax.numpy as jnp
      >>> from optax_adaptive_clip import history_percentile
      >>> norms = jnp.array([4.0, 1.0, 3.0, 2.0, 0.0])  # last slot not yet valid
      >>> history_percentile(norms, jnp.array(4), 50.0)
      Array(2.5, dtype=float32)
    """
    valid = jnp.arange(norm_history.shape[0]) < count
    # Invalid slots sort to the end, so the first `n` sorted values are the valid norms.
    ordered = jnp.sort(jnp.where(valid, norm_history, jnp.inf))
    n = num_valid(norm_history, count)
    position = jnp.asarray(q, jnp.float32) / 100.0 * jnp.maximum(n - 1, 0).astype(jnp.float32)
    below = jnp.floor(position).astype(jnp.int32)
    above = jnp.minimum(below + 1, jnp.maximum(n - 1, 0))
    fraction = position - below.astype(jnp.float32)
    low_value, high_value = ordered[below], ordered[above]
    # Written so that equal neighbours return exactly that value.
    return jnp.where(fraction > 0, low_value + fraction * (high_value - low_value), low_value)
