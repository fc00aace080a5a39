"""Clipping by global norm with a threshold learned from a ring buffer of past norms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_adaptive_clip import _checks, _history, _norms

RECORD_MODES = ("raw", "clipped")


class AdaptiveClipState(NamedTuple):
    """State of :func:`adaptive_clip` and :func:`autoclip`. Every field has a fixed shape."""

    norms: jax.Array
    """float32[window] ring buffer of recorded norms; slot ``i`` is valid once
    ``count > i``."""
    count: jax.Array
    """int32, norms recorded so far (saturates at the int32 maximum)."""
    next_index: jax.Array
    """int32, slot the next norm is written to. Kept apart from ``count`` because
    ``count`` saturates while the ring must keep turning."""
    last_norm: jax.Array
    """float32, global norm of the latest update before clipping (with NaN read
    as 0 and +-inf as +-1e6)."""
    threshold: jax.Array
    """float32, threshold applied to the latest update; ``inf`` when none was."""
    last_clipped: jax.Array
    """bool, whether the latest update was scaled down."""
    clip_count: jax.Array
    """int32, updates scaled down so far."""
    nonfinite_count: jax.Array
    """int32, updates that contained NaN or inf so far."""


def init_history_state(params: Any, window: int) -> AdaptiveClipState:
    """The empty :class:`AdaptiveClipState` for a ring buffer of ``window`` norms."""
    del params
    zero = jnp.zeros((), jnp.int32)
    return AdaptiveClipState(
        norms=jnp.zeros((window,), jnp.float32),
        count=zero,
        next_index=zero,
        last_norm=jnp.zeros((), jnp.float32),
        threshold=jnp.full((), jnp.inf, jnp.float32),
        last_clipped=jnp.zeros((), bool),
        clip_count=zero,
        nonfinite_count=zero,
    )


def check_window(state_norms: jax.Array, window: int, name: str) -> None:
    if state_norms.shape != (window,):
        raise ValueError(
            f"{name} was built with window={window} but was given a state whose norm "
            f"history has shape {state_norms.shape}; initialise the state with the same "
            "transformation that updates it."
        )


def warmup_threshold(warmup_max_norm: Any) -> jax.Array:
    """The threshold used before enough norms are recorded."""
    return jnp.asarray(jnp.inf if warmup_max_norm is None else warmup_max_norm, jnp.float32)


def cap_threshold(threshold: jax.Array, max_norm: Any) -> jax.Array:
    """Applies the optional absolute cap ``max_norm``; the result is float32 and >= 0.

    The cast keeps the state's dtype fixed when hyperparameters come as float64
    (numpy scalars, or ``inject_hyperparams`` under x64).

    Injected hyperparameters reach here unchecked (see ``_checks``), so whatever
    they are, a NaN cap is no cap, a NaN threshold is none (inf), and a negative
    one is 0: an update is never reversed and the state never holds NaN.
    """
    if max_norm is not None:
        threshold = jnp.fmin(threshold, max_norm)
    threshold = jnp.where(jnp.isnan(threshold), jnp.inf, jnp.maximum(threshold, 0.0))
    return threshold.astype(jnp.float32)


class _History(NamedTuple):
    norms: jax.Array
    count: jax.Array
    next_index: jax.Array


def record_norm(
    state: Any, norm: jax.Array, threshold: jax.Array, *, record: str, recordable: jax.Array
) -> _History:
    """The ring buffer fields of ``state`` after recording ``norm``.

    Nothing changes where ``recordable`` is False.
    """
    # The clippers pass thresholds from cap_threshold, never NaN; a NaN threshold
    # given to this helper directly does not enter the history either.
    if record == "clipped":
        # A threshold of 0 comes from a history of zero norms (a module frozen for the
        # first steps); recording min(norm, 0) would keep it at 0 and zero every later
        # update, so the norm is recorded as it came (as it is for NaN).
        recorded = jnp.where(threshold > 0, jnp.minimum(norm, threshold), norm)
    else:
        # Exactly `norm`, but made to depend on the threshold: the write is then
        # ordered after the statistics have read the history, and XLA updates a
        # donated history in place instead of copying it. fmin/fmax ignore NaN.
        recorded = jnp.fmin(norm, jnp.fmax(norm, threshold))
    pushed_norms, pushed_index = _history.push(state.norms, state.next_index, recorded)
    return _History(
        norms=jnp.where(recordable, pushed_norms, state.norms),
        count=jnp.where(recordable, optax.safe_int32_increment(state.count), state.count),
        next_index=jnp.where(recordable, pushed_index, state.next_index),
    )


def recordable_mask(has_nonfinite: jax.Array, nonfinite: str) -> jax.Array:
    """Whether an update's norm may enter the history: only imputed non-finite norms do."""
    if nonfinite == "impute":
        return jnp.ones((), bool)
    return ~has_nonfinite


