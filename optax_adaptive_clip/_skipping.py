"""Skipping whole optimizer steps whose gradient norm is an outlier."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_adaptive_clip import _checks, _clipping, _norms


class SkipOnSpikeState(NamedTuple):
    """State of :func:`skip_on_spike`; all but ``inner_state`` are arrays of fixed shape."""

    inner_state: Any
    """State of the wrapped transformation, untouched by skipped steps."""
    norms: jax.Array
    """float32[window] ring buffer of recorded norms."""
    count: jax.Array
    """int32, norms recorded so far (saturating)."""
    next_index: jax.Array
    """int32, slot the next norm is written to."""
    last_norm: jax.Array
    """float32, global norm of the latest incoming gradient."""
    threshold: jax.Array
    """float32, norm above which the latest step was skipped (``inf`` when none)."""
    last_skipped: jax.Array
    """bool, whether the latest step was skipped."""
    skip_count: jax.Array
    """int32, steps skipped so far (outliers and non-finite gradients)."""
    nonfinite_count: jax.Array
    """int32, gradients that contained NaN or inf so far."""


def skip_on_spike(
    inner: optax.GradientTransformation,
    *,
    window: int = 32,
    num_std: float = 6.0,
    norm_ord: int | float = 2,
    min_history: int | None = None,
    max_norm: float | None = None,
    record: str = "clipped",
) -> optax.GradientTransformationExtraArgs:
    """Skips the whole ``inner`` step when the gradient norm is an outlier.

    In the manner of :func:`optax.apply_if_finite`, but the test is learned:
    a step is skipped when its gradient has a NaN or inf, or when its global
    norm exceeds ``mean + num_std * std`` of the last ``window`` recorded
    norms (or ``max_norm``, when given). A skipped step returns zero updates
    and leaves the inner state (say Adam's moments and step count) exactly as
    it was, so one corrupted batch leaves no trace; otherwise ``inner`` runs
    as usual. The inner step is not run at all when skipped (``lax.cond``).
    Where ``inner`` returns a state leaf in another dtype than it took (Adam's
    first moment of an integer parameter), a skipped step converts the kept
    value to that dtype.

    With the default ``record="clipped"`` a skipped norm is recorded as the
    threshold itself: a lasting rise of the norm then lifts the threshold step
    by step rather than being skipped forever, while a lone spike barely moves
    the statistics. ``record="raw"`` records the norm as it came, and so does
    ``"clipped"`` while the threshold is 0 (from a history of zero norms).

    Args:
      inner: the transformation to protect, e.g. ``optax.adam(1e-3)``.
      window: number of norms kept in the ring buffer (>= 2). Static.
      num_std: the threshold is ``mean + num_std * std`` (finite, >= 0).
      norm_ord: p of the global p-norm: any p >= 1, or ``float("inf")``.
      min_history: norms needed before outliers are detected, in
        ``[2, window]``; ``None`` means ``window``. Until then only
        non-finite gradients (and ``max_norm``) cause skips.
      max_norm: optional absolute limit: a norm above it is always skipped.
      record: ``"clipped"`` (default) or ``"raw"``, see above.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose state is a
      :class:`SkipOnSpikeState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optax_adaptive_clip as oac
      >>> tx = oac.skip_on_spike(optax.adam(0.1), window=4, num_std=3.0)
      >>> state = tx.init(jnp.zeros(1))
      >>> for grad in [1.0, 1.1, 0.9, 1.0]:
      ...   _, state = tx.update(jnp.array([grad]), state)
      >>> updates, state = tx.update(jnp.array([100.0]), state)
      >>> updates, int(state.skip_count), int(state.inner_state[0].count)
      (Array([0.], dtype=float32), 1, 4)
    """
    window = _checks.check_static_int("window", window, minimum=2)
    _checks.check_real("num_std", num_std, low=0.0)
    min_history = _checks.check_min_history(min_history, window=window, minimum=2)
    _clipping.check_common_options(norm_ord=norm_ord, max_norm=max_norm, record=record)
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        raise ValueError(
            "`inner` must be an optax.GradientTransformation, such as optax.adam(1e-3) "
            f"(not the factory optax.adam); got {inner!r}."
        )
    inner = optax.with_extra_args_support(inner)
    outlier_threshold = _clipping.mean_plus_std_rule(num_std)

    def init_fn(params: optax.Params) -> SkipOnSpikeState:
        history = _clipping.init_history_state(params, window)
        return SkipOnSpikeState(
            inner_state=inner.init(params),
            norms=history.norms,
            count=history.count,
            next_index=history.next_index,
            last_norm=history.last_norm,
            threshold=history.threshold,
            last_skipped=history.last_clipped,
            skip_count=history.clip_count,
            nonfinite_count=history.nonfinite_count,
        )

    def update_fn(
        updates: optax.Updates,
        state: SkipOnSpikeState,
        params: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SkipOnSpikeState]:
        _clipping.check_window(state.norms, window, "skip_on_spike")
        norm, has_nonfinite = _norms.global_norm(updates, norm_ord)
        threshold = jnp.where(
            state.count >= min_history, outlier_threshold(state.norms, state.count), jnp.inf
        )
        threshold = _clipping.cap_threshold(threshold, max_norm)
        skipped = has_nonfinite | (norm > threshold)

        # Under shard_map the branches' outputs must vary over the same mesh axes: the
        # new inner state over those of the old one too, and the zeros and the old state
        # over those of what `inner` returns.
        def run_inner() -> tuple[Any, Any]:
            new_updates, inner_state = inner.update(
                updates, state.inner_state, params, **extra_args
            )
            return new_updates, jax.tree.map(_norms.vary_like, inner_state, state.inner_state)

        def skip_inner() -> tuple[Any, Any]:
            # Zeros, and the kept state, in the dtypes `inner` returns, which may differ
            # from those it took: optax.adam turns the moments of integer parameters into
            # floats.
            update_shapes, state_shapes = jax.eval_shape(run_inner)
            zeros = jax.tree.map(
                lambda leaf: _norms.vary_like(jnp.zeros(leaf.shape, leaf.dtype), leaf),
                update_shapes,
            )
            kept_state = jax.tree.map(
                lambda leaf, like: _norms.vary_like(jnp.asarray(leaf, like.dtype), like),
                state.inner_state,
                state_shapes,
            )
            return zeros, kept_state

        new_updates, inner_state = jax.lax.cond(skipped, skip_inner, run_inner)
        # Non-finite gradients are skipped and never recorded.
        history = _clipping.record_norm(
            state, norm, threshold, record=record, recordable=~has_nonfinite
        )
        skip_count, nonfinite_count = _clipping.count_events(
            state.skip_count, state.nonfinite_count, skipped, has_nonfinite
        )
        new_state = SkipOnSpikeState(
            inner_state=inner_state,
            norms=history.norms,
            count=history.count,
            next_index=history.next_index,
            last_norm=norm,
            threshold=threshold,
            last_skipped=skipped,
            skip_count=skip_count,
            nonfinite_count=nonfinite_count,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
