"""ZClip: z-score clipping against exponential moving averages of the norm."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_adaptive_clip import _checks, _clipping, _norms

CLIP_OPTIONS = ("adaptive_scaling", "mean")


class ZClipState(NamedTuple):
    """State of :func:`zclip`: O(1) in the window, every field a scalar."""

    count: jax.Array
    """int32, norms folded into the statistics so far (saturating)."""
    num_updates: jax.Array
    """int32, updates seen so far (saturating); differs from ``count`` when
    spikes or non-finite updates are kept out of the statistics."""
    mean: jax.Array
    """float32, mean of the warmup norms, then their exponential moving average."""
    var: jax.Array
    """float32, population variance of the warmup norms, then its moving average."""
    last_norm: jax.Array
    """float32, global norm of the latest update before clipping."""
    threshold: jax.Array
    """float32, norm the latest update was clipped to if above it (in warmup ``max_norm``,
    or ``inf`` without one)."""
    last_clipped: jax.Array
    """bool, whether the latest update was scaled down."""
    clip_count: jax.Array
    """int32, updates scaled down so far."""
    nonfinite_count: jax.Array
    """int32, updates that contained NaN or inf so far."""


def zclip(
    alpha: float = 0.97,
    z_thresh: float = 2.5,
    warmup_steps: int = 25,
    *,
    clip_option: str = "adaptive_scaling",
    skip_update_on_spike: bool = False,
    eps: float = 1e-6,
    norm_ord: int | float = 2,
    max_norm: float | None = None,
    nonfinite: str = "impute",
) -> optax.GradientTransformation:
    """Clips updates whose norm is a z-score outlier against moving averages.

    ZClip (Kumar et al., 2025) keeps exponential moving averages of the mean
    and variance of the global norm, initialised from the mean and population
    variance of the first ``warmup_steps`` norms (no adaptive clipping during
    warmup; ``max_norm`` still caps). Afterwards, with
    ``z = (g - mean) / (std + eps)``:

    * if ``z > z_thresh`` the update is clipped to
      ``mean + z_thresh * std / (z / z_thresh)`` ("adaptive_scaling": the further
      the outlier, the harder the clip) or to ``mean`` (``clip_option="mean"``);
    * the averages are then updated with the norm ZClip applied,
      ``min(g, clip value)``, so that a spike cannot inflate them; with
      ``skip_update_on_spike`` they are left untouched on a spike instead.
      Averages without spread (warmup norms all equal, as when a module's
      gradient is 0 for the first steps) take the norm as it came, so that they
      can start to move. With ``skip_update_on_spike`` only that first norm is
      taken: the averages then have spread, and norms that stay far above them
      are held back as spikes from then on.

    The ``max_norm`` cap is a safety net outside the rule: it clips, but the
    averages see the rule's own clip value, as in the authors' implementation.

    ``threshold`` in the state is the norm above which the latest update would
    have been clipped, or the value it was clipped to.

    Args:
      alpha: EMA decay, in (0, 1).
      z_thresh: z-score above which a norm is a spike (finite, > 0).
      warmup_steps: norms collected before the averages are used (>= 1).
      clip_option: ``"adaptive_scaling"`` or ``"mean"``.
      skip_update_on_spike: leave the averages untouched on a spike.
      eps: added to the standard deviation in the z-score (finite, > 0).
      norm_ord: p of the global p-norm: any p >= 1, or ``float("inf")``.
      max_norm: optional absolute cap, always applied.
      nonfinite: ``"impute"``, ``"zero"`` or ``"propagate"``, as in
        :func:`adaptive_clip`.

    Returns:
      An :class:`optax.GradientTransformation` whose state is a
      :class:`ZClipState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_adaptive_clip as oac
      >>> tx = oac.zclip(warmup_steps=4)
      >>> state = tx.init(jnp.zeros(1))
      >>> for norm in [1.0, 2.0, 1.0, 2.0]:  # warmup: mean 1.5, std 0.5
      ...   _, state = tx.update(jnp.array([norm]), state)
      >>> updates, state = tx.update(jnp.array([4.0]), state)  # z = 5
      >>> print(f"{float(updates[0]):.5f}")  # 1.5 + 2.5 * 0.5 / (5 / 2.5)
      2.12500

    References:
      Kumar et al., `ZClip: Adaptive Spike Mitigation for LLM Pre-Training
      <https://arxiv.org/abs/2504.02507>`_, 2025
    """
    _checks.check_real("alpha", alpha, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    _checks.check_real("z_thresh", z_thresh, low=0.0, low_inclusive=False)
    warmup_steps = _checks.check_int(
        "warmup_steps", warmup_steps, minimum=1, maximum=_checks.INT32_MAX
    )
    _checks.check_bool("skip_update_on_spike", skip_update_on_spike)
    _checks.check_real("eps", eps, low=0.0, low_inclusive=False)
    _checks.check_choice("clip_option", clip_option, CLIP_OPTIONS)
    _clipping.check_common_options(norm_ord=norm_ord, max_norm=max_norm, nonfinite=nonfinite)

    def init_fn(params: optax.Params) -> ZClipState:
        del params
        zero_count = jnp.zeros((), jnp.int32)
        zero = jnp.zeros((), jnp.float32)
        return ZClipState(
            count=zero_count,
            num_updates=zero_count,
            mean=zero,
            var=zero,
            last_norm=zero,
            threshold=jnp.full((), jnp.inf, jnp.float32),
            last_clipped=jnp.zeros((), bool),
            clip_count=zero_count,
            nonfinite_count=zero_count,
        )

    def update_fn(
        updates: optax.Updates, state: ZClipState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ZClipState]:
        del params
        norm_parts = _norms.norm_parts(updates, norm_ord)
        norm, has_nonfinite = norm_parts.norm, norm_parts.has_nonfinite
        recordable = _clipping.recordable_mask(has_nonfinite, nonfinite)
        warmed_up = state.count >= warmup_steps

        std = jnp.sqrt(state.var)
        z = (norm - state.mean) / (std + eps)
        spike = warmed_up & (z > z_thresh)
        if clip_option == "mean":
            clip_value = state.mean
        else:
            # Dividing by z is safe: it is only used where z > z_thresh > 0.
            clip_value = state.mean + z_thresh * std * z_thresh / jnp.where(spike, z, 1.0)
        # The spike test alone decides: a norm a rounding error above the onset
        # computed below, but with z == z_thresh, must pass untouched.
        clip_at = _clipping.cap_threshold(jnp.where(spike, clip_value, jnp.inf), max_norm)
        updates, clipped = _norms.apply_threshold(updates, norm_parts, clip_at, nonfinite)
        # Reported threshold: where clipping starts (z == z_thresh) unless it happened.
        onset = jnp.where(warmed_up, state.mean + z_thresh * (std + eps), jnp.inf)
        threshold = _clipping.cap_threshold(jnp.where(spike, clip_value, onset), max_norm)

        # Warmup: running mean and population variance (Welford's update).
        n = (state.count + 1).astype(jnp.float32)
        warm_mean = state.mean + (norm - state.mean) / n
        warm_var = state.var + ((norm - state.mean) * (norm - warm_mean) - state.var) / n
        # After warmup: moving averages of the norm the rule applied. Averages without
        # spread (warmup norms all equal, typically all 0 while a module was frozen)
        # cannot tell a spike from a shift, and folding their own mean back in would keep
        # them so for good: they take the norm as it came.
        has_spread = state.var > 0
        held_back = spike & has_spread
        applied = jnp.where(held_back, jnp.minimum(norm, clip_value), norm)
        # A step from the mean towards the norm cannot overflow. (Written as
        # alpha * mean + (1 - alpha) * norm, XLA folds it into (mean + norm) / 2 at
        # alpha = 0.5, and that sum can.)
        ema_mean = state.mean + (1.0 - alpha) * (applied - state.mean)
        ema_var = alpha * state.var + (1.0 - alpha) * jnp.square(applied - ema_mean)
        # Saturating keeps huge norms (or an injected alpha outside (0, 1)) from
        # turning the statistics into inf, then NaN.
        new_mean = jnp.clip(jnp.where(warmed_up, ema_mean, warm_mean), 0.0, _norms.FLOAT32_MAX)
        new_mean = new_mean.astype(jnp.float32)
        new_var = jnp.clip(jnp.where(warmed_up, ema_var, warm_var), 0.0, _norms.FLOAT32_MAX)
        # Injected hyperparameters are unchecked (see _checks); with a NaN or
        # out-of-range alpha, eps or z_thresh the averages keep their values
        # rather than turn NaN.
        new_mean = jnp.where(jnp.isnan(new_mean), state.mean, new_mean)
        new_var = jnp.where(jnp.isnan(new_var), state.var, new_var)

        folds = recordable & ~held_back if skip_update_on_spike else recordable
        clip_count, nonfinite_count = _clipping.count_events(
            state.clip_count, state.nonfinite_count, clipped, has_nonfinite
        )
        new_state = ZClipState(
            count=jnp.where(folds, optax.safe_int32_increment(state.count), state.count),
            num_updates=optax.safe_int32_increment(state.num_updates),
            mean=jnp.where(folds, new_mean, state.mean),
            var=jnp.where(folds, new_var.astype(jnp.float32), state.var),
            last_norm=norm,
            threshold=threshold,
            last_clipped=clipped,
            clip_count=clip_count,
            nonfinite_count=nonfinite_count,
        )
        return updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)
