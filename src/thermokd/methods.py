"""Ready-made losses for the method names used on the command line and in configs."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ThermoKDError, choice_error
from .loss import DistillationLoss
from .registry import Registry, check_keywords
from .temperature import CIST, CTKD, DTKD, DTS, EntropyTarget, Fixed, LogitStandardization
from .weighting import ConfidenceDifficulty, TeacherEntropy


@dataclass(frozen=True)
class Preset:
    """A method: its temperature and weighting factories and its defaults for ``DistillationLoss``."""

    temperature: Callable[..., Any]
    weighting: "Callable[..., Any] | None" = None
    loss: dict[str, Any] = field(default_factory=dict)


# the paper defaults of every method name
METHODS: "Registry[Preset]" = Registry("method", {
    "ce": Preset(Fixed, loss={"ce_weight": 1.0, "kd_weight": 0.0}),
    "kd": Preset(Fixed),
    "cist": Preset(CIST, ConfidenceDifficulty),
    "dts": Preset(DTS),
    "ctkd": Preset(CTKD),
    "lskd": Preset(LogitStandardization, loss={"ce_weight": 0.1, "kd_weight": 9.0}),
    "dtkd": Preset(DTKD),
    "dkd": Preset(Fixed, loss={"family": "dkd", "ce_weight": 1.0, "kd_weight": 1.0}),
    "entropy-target": Preset(EntropyTarget),
    "erkd": Preset(Fixed, TeacherEntropy),
})
# Language-model defaults (``build_loss(name, domain="lm")``, ``thermokd lm``): the image-classification τ = 4 gives
# near-uniform targets over a vocabulary. The best of a small grid by validation perplexity on grimm-tales (DTS: its
# paper's language setting); docs/lm.md gives the grid and the numbers. CIST's τ floor (tau_min 0.05, not the image
# 0.5, which held every τ at the floor) and its weights (none: mix 0, w ≡ 1, better than the bound or the blend at
# every tau0 tried on the Friends benchmark) were chosen on validation by the LM CIST ablations (docs/cist-ablation.md).
LM_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "kd": {"temperature": {"tau": 0.5}},
    "cist": {"temperature": {"tau0": 1.0, "student": "teacher", "tau_min": 0.05}, "weighting": {"mix": 0.0}},
    "dts": {"temperature": {"t_init": 3.0, "t_min": 1.0, "t_max": 3.0}},
    "entropy-target": {"temperature": {"target": 0.3}},
}
DOMAINS = ("default", "lm")
LOSS_KEYS = ("family", "divergence", "ce_weight", "kd_weight", "scale", "dkd_alpha", "dkd_beta", "dkd_warmup",
             "ignore_index", "check_inputs", "chunk_size", "sync_free_rows")


def method_names() -> list[str]:
    return METHODS.names()


def method_settings(method: str, *, domain: str = "default", temperature: "dict[str, Any] | None" = None,
                    weighting: "dict[str, Any] | None" = None, with_defaults: bool = False
                    ) -> dict[str, dict[str, Any]]:
    """The keyword arguments a method's ``temperature`` and ``weighting`` factories receive: the ``domain``'s
    presets (``LM_PRESETS`` for ``lm``) updated by the overrides; ``with_defaults`` also fills in the factories'
    own defaults, giving every setting the built loss will have."""
    key = METHODS.key(method)
    if domain not in DOMAINS:
        raise choice_error("domain", domain, DOMAINS)
    preset = LM_PRESETS.get(key, {}) if domain == "lm" else {}
    settings = {"temperature": {**preset.get("temperature", {}), **(temperature or {})},
                "weighting": {**preset.get("weighting", {}), **(weighting or {})}}
    if with_defaults:
        factories = METHODS.get(key)
        settings = {"temperature": {**_defaults(factories.temperature), **settings["temperature"]},
                    "weighting": {**_defaults(factories.weighting), **settings["weighting"]}}
    return settings


def _defaults(factory: "Callable[..., Any] | None") -> dict[str, Any]:
    if factory is None:
        return {}
    return {name: p.default for name, p in inspect.signature(factory).parameters.items()
            if p.default is not inspect.Parameter.empty}


def build_loss(method: str, *, domain: str = "default", temperature: "dict[str, Any] | None" = None,
               weighting: "dict[str, Any] | None" = None, **loss_kwargs: Any) -> DistillationLoss:
    """A :class:`DistillationLoss` for a method name (``ce``, ``kd``, ``cist``, ``dts``, ``ctkd``, ``lskd``,
    ``dtkd``, ``dkd``, ``entropy-target``, ``erkd``) with the paper defaults, or with ``domain="lm"`` the
    language-model presets (``LM_PRESETS``); ``temperature`` and ``weighting`` hold keyword overrides for those
    parts, ``loss_kwargs`` override the loss's own arguments."""
    key = METHODS.key(method)
    settings = method_settings(key, domain=domain, temperature=temperature, weighting=weighting)
    temperature, weighting = settings["temperature"], settings["weighting"]
    method_preset = METHODS.get(key)
    unknown = set(loss_kwargs) - set(LOSS_KEYS)
    if unknown:
        raise ThermoKDError(f"unknown loss option(s) {sorted(unknown)} for method {method!r}; "
                            f"allowed: {', '.join(LOSS_KEYS)}")
    if weighting and method_preset.weighting is None:
        raise ThermoKDError(f"method {method!r} has no weighting to configure")
    check_keywords(f"method {key!r} (its temperature)", method_preset.temperature, temperature or {})
    strategy = method_preset.temperature(**(temperature or {}))
    weights = None
    if method_preset.weighting is not None:
        check_keywords(f"method {key!r} (its weighting)", method_preset.weighting, weighting or {})
        weights = method_preset.weighting(**(weighting or {}))
    return DistillationLoss(temperature=strategy, weighting=weights, **{**method_preset.loss, **loss_kwargs})
