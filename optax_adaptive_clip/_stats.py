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


def _key_name(key: Any) -> str | None:
    """A path entry's name; ``None`` for named-tuple fields such as ``inner_state``."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, str):
        return key
    return None


def _labels(paths: list[tuple]) -> list[str]:
    """Short unique labels: the dict keys on each path (the ``multi_transform`` labels),
    or the path's keys and indices where those do not tell the states apart."""
    if len(paths) == 1:
        return [""]
    labels = [
        "/".join(str(key.key) for key in path if isinstance(key, jax.tree_util.DictKey))
        for path in paths
    ]
    if len(set(labels)) < len(labels) or "" in labels:
        names = [[_key_name(key) for key in path] for path in paths]
        labels = ["/".join(name for name in path if name is not None) for path in names]
        labels = [label or "outer" for label in labels]
    return labels


def _state_stats(state: Any) -> dict[str, jax.Array]:
    if isinstance(state, SkipOnSpikeState):
        events, event_count, event_name = state.last_skipped, state.skip_count, "skip"
    else:
        events, event_count, event_name = state.last_clipped, state.clip_count, "clip"
    if isinstance(state, ZClipState):
        history_size = state.count
    else:
        history_size = jnp.minimum(state.count, state.norms.shape[0])
    steps = jnp.maximum(state.count, 1).astype(jnp.float32)
    past = "skipped" if event_name == "skip" else "clipped"
    return {
        "norm": state.last_norm,
        "threshold": state.threshold,
        past: events,
        f"{event_name}_count": event_count,
        f"{event_name}_fraction": jnp.minimum(event_count.astype(jnp.float32) / steps, 1.0),
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
    * ``clip_fraction``: ``clip_count`` over the norms recorded (``skip_fraction``);
    * ``nonfinite_count``: updates that held NaN or inf;
    * ``history_size``: norms the statistics rest on.

    With several clippers each key is prefixed by a label: the
    ``multi_transform`` label (``"encoder/norm"``), or else the keys and
    indices of the path to the state (``"0/norm"`` for the first element of a
    chain; ``"outer"`` for a :func:`skip_on_spike` wrapping other clippers,
    whose own clippers sit under ``"inner"``).

    Args:
      opt_state: an optimizer state holding any number of clipper states.

    Returns:
      A flat ``dict`` from names to scalar arrays; empty if there is no clipper.

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
      >>> float(stats["norm"]), int(stats["history_size"])
      (1.7320508..., 1)
    """
    found = _find_clip_states(opt_state)
    stats = {}
    for label, (_, state) in zip(_labels([path for path, _ in found]), found, strict=True):
        prefix = f"{label}/" if label else ""
        stats.update({prefix + name: value for name, value in _state_stats(state).items()})
    return stats
