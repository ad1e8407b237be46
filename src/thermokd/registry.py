"""One way to look things up by name (temperatures, weightings, methods, models, data sources): register, build,
names, one name normalisation, one 'unknown name' error, and unknown keyword arguments named before the call."""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from .errors import ThermoKDError, choice_error

T = TypeVar("T")


def normalise(name: object) -> str:
    """The form every name is compared in: ``" Entropy_Target "`` → ``"entropy-target"``."""
    return str(name).strip().lower().replace("_", "-")


def check_keywords(what: str, factory: Callable[..., Any], kwargs: "dict[str, Any]",
                   reserved: Iterable[str] = ()) -> None:
    """Raise a one-line error naming the keyword arguments that ``factory`` (``what``, e.g. "weighting 'none'")
    does not take (read from its
    signature, so a ``TypeError`` raised inside the constructor is never mistaken for a bad option).
    ``reserved``: parameters the caller fills itself, so a user may not pass them."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: let the call decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    taken = {n for n, p in params.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    unknown = sorted(set(kwargs) - (taken - set(reserved)))
    if unknown:
        allowed = sorted(taken - set(reserved))
        raise ThermoKDError(f"bad argument for {what}: unknown keyword argument(s) {', '.join(unknown)}; "
                            f"allowed: {', '.join(allowed) or 'none'}")


class Registry(Generic[T]):
    """Names → factories for one kind of thing (``kind`` names it in errors). Names are compared normalised,
    or as written when ``exact`` (model names such as ``wrn_16_2``, which name files)."""

    def __init__(self, kind: str, entries: "dict[str, Callable[..., T]] | None" = None, exact: bool = False) -> None:
        self.kind, self.exact = kind, exact
        self._factories: dict[str, Callable[..., T]] = {}
        for name, factory in (entries or {}).items():
            self.add(name, factory)

    def register(self, *names: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: make a factory (usually a class) reachable under each of ``names``."""
        def wrap(factory: Callable[..., T]) -> Callable[..., T]:
            for n in names:
                self.add(n, factory)
            return factory
        return wrap

    def add(self, name: str, factory: Callable[..., T]) -> None:
        key = self._key(name)
        if key in self._factories and self._factories[key] is not factory:
            raise ThermoKDError(f"{self.kind} {name!r} is registered twice")
        self._factories[key] = factory

    def _key(self, name: object) -> str:
        return str(name) if self.exact else normalise(name)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return self._key(name) in self._factories

    def key(self, name: str) -> str:
        """The registered (normalised) name for ``name``, or the uniform 'unknown name' error."""
        key = self._key(name)
        if key not in self._factories:
            raise choice_error(self.kind, name, self.names())
        return key

    def get(self, name: str) -> Callable[..., T]:
        """What is registered under ``name`` (the uniform error if nothing is)."""
        return self._factories[self.key(name)]

    def build(self, name: str, *args: Any, **kwargs: Any) -> T:
        """``factory(*args, **kwargs)`` for ``name``; keyword arguments it does not take are a one-line error."""
        key = self.key(name)
        factory = self._factories[key]
        try:  # the parameters that ``args`` fill are not the caller's to name again
            filled = list(inspect.signature(factory).parameters)[:len(args)]
        except (TypeError, ValueError):
            filled = []
        check_keywords(f"{self.kind} {key!r}", factory, kwargs, reserved=filled)
        return factory(*args, **kwargs)
