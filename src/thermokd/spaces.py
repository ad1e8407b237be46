"""Each method's tunable knobs, in one place: what ``thermokd tune`` and ``compare`` with tuning search over.

A space maps a knob, named by its place in a ``method`` config section (``temperature.tau``, ``loss.kd_weight``,
``weighting.alpha``), to a :class:`FloatRange` (with a log flag) or to a list of choices. A temperature strategy or
weighting class may add knobs of its own with a ``search_space()`` classmethod returning such a mapping (keys
without a section name refer to the strategy's own arguments)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import ThermoKDError
from .registry import normalise


@dataclass(frozen=True)
class FloatRange:
    """A float knob sampled from ``[low, high]``, uniformly in ``log`` space when ``log``."""

    low: float
    high: float
    log: bool = False

    def grid(self, points: int) -> list[float]:
        """``points`` evenly spaced values (geometrically when ``log``), both ends included."""
        if points == 1:
            return [math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2]
        if self.log:
            ratio = (self.high / self.low) ** (1 / (points - 1))
            return [float(f"{self.low * ratio ** i:.6g}") for i in range(points)]
        return [float(f"{self.low + (self.high - self.low) * i / (points - 1):.6g}") for i in range(points)]


Knob = FloatRange | list
TAU = FloatRange(1.0, 16.0, log=True)

# the temperature knobs of every method (paper defaults sit inside each range); CE has none
SPACES: dict[str, dict[str, Knob]] = {
    "ce": {},
    "kd": {"temperature.tau": TAU},
    "dkd": {"temperature.tau": TAU},
    "dtkd": {"temperature.tau": TAU},
    "erkd": {"temperature.tau": TAU},
    "cist": {"temperature.tau0": TAU},
    "dts": {"temperature.t_init": TAU, "temperature.t_min": FloatRange(0.5, 4.0, log=True),
            "temperature.t_max": FloatRange(4.0, 16.0, log=True)},  # t_min <= 4 <= t_max: every draw is valid
    "entropy-target": {"temperature.target": FloatRange(0.2, 0.9)},
    "lskd": {"temperature.base": FloatRange(0.5, 8.0, log=True)},
    "ctkd": {"temperature.init": TAU, "temperature.t_start": FloatRange(0.5, 2.0),
             "temperature.t_end": FloatRange(8.0, 32.0, log=True)},
}
# the optional distillation weight, around each method's default (lskd weighs KD 9, DKD 1, the others 0.9)
KD_WEIGHT: dict[str, FloatRange] = {"lskd": FloatRange(1.0, 20.0, log=True), "dkd": FloatRange(0.25, 4.0, log=True)}
DEFAULT_KD_WEIGHT = FloatRange(0.1, 0.95)
SECTIONS = ("temperature", "weighting", "loss")

# Language models (``domain="lm"``): a vocabulary of ~1,000 tokens wants τ around 1, not the image range [1, 16]
# (τ = 4 gives targets at 95 % of maximum entropy); every LM preset (``methods.LM_PRESETS``) sits inside its range.
LM_TAU = FloatRange(0.25, 4.0, log=True)
LM_SPACES: dict[str, dict[str, Knob]] = {
    "ce": {},
    "kd": {"temperature.tau": LM_TAU},
    "dkd": {"temperature.tau": LM_TAU},
    "dtkd": {"temperature.tau": LM_TAU},
    "erkd": {"temperature.tau": LM_TAU},
    # the student rule is part of CIST's LM preset, so it is searched with tau0
    "cist": {"temperature.tau0": LM_TAU, "temperature.student": ["teacher", "interpolate", "ratio"]},
    "dts": {"temperature.t_init": FloatRange(0.5, 4.0, log=True), "temperature.t_min": FloatRange(0.25, 1.0, log=True),
            "temperature.t_max": FloatRange(1.0, 4.0, log=True)},  # t_min <= 1 <= t_max: every draw is valid
    "entropy-target": {"temperature.target": FloatRange(0.1, 0.7)},
    "lskd": {"temperature.base": FloatRange(0.25, 4.0, log=True)},
    "ctkd": {"temperature.init": LM_TAU, "temperature.t_start": FloatRange(0.1, 1.0),
             "temperature.t_end": FloatRange(1.0, 8.0, log=True)},
}
DOMAIN_SPACES = {"default": SPACES, "lm": LM_SPACES}


def method_space(method: str, kd_weight: bool = False, domain: str = "default") -> dict[str, Knob]:
    """The knobs ``thermokd tune`` searches for ``method`` (a method name) by default: its temperature knobs from
    :data:`SPACES` (``domain="lm"``: :data:`LM_SPACES`) and, with ``kd_weight``, ``loss.kd_weight``. Every method
    spends its budget on the same kind of knob; the further options a strategy declares (:func:`declared_space`) are
    searched only when named."""
    from .errors import choice_error
    from .methods import build_loss

    if domain not in DOMAIN_SPACES:
        raise choice_error("domain", domain, tuple(DOMAIN_SPACES))
    space = dict(DOMAIN_SPACES[domain].get(normalise(method), {}))
    if kd_weight and build_loss(method).kd_weight > 0:
        space["loss.kd_weight"] = KD_WEIGHT.get(normalise(method), DEFAULT_KD_WEIGHT)
    return space


def declared_space(method: str, domain: str = "default") -> dict[str, Knob]:
    """Every knob ``method``'s temperature strategy and weighting declare with a ``search_space()`` static or class
    method (``argument -> (low, high, log)`` or a list of choices), as ``section.argument`` knobs, plus its default
    space: what ``tune --space KNOB`` (a name without a range) may add with its declared range."""
    from .methods import build_loss

    loss = build_loss(method)
    space = method_space(method, kd_weight=True, domain=domain)
    for section, part in (("temperature", loss.temperature), ("weighting", loss.weighting)):
        extra = getattr(part, "search_space", None)
        if callable(extra):
            for name, knob in extra().items():
                if isinstance(knob, tuple):
                    knob = FloatRange(float(knob[0]), float(knob[1]), bool(knob[2]) if len(knob) > 2 else False)
                space[name if "." in name else f"{section}.{name}"] = knob
    return space


def check_knob(name: str, knob: Any) -> Knob:
    """``knob`` validated: a FloatRange with low < high (and low > 0 when log), or a non-empty list of choices."""
    if isinstance(knob, FloatRange):
        if not (math.isfinite(knob.low) and math.isfinite(knob.high)) or not knob.low < knob.high:
            raise ThermoKDError(f"knob {name}: the range [{knob.low:g}, {knob.high:g}] is empty; give low < high")
        if knob.log and knob.low <= 0:
            raise ThermoKDError(f"knob {name}: a log range needs low > 0, got {knob.low:g}")
        return knob
    if isinstance(knob, (list, tuple)):
        if not knob:
            raise ThermoKDError(f"knob {name}: the list of choices is empty")
        return list(knob)
    raise ThermoKDError(f"knob {name}: expected a FloatRange or a list of choices, got {knob!r}")


def parse_knob(text: str) -> "tuple[str, Knob | None]":
    """``NAME=LOW:HIGH[:log]`` (a float range), ``NAME=A,B,C`` (choices, parsed as YAML scalars) or a bare ``NAME``
    (None: the range its method declares)."""
    import yaml

    name, sep, spec = text.partition("=")
    name, spec = name.strip(), spec.strip()
    if not sep and name:
        return name, None  # the knob's declared range (declared_space)
    if not name or not spec:
        raise ThermoKDError(f"--space expects KNOB=LOW:HIGH[:log] or KNOB=A,B,C, got {text!r}")
    if ":" in spec:
        parts = spec.split(":")
        log = len(parts) == 3 and parts[2].strip().lower() == "log"
        if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
            raise ThermoKDError(f"--space {name}: expected LOW:HIGH or LOW:HIGH:log, got {spec!r}")
        try:
            return name, FloatRange(float(parts[0]), float(parts[1]), log)
        except ValueError:
            raise ThermoKDError(f"--space {name}: LOW and HIGH must be numbers, got {spec!r}") from None
    return name, [yaml.safe_load(v) for v in spec.split(",") if v.strip()]


def resolve_knob(name: str, space: dict[str, Knob], method: str) -> str:
    """The full name of a knob: as given when it has a section (``temperature.tau``), else the one knob of
    ``space`` that ends in it (``tau``); otherwise an error that lists the knobs."""
    if "." in name:
        if name.split(".", 1)[0] not in SECTIONS:
            raise ThermoKDError(f"unknown knob {name!r} for {method}: a knob is SECTION.ARGUMENT with SECTION one of "
                                f"{', '.join(SECTIONS)}; {method}'s knobs: {', '.join(space) or 'none'}")
        return name
    matches = [k for k in space if k.split(".", 1)[1] == name]
    if len(matches) != 1:
        raise ThermoKDError(f"unknown knob {name!r} for {method}; its knobs: {', '.join(space) or 'none'} "
                            "(or name another as SECTION.ARGUMENT)")
    return matches[0]


def space_to_json(space: dict[str, Knob]) -> dict[str, Any]:
    return {k: ({"low": v.low, "high": v.high, "log": v.log} if isinstance(v, FloatRange) else list(v))
            for k, v in space.items()}
