"""Reading the clippers' statistics out of a nested optax state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from optax_adaptive_clip._clipping import AdaptiveClipState
from optax_adaptive_clip._skipping import SkipOnSpikeState
from optax_adaptive_clip._zclip import ZClipState

_CLIP_STATES = (AdaptiveClipState, ZClipState, SkipOnSpikeState)


def _find_clip_states(tree: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """Every clip state in ``tree`` with its key path, in tree order."""
    found = []
    leaves = jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda node: isinstance(node, _CLIP_STATES)
    )
    for leaf_path, leaf in leaves:
        if isinstance(leaf, _CLIP_STATES):
            found.append((path + leaf_path, leaf))
            if isinstance(leaf, SkipOnSpikeState):
                # A skip wrapper may hold clippers of its own.
                found += _find_clip_states(leaf.inner_state, path + leaf_path + ("inner",))
    return found


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    return str(key)


def _labels(paths: list[tuple]) -> list[str]:
    """Short unique labels for the states at ``paths``.

    The dict keys on each path (the ``multi_transform`` labels) when they tell
    the states apart; else every key, index and field name on the path.
    """
    labels = [
        "/".join(_key_name(key) for key in path if isinstance(key, jax.tree_util.DictKey))
        for path in paths
    ]
    if len(set(labels)) < len(labels) or (len(labels) > 1 and "" in labels):
        labels = ["/".join(_key_name(key) for key in path) or "outer" for path in paths]
    return labels


def _state_stats(state: Any) -> dict[str, jax.Array]:
    if isinstance(state, SkipOnSpikeState):
        # Every update is either recorded or non-finite (and then skipped).
        updates_seen = state.count.astype(jnp.float32) + state.nonfinite_count
        return {
            "norm": state.last_norm,
            "threshold": state.threshold,
            "skipped": state.last_skipped,
            "skip_count": state.skip_count,
            "skip_fraction": state.skip_count / jnp.maximum(updates_seen, 1.0),
            "nonfinite_count": state.nonfinite_count,
            "history_size": jnp.minimum(state.count, state.norms.shape[-1]),
        }
    if isinstance(state, ZClipState):
        steps, history_size = state.num_updates, state.count
    else:
        # Every clipped update is recorded. The window is the last axis also for states
        # stacked by lax.scan or vmap.
        steps, history_size = state.count, jnp.minimum(state.count, state.norms.shape[-1])
    return {
        "norm": state.last_norm,
        "threshold": state.threshold,
        "clipped": state.last_clipped,
        "clip_count": state.clip_count,
        "clip_fraction": state.clip_count / jnp.maximum(steps, 1).astype(jnp.float32),
        "nonfinite_count": state.nonfinite_count,
        "history_size": history_size,
    }


def clip_stats(opt_state: Any) -> dict[str, jax.Array]:
    """Statistics of every adaptive clipper found in an optax state, flat for logging.

    Searches the whole state (``optax.chain``, ``inject_hyperparams``,
    ``MultiSteps``, ``multi_transform``, ``masked``, ...) for the states of
    :func:`adaptive_clip`, :func:`autoclip`, :func:`zclip` and
    :func:`skip_on_spike`. Works under ``jit``: it only reads arrays.

    For each clipper the keys are:

    * ``norm``: global norm of the latest update before clipping;
    * ``threshold``: threshold applied to it (``inf`` when none);
    * ``clipped``: whether it was scaled down (``skipped`` for skip_on_spike);
    * ``clip_count``: updates scaled down so far (``skip_count``);
    * ``clip_fraction``: ``clip_count`` over the updates seen (``skip_fraction``);
      for :func:`adaptive_clip` and :func:`autoclip`, over the norms recorded,
      which include every clipped update;
    * ``nonfinite_count``: updates that held NaN or inf;
    * ``history_size``: norms the statistics rest on (at most ``window`` for the
      ring buffers; for :func:`zclip`, every norm folded into its averages).

    Keys carry the ``multi_transform`` label of their clipper when there is
    one (``"encoder/norm"``). Where labels do not tell several clippers apart,
    the keys, indices and field names of the path to each state are used
    (``"0/norm"`` for the first element of a chain; ``"outer"`` for a
    :func:`skip_on_spike` that wraps other clippers, whose own states sit under
    ``"inner/..."``).

    Args:
      opt_state: an optimizer state holding any number of clipper states.

    Returns:
      A flat ``dict`` from names to scalar arrays (arrays over the leading axes of
      states stacked by ``lax.scan`` or ``vmap``); empty if there is no clipper.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optax_adaptive_clip as oac
      >>> tx = optax.chain(oac.adaptive_clip(), optax.sgd(0.1))
      >>> state = tx.init(jnp.zeros(3))
      >>> _, state = tx.update(jnp.ones(3), state)
      >>> stats = oac.clip_stats(state)
      >>> sorted(stats)  # doctest: +NORMALIZE_WHITESPACE
      ['clip_count', 'clip_fraction', 'clipped', 'history_size', 'nonfinite_count',
       'norm', 'threshold']
      >>> round(float(stats["norm"]), 6), int(stats["history_size"])
      (1.732051, 1)
    """
    found = _find_clip_states(opt_state)
    stats = {}
    labels = _labels([path for path, _ in found])
    for label, (_, state) in zip(labels, found, strict=True):
        prefix = f"{label}/" if label else ""
        stats.update({prefix + name: value for name, value in _state_stats(state).items()})
    return stats
