"""Parsing the ':'-separated arguments of a stage spec, with messages a user reads."""

from __future__ import annotations

from fedd.pipeline.errors import SpecError

__all__ = ["integer", "no_args", "power_of_two"]


def no_args(name: str, args: list[str], usage: str) -> None:
    if args:
        raise SpecError(f"'{name}' takes no parameter, got '{':'.join([name, *args])}' "
                        f"(write '{usage}')")


def integer(text: str, what: str, usage: str, low: int, high: int) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise SpecError(f"{what} must be an integer, got '{text}' (write '{usage}')") from None
    if not low <= value <= high:
        raise SpecError(f"{what} must be between {low} and {high}, got {value}")
    return value


def power_of_two(text: str, what: str, usage: str, low: int, high: int) -> int:
    value = integer(text, what, usage, low, high)
    if value & (value - 1):
        raise SpecError(f"{what} must be a power of two ({low}…{high}, e.g. 256), got {value}")
    return value
