"""Ready-made losses for the method names used on the command line and in configs."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import ThermoKDError, choice_error
from .loss import DistillationLoss
from .temperature import CIST, CTKD, DTKD, DTS, EntropyTarget, Fixed, LogitStandardization
from .weighting import ConfidenceDifficulty, TeacherEntropy

# name -> (default DistillationLoss arguments, temperature factory, weighting factory); paper defaults.
_METHODS: dict[str, tuple[dict[str, Any], Callable[..., Any], "Callable[..., Any] | None"]] = {
    "ce": ({"ce_weight": 1.0, "kd_weight": 0.0}, Fixed, None),
    "kd": ({}, Fixed, None),
    "cist": ({}, CIST, ConfidenceDifficulty),
    "dts": ({}, DTS, None),
    "ctkd": ({}, CTKD, None),
    "lskd": ({"ce_weight": 0.1, "kd_weight": 9.0}, LogitStandardization, None),
    "dtkd": ({}, DTKD, None),
    "dkd": ({"family": "dkd", "ce_weight": 1.0, "kd_weight": 1.0}, Fixed, None),
    "entropy-target": ({}, EntropyTarget, None),
    "erkd": ({}, Fixed, TeacherEntropy),
}
# Language-model defaults (``build_loss(name, domain="lm")``, ``thermokd lm``): the image-classification τ = 4 gives
# near-uniform targets over a vocabulary. The best of a small grid by validation perplexity on grimm-tales (DTS: its
# paper's language setting); docs/lm.md gives the grid and the numbers.
LM_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "kd": {"temperature": {"tau": 0.5}},
    "cist": {"temperature": {"tau0": 1.0, "student": "teacher"}},
    "dts": {"temperature": {"t_init": 3.0, "t_min": 1.0, "t_max": 3.0}},
    "entropy-target": {"temperature": {"target": 0.3}},
}
DOMAINS = ("default", "lm")
LOSS_KEYS = ("family", "divergence", "ce_weight", "kd_weight", "scale", "dkd_alpha", "dkd_beta", "dkd_warmup",
             "ignore_index", "check_inputs", "chunk_size")


def method_names() -> list[str]:
    return sorted(_METHODS)


def build_loss(method: str, *, domain: str = "default", temperature: "dict[str, Any] | None" = None,
               weighting: "dict[str, Any] | None" = None, **loss_kwargs: Any) -> DistillationLoss:
    """A :class:`DistillationLoss` for a method name (``ce``, ``kd``, ``cist``, ``dts``, ``ctkd``, ``lskd``,
    ``dtkd``, ``dkd``, ``entropy-target``, ``erkd``) with the paper defaults, or with ``domain="lm"`` the
    language-model presets (``LM_PRESETS``); ``temperature`` and ``weighting`` hold keyword overrides for those
    parts, ``loss_kwargs`` override the loss's own arguments."""
    key = method.strip().lower().replace("_", "-")
    if key not in _METHODS:
        raise choice_error("method", method, method_names())
    if domain not in DOMAINS:
        raise choice_error("domain", domain, DOMAINS)
    if domain == "lm":
        preset = LM_PRESETS.get(key, {})
        temperature = {**preset.get("temperature", {}), **(temperature or {})}
    defaults, make_temperature, make_weighting = _METHODS[key]
    unknown = set(loss_kwargs) - set(LOSS_KEYS)
    if unknown:
        raise ThermoKDError(f"unknown loss option(s) {sorted(unknown)} for method {method!r}; "
                            f"allowed: {', '.join(LOSS_KEYS)}")
    try:
        strategy = make_temperature(**(temperature or {}))
        weights = make_weighting(**(weighting or {})) if make_weighting is not None else None
    except TypeError as exc:
        raise ThermoKDError(f"bad option for method {method!r}: {exc}") from None
    if weighting and make_weighting is None:
        raise ThermoKDError(f"method {method!r} has no weighting to configure")
    return DistillationLoss(temperature=strategy, weighting=weights, **{**defaults, **loss_kwargs})
