"""The clippers inside optax's combinators, under jit and scan, and through checkpoints."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_adaptive_clip as oac

# Every clipper, built with small histories so that tests reach the adaptive regime.
FACTORIES = {
    "adaptive_clip": functools.partial(oac.adaptive_clip, window=4),
    "autoclip": functools.partial(oac.autoclip, window=8),
    "zclip": functools.partial(oac.zclip, warmup_steps=3),
    "skip_on_spike": functools.partial(oac.skip_on_spike, optax.sgd(0.1), window=4, num_std=2.0),
}


def params_like():
    return {
        "dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
        "embed": jnp.ones((4,), jnp.bfloat16),
    }


def grads_at(step: int):
    """Gradients with a spike every fifth step."""
    scale = 50.0 if step % 5 == 4 else 1.0 + 0.1 * (step % 3)
    return jax.tree.map(
        lambda leaf: (jnp.ones_like(leaf, jnp.float32) * scale).astype(leaf.dtype),
        params_like(),
    )


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_chain_compiles_once_over_1000_steps(name):
    tx = optax.chain(FACTORIES[name](), optax.adam(1e-3))
    params = params_like()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def train_step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    chex.clear_trace_counter()
    opt_state = tx.init(params)
    spike, calm = grads_at(4), grads_at(0)
    for step in range(1000):
        params, opt_state = train_step(params, opt_state, spike if step % 5 == 4 else calm)
    stats = oac.clip_stats(opt_state)
    assert int(stats.get("clip_count", stats.get("skip_count"))) > 0
    assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_scan_matches_python_loop(name):
    tx = FACTORIES[name]()
    grads = [grads_at(step) for step in range(12)]
    state = tx.init(params_like())
    looped = []
    for grad in grads:
        out, state = tx.update(grad, state)
        looped.append(out)

    def body(carry, grad):
        out, carry = tx.update(grad, carry)
        return carry, out

    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *grads)
    scan_state, scanned = jax.lax.scan(body, tx.init(params_like()), stacked)
    chex.assert_trees_all_close(scanned, jax.tree.map(lambda *x: jnp.stack(x), *looped))
    chex.assert_trees_all_close(scan_state, state)


def test_inject_hyperparams_changes_num_std_during_training():
    tx = optax.inject_hyperparams(oac.adaptive_clip, static_args=("window",))(window=4, num_std=1.0)
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(3))
    for norm in [1.0, 2.0, 3.0, 4.0]:
        _, state = update(jnp.array([norm, 0.0, 0.0]), state)
    _, one_std = update(jnp.array([10.0, 0.0, 0.0]), state)
    state.hyperparams["num_std"] = jnp.asarray(0.0)
    out, zero_std = update(jnp.array([10.0, 0.0, 0.0]), state)
    spread = np.std([1.0, 2.0, 3.0, 4.0], ddof=1)
    np.testing.assert_allclose(float(one_std.inner_state.threshold), 2.5 + spread, rtol=1e-6)
    np.testing.assert_allclose(float(zero_std.inner_state.threshold), 2.5, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out), [2.5, 0.0, 0.0], rtol=1e-6)
    assert set(oac.clip_stats(state)) >= {"norm", "threshold", "clipped"}


@pytest.mark.parametrize("norm_ord", [1, 2, float("inf")])
def test_inject_hyperparams_with_traced_norm_ord(norm_ord):
    injected = optax.inject_hyperparams(oac.adaptive_clip, static_args=("window",))(
        window=2, norm_ord=norm_ord, max_norm=1.0
    )
    plain = oac.adaptive_clip(window=2, norm_ord=norm_ord, max_norm=1.0)
    grad = jnp.array([3.0, -4.0, 1.0])
    out, state = jax.jit(injected.update)(grad, injected.init(grad))
    expected_out, expected_state = plain.update(grad, plain.init(grad))
    chex.assert_trees_all_close(out, expected_out, rtol=1e-6)
    np.testing.assert_allclose(state.inner_state.last_norm, expected_state.last_norm, rtol=1e-6)


def test_window_must_be_static_under_inject_hyperparams():
    tx = optax.inject_hyperparams(oac.adaptive_clip)(window=4)
    state = tx.init(jnp.zeros(2))
    with pytest.raises(ValueError, match=r"static_args=\(.window.,\)"):
        jax.jit(tx.update)(jnp.ones(2), state)


def test_multi_steps_clips_accumulated_gradients():
    tx = optax.MultiSteps(optax.chain(oac.adaptive_clip(window=2), optax.sgd(1.0)), 2)
    state = tx.init(jnp.zeros(2))
    update = jax.jit(tx.update)
    for grad in ([1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 100.0], [0.0, 100.0]):
        out, state = update(jnp.asarray(grad), state)
    stats = oac.clip_stats(state)
    # Histories of the averaged gradients 2 and 2, then 100 is clipped to mean + std = 2.
    np.testing.assert_allclose(float(stats["norm"]), 100.0, rtol=1e-6)
    np.testing.assert_allclose(float(stats["threshold"]), 2.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out), [0.0, -2.0], rtol=1e-6)
    assert int(stats["history_size"]) == 2


def test_multi_transform_keeps_separate_histories():
    params = {"encoder": jnp.zeros(2), "decoder": jnp.zeros(2)}
    labels = {"encoder": "encoder", "decoder": "decoder"}
    tx = optax.multi_transform(
        {"encoder": oac.adaptive_clip(window=2), "decoder": oac.adaptive_clip(window=2)}, labels
    )
    state = tx.init(params)
    update = jax.jit(tx.update)
    for scale in (1.0, 3.0):
        _, state = update({"encoder": jnp.array([scale, 0.0]), "decoder": jnp.zeros(2)}, state)
    out, state = update(
        {"encoder": jnp.array([50.0, 0.0]), "decoder": jnp.array([0.0, 50.0])}, state
    )
    stats = jax.jit(oac.clip_stats)(state)
    assert {"encoder/norm", "decoder/norm", "encoder/clip_count", "decoder/threshold"} <= set(stats)
    # The encoder's history (1, 3) clips; the decoder's (0, 0) clips to 0.
    np.testing.assert_allclose(float(stats["encoder/threshold"]), 2.0 + np.sqrt(2.0), rtol=1e-6)
    np.testing.assert_allclose(float(stats["decoder/threshold"]), 0.0)
    np.testing.assert_allclose(np.asarray(out["decoder"]), [0.0, 0.0])
    assert int(stats["encoder/clip_count"]) == 1 and int(stats["decoder/clip_count"]) == 1


def test_two_clippers_in_a_chain_get_distinct_labels():
    tx = optax.chain(oac.adaptive_clip(window=2), oac.zclip(warmup_steps=2))
    state = tx.init(jnp.zeros(2))
    stats = oac.clip_stats(state)
    assert len(stats) == 14
    assert {"0/norm", "1/norm"} <= set(stats)


def test_masked_and_skip_wrapper_stats():
    params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    tx = oac.skip_on_spike(
        optax.chain(
            optax.masked(oac.adaptive_clip(window=2), {"a": True, "b": False}),
            optax.sgd(1.0),
        ),
        window=2,
    )
    state = tx.init(params)
    _, state = tx.update({"a": jnp.array([3.0, 4.0]), "b": jnp.array([1.0, 0.0])}, state)
    stats = oac.clip_stats(state)
    assert any(key.endswith("skip_count") for key in stats)
    assert set(stats) >= {"outer/skip_count", "outer/norm", "inner/0/inner_state/norm"}
    masked_norm = [value for key, value in stats.items() if key.endswith("/norm")]
    # One norm is the wrapper's (all leaves), one the masked clipper's (only "a").
    assert sorted(float(value) for value in masked_norm) == pytest.approx([5.0, np.sqrt(26.0)])


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize(
    "tree",
    [
        {},
        {"w": None, "b": jnp.ones(2)},
        {"empty": jnp.zeros((0, 3)), "w": jnp.ones(3)},
    ],
    ids=["empty-tree", "none-leaf", "zero-size-leaf"],
)
def test_degenerate_pytrees(name, tree):
    tx = FACTORIES[name]()
    state = tx.init(tree)
    update = jax.jit(tx.update)
    for _ in range(6):
        out, state = update(tree, state)
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    for leaf in jax.tree.leaves(state):
        assert not bool(jnp.isnan(leaf).any())


def test_state_of_wrong_window_is_rejected():
    state = oac.adaptive_clip(window=8).init(jnp.zeros(2))
    with pytest.raises(ValueError, match=r"window=4 .* shape \(8,\)"):
        oac.adaptive_clip(window=4).update(jnp.ones(2), state)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_checkpoint_round_trip_resumes_bit_identically(name, tmp_path):
    import orbax.checkpoint as ocp
    from flax import serialization

    tx = optax.chain(FACTORIES[name](), optax.adam(1e-2))
    update = jax.jit(tx.update)
    state = tx.init(params_like())
    for step in range(7):
        _, state = update(grads_at(step), state)

    from_bytes = serialization.from_bytes(tx.init(params_like()), serialization.to_bytes(state))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", state)
    checkpointer.wait_until_finished()
    from_orbax = checkpointer.restore(tmp_path / "state", tx.init(params_like()))

    continued = {"original": state, "flax": from_bytes, "orbax": from_orbax}
    outputs = {key: [] for key in continued}
    for step in range(7, 20):
        for key, current in continued.items():
            out, continued[key] = update(grads_at(step), current)
            outputs[key].append(out)
    for key in ("flax", "orbax"):
        chex.assert_trees_all_equal(outputs[key], outputs["original"])
        chex.assert_trees_all_equal(continued[key], continued["original"])


def float32_grads_at(step: int):
    return jax.tree.map(lambda leaf: leaf.astype(jnp.float32), grads_at(step))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_eager_update_of_a_state_of_numpy_arrays(name):
    # A state restored by flax.serialization, pickle or jax.device_get holds NumPy arrays;
    # the eager update of the ring-buffer clippers used to fail on `.at`.
    # float32 only: optax's own arithmetic on NumPy bfloat16 rounds otherwise than XLA's.
    tx = FACTORIES[name]()
    state = tx.init(float32_grads_at(0))
    for step in range(7):
        _, state = tx.update(float32_grads_at(step), state, float32_grads_at(0))
    host_state = jax.device_get(state)
    assert any(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(host_state))
    for step in range(7, 12):
        out, state = tx.update(float32_grads_at(step), state, float32_grads_at(0))
        host_out, host_state = tx.update(float32_grads_at(step), host_state, float32_grads_at(0))
        chex.assert_trees_all_equal(host_out, out)
    chex.assert_trees_all_equal(host_state, state)


def test_history_push_of_a_numpy_history():
    norms, next_index = oac.history_push(np.array([1.0, 2.0, 3.0], np.float32), np.int32(2), 9.0)
    np.testing.assert_array_equal(np.asarray(norms), [1.0, 2.0, 9.0])
    assert int(next_index) == 0


@pytest.mark.parametrize(
    ("factory", "static_args", "kwargs", "changed"),
    [
        (oac.autoclip, ("window",), {"percentile": 50.0, "window": 8}, {"percentile": 100.0}),
        (oac.zclip, (), {"warmup_steps": 3}, {"z_thresh": 1e6}),
        (
            lambda num_std, window: oac.skip_on_spike(
                optax.sgd(0.1), window=window, num_std=num_std
            ),
            ("window",),
            {"num_std": 1.0, "window": 4},
            {"num_std": 1e6},
        ),
    ],
    ids=["autoclip", "zclip", "skip_on_spike"],
)
def test_inject_hyperparams_for_every_clipper(factory, static_args, kwargs, changed):
    tx = optax.inject_hyperparams(factory, static_args=static_args)(**kwargs)
    update = jax.jit(tx.update)
    state = tx.init(params_like())
    for step in range(8):
        _, state = update(grads_at(step % 4), state)
    spike = grads_at(4)
    _, before = update(spike, state)
    for name, value in changed.items():
        state.hyperparams[name] = jnp.asarray(value)
    _, after = update(spike, state)
    stats_before, stats_after = oac.clip_stats(before), oac.clip_stats(after)
    event = "skipped" if "skipped" in stats_before else "clipped"
    # The spike is clipped (or skipped) at the original setting, not at the loosened one.
    assert bool(stats_before[event]) and not bool(stats_after[event])


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_multi_transform_histories_for_every_clipper(name):
    params = {"encoder": jnp.zeros(3), "decoder": jnp.zeros(3)}
    tx = optax.multi_transform(
        {"encoder": FACTORIES[name](), "decoder": FACTORIES[name]()},
        {"encoder": "encoder", "decoder": "decoder"},
    )
    update = jax.jit(tx.update)
    state = tx.init(params)
    for step in range(12):
        # A steady encoder; only the decoder spikes, and only its history sees it.
        decoder = jnp.ones(3) * (100.0 if step == 11 else 1.0 + 0.1 * (step % 3))
        _, state = update({"encoder": jnp.ones(3), "decoder": decoder}, state)
    stats = oac.clip_stats(state)
    event = "skipped" if "encoder/skipped" in stats else "clipped"
    assert bool(stats[f"decoder/{event}"]) and not bool(stats[f"encoder/{event}"])
    assert float(stats["decoder/norm"]) > 50 * float(stats["encoder/norm"])
