"""Argument checks shared by every lora_ref module (the lowest layer: imports nothing of lora_ref).

A number may come as a Python ``int``/``float``, a numpy scalar (``np.int64(4)``, ``np.float32(16)``,
what sweeps over ``np.arange``/``np.linspace`` hand out), or a 0-d array or tensor (``torch.tensor(4)``).
All of them are accepted wherever an int or a float is, and converted to a plain Python number, so
nothing downstream (f-strings, ``json.dumps`` of an adapter config, ``range``) meets a numpy type.
``bool`` is never a number here (``True`` is an ``int`` in Python, but ``r=True`` is a bug).
"""
from __future__ import annotations

import math
import numbers


def _unwrap(value):
    """A 0-d numpy array or torch tensor -> its Python scalar; anything else unchanged."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item") and not isinstance(value, numbers.Number):
        return value.item()
    return value


def as_int(value) -> int | None:
    """``value`` as a Python int if it is an integer (numbers.Integral or a 0-d integer array/tensor,
    never a bool), else None. 4.0 is not an integer: a float where a count belongs is usually a bug."""
    v = _unwrap(value)
    if isinstance(v, bool) or type(v).__name__ == "bool_" or not isinstance(v, numbers.Integral):
        return None
    return int(v)


def as_real(value) -> float | None:
    """``value`` as a Python float if it is a real number (numbers.Real or a 0-d array/tensor; not a
    bool, not a string), else None. NaN and Inf come back as floats; callers decide on finiteness."""
    v = _unwrap(value)
    if isinstance(v, bool) or type(v).__name__ == "bool_" or not isinstance(v, numbers.Real):
        return None
    return float(v)


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int in [minimum, maximum]; ValueError naming ``name`` and the bad value otherwise."""
    v = as_int(value)
    if v is None or (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        if minimum == 1 and maximum is None:
            want = "a positive integer"
        elif minimum == 0 and maximum is None:
            want = "a non-negative integer"
        else:
            want = f"an integer in [{'-inf' if minimum is None else minimum}, {'inf' if maximum is None else maximum}]"
        raise ValueError(f"{name}={value!r} must be {want}")
    return v


def check_choice(name: str, value, choices) -> str:
    """``value`` if it is one of ``choices``; ValueError naming ``name``, the bad value and the choices otherwise."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {tuple(choices)}")
    return value


def check_real(name: str, value, *, positive: bool = False, non_negative: bool = False,
               finite: bool = True) -> float:
    """``value`` as a float (finite unless ``finite=False``; > 0 or >= 0 if asked); ValueError otherwise."""
    v = as_real(value)
    ok = v is not None and (not finite or math.isfinite(v)) and (not positive or v > 0) \
        and (not non_negative or v >= 0)
    if not ok:
        want = ("a positive" if positive else "a non-negative" if non_negative else "a") + \
               (" finite" if finite else "") + " number"
        raise ValueError(f"{name}={value!r} must be {want}")
    return v
