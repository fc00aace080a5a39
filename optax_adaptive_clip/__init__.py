"""Gradient clipping for Optax with a threshold learned from the history of gradient norms.

Example:
  >>> import optax
  >>> import optax_adaptive_clip as oac
  >>> tx = optax.chain(oac.adaptive_clip(), optax.adam(1e-3))
"""

from optax_adaptive_clip._clipping import AdaptiveClipState, adaptive_clip, autoclip
from optax_adaptive_clip._history import mean_std as history_mean_std
from optax_adaptive_clip._history import percentile as history_percentile
from optax_adaptive_clip._history import push as history_push
from optax_adaptive_clip._norms import global_norm
from optax_adaptive_clip._skipping import SkipOnSpikeState, skip_on_spike
from optax_adaptive_clip._stats import clip_stats
from optax_adaptive_clip._zclip import ZClipState, zclip

__version__ = "0.1.0"

__all__ = [
    "AdaptiveClipState",
    "SkipOnSpikeState",
    "ZClipState",
    "adaptive_clip",
    "autoclip",
    "clip_stats",
    "global_norm",
    "history_mean_std",
    "history_percentile",
    "history_push",
    "skip_on_spike",
    "zclip",
]
