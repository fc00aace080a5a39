"""Bad arguments fail at construction with a message naming the parameter and what is allowed."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_adaptive_clip as oac

BAD_ARGUMENTS = [
    (oac.adaptive_clip, {"window": 1}, r"`window` must be an integer in \[2, 2147483647\]"),
    (oac.adaptive_clip, {"window": 3.5}, r"`window` must be an integer in \[2, 2147483647\]"),
    # The counters are int32: a larger window or warmup could never fill.
    (oac.adaptive_clip, {"window": 2**31}, r"`window` must be an integer in \[2, 2147483647\]"),
    (oac.adaptive_clip, {"num_std": -0.1}, r"`num_std` must be in \[0.0, inf\)"),
    (oac.adaptive_clip, {"num_std": math.nan}, "`num_std`"),
    (oac.adaptive_clip, {"num_std": math.inf}, r"`num_std` must be in \[0.0, inf\)"),
    (oac.adaptive_clip, {"num_std": True}, "`num_std` must be a number, not a bool"),
    # NumPy and JAX bools are bools too, not the number 1.
    (oac.adaptive_clip, {"max_norm": np.True_}, "`max_norm` must be a number, not a bool"),
    (oac.adaptive_clip, {"window": np.array(True)}, "`window` must be a number, not a bool"),
    (oac.autoclip, {"percentile": jnp.array(True)}, "`percentile` must be a number, not a bool"),
    (oac.zclip, {"warmup_steps": np.True_}, "`warmup_steps` must be a number, not a bool"),
    (oac.adaptive_clip, {"norm_ord": 0.5}, "`norm_ord` must be in \\[1.0, inf\\]"),
    (oac.adaptive_clip, {"norm_ord": "fro"}, "`norm_ord` must be a real number"),
    (oac.adaptive_clip, {"min_history": 1}, "`min_history` must be an integer in \\[2, 32\\]"),
    (oac.adaptive_clip, {"min_history": 33}, "`min_history` must be an integer in \\[2, 32\\]"),
    (oac.adaptive_clip, {"warmup_max_norm": 0.0}, "`warmup_max_norm` must be in \\(0.0"),
    (oac.adaptive_clip, {"max_norm": -1.0}, "`max_norm` must be in \\(0.0"),
    (oac.adaptive_clip, {"max_norm": math.nan}, "`max_norm`"),
    (oac.adaptive_clip, {"record": "clip"}, "`record` must be one of 'raw', 'clipped'"),
    (
        oac.adaptive_clip,
        {"nonfinite": "nan"},
        "`nonfinite` must be one of 'impute', 'zero', 'propagate'",
    ),
    (oac.autoclip, {"percentile": 0.0}, "`percentile` must be in \\(0.0, 100.0\\]"),
    (oac.autoclip, {"percentile": 100.5}, "`percentile` must be in \\(0.0, 100.0\\]"),
    (oac.autoclip, {"min_history": 0}, "`min_history` must be an integer in \\[1, 1000\\]"),
    (oac.zclip, {"alpha": 1.0}, "`alpha` must be in \\(0.0, 1.0\\)"),
    (oac.zclip, {"alpha": 0.0}, "`alpha` must be in \\(0.0, 1.0\\)"),
    (oac.zclip, {"z_thresh": 0.0}, r"`z_thresh` must be in \(0.0, inf\)"),
    (oac.zclip, {"warmup_steps": 0}, r"`warmup_steps` must be an integer in \[1, 2147483647\]"),
    (oac.zclip, {"warmup_steps": 2**40}, r"`warmup_steps` must be an integer in \[1, 2147483647\]"),
    # A string such as "False" would read as true.
    (oac.zclip, {"skip_update_on_spike": "False"}, "`skip_update_on_spike` must be True or False"),
    (oac.zclip, {"skip_update_on_spike": None}, "`skip_update_on_spike` must be True or False"),
    (oac.zclip, {"clip_option": "median"}, "`clip_option` must be one of"),
    (oac.zclip, {"eps": 0.0}, "`eps` must be in \\(0.0"),
    # Numeric strings (as argparse or a YAML config leave them) are not numbers.
    (oac.adaptive_clip, {"num_std": "1"}, "`num_std` must be a real number, not a string"),
    (oac.adaptive_clip, {"max_norm": "1"}, "`max_norm` must be a real number, not a string"),
    (oac.adaptive_clip, {"norm_ord": "2"}, "`norm_ord` must be a real number, not a string"),
    (oac.adaptive_clip, {"window": "8"}, "`window` must be a real number, not a string"),
    (oac.autoclip, {"percentile": "50"}, "`percentile` must be a real number, not a string"),
    (oac.zclip, {"alpha": "0.5"}, "`alpha` must be a real number, not a string"),
]


@pytest.mark.parametrize(
    ("factory", "kwargs", "message"),
    BAD_ARGUMENTS,
    ids=[f"{f.__name__}-{next(iter(k))}={next(iter(k.values()))}" for f, k, _ in BAD_ARGUMENTS],
)
def test_bad_argument_raises_at_construction(factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        factory(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 0}, "`window`"),
        ({"num_std": -1.0}, "`num_std`"),
        ({"record": "everything"}, "`record`"),
        ({"max_norm": 0.0}, "`max_norm`"),
    ],
)
def test_skip_on_spike_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        oac.skip_on_spike(optax.sgd(0.1), **kwargs)


@pytest.mark.parametrize("inner", [optax.adam, None])
def test_skip_on_spike_needs_a_transformation_not_a_factory(inner):
    with pytest.raises(ValueError, match=r"`inner` must be an optax\.GradientTransformation"):
        oac.skip_on_spike(inner)


def test_complex_hyperparameters_get_a_hint():
    # inject_hyperparams gives hyperparameters the dtype of complex parameters.
    tx = optax.inject_hyperparams(oac.adaptive_clip, static_args=("window",))(num_std=1.0)
    with pytest.raises(ValueError, match=r"`num_std` must be a real number.*hyperparam_dtype"):
        tx.init(jnp.zeros(2, jnp.complex64))
    tx = optax.inject_hyperparams(
        oac.adaptive_clip, static_args=("window",), hyperparam_dtype=jnp.float32
    )(num_std=1.0)
    tx.update(jnp.array([3.0 + 4.0j]), tx.init(jnp.zeros(1, jnp.complex64)))


def test_good_edge_values_are_accepted():
    oac.adaptive_clip(window=2, num_std=0.0, min_history=2, norm_ord=math.inf)
    oac.adaptive_clip(norm_ord=1.5, record="clipped", nonfinite="propagate")
    oac.autoclip(percentile=100.0, min_history=None)
    oac.zclip(alpha=0.5, warmup_steps=1, clip_option="mean", max_norm=1.0)
    oac.zclip(skip_update_on_spike=np.bool_(True))
    oac.adaptive_clip(max_norm=math.inf, warmup_max_norm=math.inf)  # inf: no limit


@pytest.mark.parametrize("norm_ord", [0.5, 0, -1.0, math.nan, "2"])
def test_global_norm_rejects_a_norm_ord_that_is_not_a_norm(norm_ord):
    with pytest.raises(ValueError, match="`norm_ord` must be"):
        oac.global_norm([jnp.array([3.0, 4.0])], norm_ord=norm_ord)


@pytest.mark.parametrize("q", [-10.0, 150.0, math.nan])
def test_history_percentile_rejects_q_outside_0_to_100(q):
    with pytest.raises(ValueError, match=r"`q` must be in \[0.0, 100.0\]"):
        oac.history_percentile(jnp.array([1.0, 2.0]), jnp.array(2), q)


def test_traced_arguments_that_cannot_be_checked_are_clamped():
    norms, count = jnp.array([1.0, 2.0, 3.0]), jnp.array(3)
    percentile = jax.jit(oac.history_percentile)
    assert float(percentile(norms, count, 150.0)) == 3.0
    assert float(percentile(norms, count, -10.0)) == 1.0
    assert math.isnan(float(percentile(norms, count, math.nan)))
    norm = jax.jit(lambda p: oac.global_norm([jnp.array([3.0, 4.0])], norm_ord=p)[0])
    assert float(norm(0.5)) == float(norm(math.nan)) == 7.0  # counted as 1


def test_history_percentile_takes_several_percentiles_and_checks_each():
    norms, count = jnp.array([1.0, 2.0, 3.0, 4.0]), jnp.array(4)
    values = oac.history_percentile(norms, count, jnp.array([10.0, 50.0]))
    np.testing.assert_allclose(np.asarray(values), [1.3, 2.5], rtol=1e-6)
    with pytest.raises(ValueError, match=r"got 150\.0"):
        oac.history_percentile(norms, count, [10.0, 150.0])