def _ring_buffer_clip(
    rule: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    name: str,
    window: int,
    min_history: Any,
    include_current: bool,
    norm_ord: Any,
    warmup_max_norm: Any,
    max_norm: Any,
    record: str,
    nonfinite: str,
) -> optax.GradientTransformation:
    """Clipping whose threshold is ``rule(norm_history, count)`` over a ring buffer.

    With ``include_current`` the rule sees the current norm as if already
    recorded (AutoClip); otherwise only the norms of earlier updates.
    """

    def init_fn(params: optax.Params) -> AdaptiveClipState:
        return init_history_state(params, window)

    def update_fn(
        updates: optax.Updates, state: AdaptiveClipState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, AdaptiveClipState]:
        del params
        check_window(state.norms, window, name)
        norm_parts = _norms.norm_parts(updates, norm_ord)
        norm, has_nonfinite = norm_parts.norm, norm_parts.has_nonfinite
        recordable = recordable_mask(has_nonfinite, nonfinite)

        if include_current:
            seen = record_norm(state, norm, norm, record="raw", recordable=recordable)
        else:
            seen = state
        threshold = jnp.where(
            seen.count >= min_history,
            rule(seen.norms, seen.count),
            warmup_threshold(warmup_max_norm),
        )
        threshold = cap_threshold(threshold, max_norm)

        updates, clipped = _norms.apply_threshold(updates, norm_parts, threshold, nonfinite)
        history = record_norm(state, norm, threshold, record=record, recordable=recordable)
        clip_count, nonfinite_count = count_events(
            state.clip_count, state.nonfinite_count, clipped, has_nonfinite
        )
        new_state = AdaptiveClipState(
            norms=history.norms,
            count=history.count,
            next_index=history.next_index,
            last_norm=norm,
            threshold=threshold,
            last_clipped=clipped,
            clip_count=clip_count,
            nonfinite_count=nonfinite_count,
        )
        return updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)


