"""Validation of configuration values, shared by every policy.

Every check names the parameter and the accepted range, and runs when a policy is
built, so that a bad value never surprises anyone at call time.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import TypeAlias

Seconds: TypeAlias = float | int | timedelta
"""A duration: seconds as a number, or a :class:`datetime.timedelta`."""


def seconds(
    name: str, value: object, *, allow_none: bool = False, allow_zero: bool = False
) -> float | None:
    """Normalise a duration to float seconds, or raise naming ``name``."""
    accepted = "a number of seconds or a timedelta, " + (">= 0" if allow_zero else "> 0")
    if allow_none:
        accepted += ", or None"
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be {accepted}; got None")
    if isinstance(value, timedelta):
        result = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be {accepted}; got {type(value).__name__} {value!r}")
    else:
        result = float(value)
    if math.isnan(result) or math.isinf(result):
        raise ValueError(f"{name} must be {accepted}; got {value!r}")
    if result < 0 or (result == 0 and not allow_zero):
        raise ValueError(f"{name} must be {accepted}; got {value!r}")
    return result


def required_seconds(name: str, value: object, *, allow_zero: bool = False) -> float:
    """Like :func:`seconds`, for a duration that cannot be None."""
    result = seconds(name, value, allow_zero=allow_zero)
    assert result is not None
    return result


def integer(name: str, value: object, *, minimum: int, maximum: int | None = None) -> int:
    """Check an int (bools refused) within ``[minimum, maximum]``."""
    accepted = (
        f"an integer >= {minimum}" if maximum is None else (f"an integer in [{minimum}, {maximum}]")
    )
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {accepted}; got {type(value).__name__} {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {accepted}; got {value!r}")
    return value


def fraction(name: str, value: object, *, allow_zero: bool = True, allow_one: bool = True) -> float:
    """Check a number in [0, 1] (ends included unless told otherwise)."""
    low = "[0" if allow_zero else "(0"
    high = "1]" if allow_one else "1)"
    accepted = f"a number in {low}, {high}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be {accepted}; got {type(value).__name__} {value!r}")
    result = float(value)
    if (
        math.isnan(result)
        or result < 0
        or result > 1
        or (result == 0 and not allow_zero)
        or (result == 1 and not allow_one)
    ):
        raise ValueError(f"{name} must be {accepted}; got {value!r}")
    return result


def positive_number(name: str, value: object, *, minimum_exclusive: float = 0.0) -> float:
    """Check a finite number strictly greater than ``minimum_exclusive``."""
    accepted = f"a number > {minimum_exclusive:g}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be {accepted}; got {type(value).__name__} {value!r}")
    result = float(value)
    if math.isnan(result) or math.isinf(result) or result <= minimum_exclusive:
        raise ValueError(f"{name} must be {accepted}; got {value!r}")
    return result


def non_negative_number(name: str, value: object) -> float:
    """Check a finite number >= 0."""
    accepted = "a number >= 0"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be {accepted}; got {type(value).__name__} {value!r}")
    result = float(value)
    if math.isnan(result) or math.isinf(result) or result < 0:
        raise ValueError(f"{name} must be {accepted}; got {value!r}")
    return result


def boolean(name: str, value: object) -> bool:
    """Check a real bool (1 and "yes" are refused here; config parsing converts them)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__} {value!r}")
    return value


def name_string(name: str, value: object) -> str:
    """Check a non-empty string."""
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty string; got {value!r}")
    return value
