"""The library's one exception family: catch ``ThermoKDError`` to handle any bad input."""
from __future__ import annotations


class ThermoKDError(ValueError):
    """Bad input to thermokd: the message names the value and what is allowed."""


class ConfigError(ThermoKDError):
    """An invalid configuration field."""


class FolderInUseError(ThermoKDError):
    """Another thermokd process holds the folder (its lock); the message names that process."""


def choice_error(kind: str, value: object, allowed: "list[str] | tuple[str, ...]") -> ThermoKDError:
    """A uniform 'unknown name' error that lists the accepted names."""
    return ThermoKDError(f"unknown {kind} {value!r}; expected one of: {', '.join(sorted(allowed))}")


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name if it has none): for one-line errors that
    quote what a library raised."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
