"""On-policy distillation batches (GKD's λ): the student continues the prompt of each window with its own
samples, the teacher scores them, and the loss sees the generated tokens only.

The sampling temperature and top-p shape generation only; the loss never reads them (its τ is the strategy's).
Generation runs without gradient, in eval mode, from a generator seeded by (seed, step, micro-batch, process), so
a run is reproducible and a resumed run draws what the uninterrupted one drew.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ThermoKDError
from .batches import IGNORE
from .config import OnPolicyConfig
from .models import lm_logits


@dataclass(frozen=True)
class OnPolicy(OnPolicyConfig):
    """The ``on_policy`` section of one run (``fraction`` λ: probability per micro-batch; ``prompt_tokens``: how
    much of each window is the prompt; ``new_tokens``: generated per row; ``sampling_temperature`` (0: greedy) and
    ``top_p``: generation only), with the run's seed and the tokenizer's end-of-text id."""

    seed: int = 0
    eos_id: "int | None" = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction <= 1.0:
            raise ThermoKDError(f"on-policy fraction must be in [0, 1], got {self.fraction!r}")
        if self.prompt_tokens < 1 or self.new_tokens < 1:
            raise ThermoKDError(f"prompt_tokens and new_tokens must be >= 1, got {self.prompt_tokens!r} and "
                                f"{self.new_tokens!r}")
        if not self.sampling_temperature >= 0 or not 0.0 < self.top_p <= 1.0:
            raise ThermoKDError(f"sampling_temperature must be >= 0 and top_p in (0, 1], got "
                                f"{self.sampling_temperature!r} and {self.top_p!r}")

    def generator(self, step: int, micro: int, process: int, device: torch.device) -> torch.Generator:
        key = ((self.seed * 1_000_003 + step) * 1_009 + micro) * 131 + process
        return torch.Generator(device=device).manual_seed(key)

    def chooses(self, generator: torch.Generator) -> bool:
        """Whether this micro-batch is on-policy: one uniform draw against λ (no draw at λ = 0 or 1)."""
        if self.fraction in (0.0, 1.0):
            return self.fraction == 1.0
        return float(torch.rand((), generator=generator, device=generator.device)) < self.fraction


def _next_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> Tensor:
    """One token per row from ``softmax(logits / temperature)`` restricted to the top-p nucleus (0: argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # mass before a token already reaches top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, policy: OnPolicy,
             generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``policy.new_tokens`` sampled continuations of right-padded prompts ``[B, P]``: ids and a mask ``[B, G]``
    (0 after a row's end-of-text token). Eval mode, no gradient; the model's mode is restored."""
    was_training = model.training
    model.eval()
    ids, mask = input_ids, attention_mask
    new_ids, new_mask = [], []
    alive = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(policy.new_tokens):  # full recompute per token: short prompts, small students
        logits = lm_logits(model, ids, mask)[:, -1]
        token = _next_token(logits, policy.sampling_temperature, policy.top_p, generator)
        new_ids.append(token)
        new_mask.append(alive.long())
        if policy.eos_id is not None:
            alive = alive & (token != policy.eos_id)  # the end token is scored; what follows is padding
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, new_mask[-1][:, None]], dim=1)
    model.train(was_training)
    return torch.stack(new_ids, dim=1), torch.stack(new_mask, dim=1)


def on_policy_batch(model: nn.Module, batch: dict[str, Any], policy: OnPolicy, generator: torch.Generator
                    ) -> dict[str, Any]:
    """The batch's prompts (its first ``prompt_tokens`` positions) continued by the student. Labels: the
    generated tokens; ``-100`` on the prompt and on padding, so only generated tokens are scored."""
    p = min(policy.prompt_tokens, batch["input_ids"].shape[1])
    prompt, prompt_mask = batch["input_ids"][:, :p], batch["attention_mask"][:, :p]
    gen, gen_mask = generate(model, prompt, prompt_mask, policy, generator)
    full_prompt = prompt_mask.bool().all(dim=1, keepdim=True)  # a prompt cut short by padding scores nothing
    scored = gen_mask.bool() & full_prompt
    labels = torch.cat([torch.full_like(prompt, IGNORE), torch.where(scored, gen, torch.full_like(gen, IGNORE))], 1)
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
    out.update(input_ids=torch.cat([prompt, gen], 1), attention_mask=torch.cat([prompt_mask, gen_mask], 1),
               labels=labels)
    return out