def mean_plus_std_rule(num_std: Any) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The rule ``mean + num_std * std`` over the recorded norms."""

    def mean_plus_std(norm_history: jax.Array, count: jax.Array) -> jax.Array:
        mean, std = _history.mean_std(norm_history, count)
        # Written so that num_std == 0 with an overflowed std stays finite, and so that
        # an injected NaN num_std gives a NaN threshold, which counts as none.
        headroom = jnp.where(num_std > 0, num_std * std, 0.0)
        return mean + jnp.where(jnp.isnan(num_std), jnp.nan, headroom)

    return mean_plus_std


def count_events(
    event_count: jax.Array,
    nonfinite_count: jax.Array,
    event: jax.Array,
    has_nonfinite: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """``event_count`` (clips or skips) and ``nonfinite_count`` after one update."""
    return (
        jnp.where(event, optax.safe_int32_increment(event_count), event_count),
        jnp.where(has_nonfinite, optax.safe_int32_increment(nonfinite_count), nonfinite_count),
    )


def check_common_options(
    *,
    norm_ord: Any,
    max_norm: Any,
    warmup_max_norm: Any = None,
    record: str = "raw",
    nonfinite: str = "impute",
) -> None:
    """Validates the options every history-based clipper shares."""
    _checks.check_norm_ord(norm_ord)
    _checks.check_optional_positive("warmup_max_norm", warmup_max_norm)
    _checks.check_optional_positive("max_norm", max_norm)
    _checks.check_choice("record", record, RECORD_MODES)
    _checks.check_choice("nonfinite", nonfinite, _norms.NONFINITE_MODES)


def adaptive_clip(
    window: int = 32,
    num_std: float = 1.0,
    *,
    norm_ord: int | float = 2,
    min_history: int | None = None,
    warmup_max_norm: float | None = None,
    max_norm: float | None = None,
    record: str = "raw",
    nonfinite: str = "impute",
) -> optax.GradientTransformation:
    """Clips updates by global norm to ``mean + num_std * std`` of recent norms.

    The threshold is learned from a ring buffer of the last ``window`` global
    norms, following the heuristic of Pascanu et al. (2013, section 3.2): an
    update whose norm exceeds the mean of the recorded norms by more than
    ``num_std`` sample standard deviations is scaled down to exactly that
    threshold, its direction kept; any other update passes through unchanged.
    Before ``min_history`` norms are recorded no statistics are used and the
    threshold is ``warmup_max_norm`` (no clipping when ``None``). The defaults
    reproduce the PyTorch prototype: 32 norms, one standard deviation, and NaN
    read as 0 and +-inf as +-1e6.

    Each update:

    1. handles non-finite entries as ``nonfinite`` says;
    2. computes its global ``norm_ord``-norm ``g`` in float32;
    3. takes the threshold from the norms recorded *before* it, capped by
       ``max_norm``;
    4. scales every leaf by ``threshold / g`` when ``g > threshold``;
    5. records ``g`` (or ``min(g, threshold)`` with ``record="clipped"``),
       the oldest norm falling out first.

    Everything runs inside the traced update: no host round-trips, no
    retracing, usable under ``jit``, ``lax.scan`` and sharding.

    Args:
      window: number of norms kept in the ring buffer (>= 2). Static.
      num_std: the threshold is ``mean + num_std * std`` (finite, >= 0).
      norm_ord: p of the global p-norm: any p >= 1, or ``float("inf")``.
      min_history: norms needed before statistics are used, in
        ``[2, window]``; ``None`` means ``window``.
      warmup_max_norm: constant threshold until then; ``None`` for no
        clipping during warmup.
      max_norm: optional absolute cap on the threshold, always applied.
      record: ``"raw"`` records the norm before clipping; ``"clipped"`` records
        ``min(norm, threshold)``, so that spikes do not inflate the statistics
        (but the norm itself while the threshold is 0, from a history of zero
        norms). The threshold then follows a lasting rise of the norm only
        through the ``num_std * std`` headroom: slowly at ``num_std=1``.
      nonfinite: ``"impute"`` replaces NaN by 0 and +-inf by +-1e6 (capped to
        the dtype's range) before anything else; ``"zero"`` returns zeros for an
        update with any NaN or inf and leaves the history untouched;
        ``"propagate"`` passes such an update through unchanged and does not
        record its norm. Every mode counts it in ``nonfinite_count``.

    Returns:
      An :class:`optax.GradientTransformation` whose state is an
      :class:`AdaptiveClipState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_adaptive_clip as oac
      >>> tx = oac.adaptive_clip(window=4)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> for norm in [1.0, 2.0, 3.0, 4.0]:  # fills the history: no clipping yet
      ...   _, state = tx.update({"w": jnp.array([norm, 0.0])}, state)
      >>> updates, state = tx.update({"w": jnp.array([0.0, 10.0])}, state)
      >>> print(*(f"{value:.5f}" for value in updates["w"].tolist()))  # mean + std: 2.5 + 1.29099
      0.00000 3.79099
      >>> bool(state.last_clipped), int(state.clip_count)
      (True, 1)

    References:
      Pascanu et al., `On the difficulty of training Recurrent Neural Networks
      <https://arxiv.org/abs/1211.5063>`_, 2013
    """
    window = _checks.check_static_int("window", window, minimum=2)
    _checks.check_real("num_std", num_std, low=0.0)
    min_history = _checks.check_min_history(min_history, window=window, minimum=2)
    check_common_options(
        norm_ord=norm_ord,
        warmup_max_norm=warmup_max_norm,
        max_norm=max_norm,
        record=record,
        nonfinite=nonfinite,
    )

    return _ring_buffer_clip(
        mean_plus_std_rule(num_std),
        name="adaptive_clip",
        window=window,
        min_history=min_history,
        include_current=False,
        norm_ord=norm_ord,
        warmup_max_norm=warmup_max_norm,
        max_norm=max_norm,
        record=record,
        nonfinite=nonfinite,
    )


def autoclip(
    percentile: float = 10.0,
    window: int = 1000,
    *,
    norm_ord: int | float = 2,
    min_history: int | None = 1,
    warmup_max_norm: float | None = None,
    max_norm: float | None = None,
    record: str = "raw",
    nonfinite: str = "impute",
) -> optax.GradientTransformation:
    """Clips updates to the ``percentile``-th percentile of recent global norms.

    AutoClip (Seetharaman et al., 2020) records every gradient norm and clips
    each update to the chosen percentile of all norms seen so far, the current
    one included. Here the last ``window`` norms stand for the whole history so
    that memory stays bounded; with ``window`` at least the number of training
    steps the rule is exactly the paper's. The percentile interpolates linearly
    between neighbouring norms, as ``numpy.percentile``.

    Args:
      percentile: percentile of the recorded norms to clip to, in (0, 100].
      window: number of norms kept in the ring buffer (>= 2). Static.
      norm_ord: p of the global p-norm: any p >= 1, or ``float("inf")``.
      min_history: norms (the current one included) needed before the
        percentile is used, in ``[1, window]``; ``None`` means ``window``. The
        default 1 clips from the first step, as the paper does.
      warmup_max_norm: constant threshold until then; ``None`` for none.
      max_norm: optional absolute cap on the threshold, always applied.
      record: ``"raw"`` (the paper's rule) or ``"clipped"``, as in
        :func:`adaptive_clip`. With ``"clipped"`` every recorded norm is at most
        the percentile it was clipped to, so a threshold that once got low (say
        after a few zero norms) stays low.
      nonfinite: ``"impute"``, ``"zero"`` or ``"propagate"``, as in
        :func:`adaptive_clip`.

    Returns:
      An :class:`optax.GradientTransformation` whose state is an
      :class:`AdaptiveClipState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_adaptive_clip as oac
      >>> tx = oac.autoclip(percentile=50.0, window=8)
      >>> state = tx.init(jnp.zeros(1))
      >>> for norm in [1.0, 2.0, 3.0]:
      ...   updates, state = tx.update(jnp.array([norm]), state)
      >>> updates  # the median of 1, 2, 3
      Array([2.], dtype=float32)

    References:
      Seetharaman et al., `AutoClip: Adaptive Gradient Clipping for Source
      Separation Networks <https://arxiv.org/abs/2007.14469>`_, 2020
    """
    window = _checks.check_static_int("window", window, minimum=2)
    _checks.check_real("percentile", percentile, low=0.0, high=100.0, low_inclusive=False)
    min_history = _checks.check_min_history(min_history, window=window, minimum=1)
    check_common_options(
        norm_ord=norm_ord,
        warmup_max_norm=warmup_max_norm,
        max_norm=max_norm,
        record=record,
        nonfinite=nonfinite,
    )

    def clip_to_percentile(norm_history: jax.Array, count: jax.Array) -> jax.Array:
        return _history.percentile(norm_history, count, percentile)

    return _ring_buffer_clip(
        clip_to_percentile,
        name="autoclip",
        window=window,
        min_history=min_history,
        include_current=True,
        norm_ord=norm_ord,
        warmup_max_norm=warmup_max_norm,
        max_norm=max_norm,
        record=record,
        nonfinite=nonfinite,
    )
