"""Argument validation shared by the factories.

Every check runs at construction time. Under ``optax.inject_hyperparams`` the
factory is called again inside each update with the hyperparameters of the
state. Under ``jit`` those are tracers, which cannot be inspected, so the checks
skip them and the update makes out-of-range values harmless instead
(``_clipping.cap_threshold``, the clamping in :func:`check_int`, and the notes
where traced values are read). An update run outside ``jit`` gets concrete
values, which are checked as at construction: an out-of-range one raises.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Counters are int32; a count or step limit beyond it could never be reached.
INT32_MAX = int(np.iinfo(np.int32).max)


def is_traced(value: Any) -> bool:
    """Whether ``value`` is a JAX tracer, whose value is unknown at trace time."""
    return isinstance(value, jax.core.Tracer)


def _as_float(name: str, value: Any) -> float:
    # NumPy and JAX bools (np.True_, bool arrays) would read as 1, as Python's would.
    if isinstance(value, bool | np.bool_) or getattr(value, "dtype", None) == np.bool_:
        raise ValueError(f"`{name}` must be a number, not a bool; got {value!r}.")
    # float() would parse "1.0", but the string would reach the traced update as is.
    if isinstance(value, str | bytes):
        raise ValueError(f"`{name}` must be a real number, not a string; got {value!r}.")
    if np.iscomplexobj(value):
        # optax.inject_hyperparams gives hyperparameters the dtype of complex parameters.
        raise ValueError(
            f"`{name}` must be a real number, got {value!r}; with complex parameters, "
            "pass `hyperparam_dtype=jnp.float32` to `optax.inject_hyperparams`."
        )
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`{name}` must be a real number, got {value!r}.") from error


def check_static_int(name: str, value: Any, *, minimum: int) -> int:
    """Returns ``value`` as a Python int, which must be concrete and ``>= minimum``."""
    if is_traced(value):
        raise ValueError(
            f"`{name}` sets the shape of the optimizer state and must be a static Python "
            f"int; with `optax.inject_hyperparams` pass `static_args=({name!r},)`."
        )
    return check_int(name, value, minimum=minimum, maximum=INT32_MAX)


def check_real(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_inf: bool = False,
) -> None:
    """Raises ``ValueError`` unless ``value`` lies in the given interval.

    Traced values are accepted unchecked (see the module docstring).
    """
    if is_traced(value):
        return
    as_float = _as_float(name, value)
    in_low = as_float >= low if low_inclusive else as_float > low
    in_high = as_float <= high if high_inclusive else as_float < high
    finite_ok = allow_inf or math.isfinite(as_float)
    if not (in_low and in_high and finite_ok and not math.isnan(as_float)):
        left = "[" if low_inclusive and math.isfinite(low) else "("
        right = "]" if high_inclusive and (allow_inf or math.isfinite(high)) else ")"
        allowed = f"{left}{low}, {high}{right}"
        raise ValueError(f"`{name}` must be in {allowed}, got {value!r}.")


def check_optional_positive(name: str, value: Any) -> None:
    """``None`` or a number > 0 (``inf`` meaning no limit)."""
    if value is not None:
        check_real(name, value, low=0.0, low_inclusive=False, allow_inf=True)


def check_bool(name: str, value: Any) -> None:
    """A Python or NumPy bool; a string such as ``"False"`` would read as true."""
    if is_traced(value):
        raise ValueError(
            f"`{name}` must be a static Python bool; with `optax.inject_hyperparams` pass "
            f"`static_args=({name!r},)`."
        )
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")


def check_choice(name: str, value: Any, choices: Collection[str]) -> None:
    if value not in choices:
        allowed = ", ".join(repr(choice) for choice in choices)
        raise ValueError(f"`{name}` must be one of {allowed}; got {value!r}.")


def check_norm_ord(value: Any) -> None:
    """Any p >= 1, including ``float('inf')``."""
    check_real("norm_ord", value, low=1.0, allow_inf=True)


def check_int(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> Any:
    """Returns ``value`` as a Python int in ``[minimum, maximum]``.

    A traced value cannot be checked and is clamped into that range instead.
    """
    if is_traced(value):
        return jnp.clip(value, minimum, maximum)
    as_float = _as_float(name, value)
    too_big = maximum is not None and as_float > maximum
    if not as_float.is_integer() or as_float < minimum or too_big:
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"`{name}` must be an integer {allowed}, got {value!r}.")
    return int(as_float)


def check_min_history(value: Any, *, window: int, minimum: int) -> Any:
    """Returns the number of norms needed before statistics are used.

    ``None`` means a full window.
    """
    if value is None:
        return window
    return check_int("min_history", value, minimum=minimum, maximum=window)
