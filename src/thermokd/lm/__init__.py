"""Language-model distillation helpers: top-k teacher caches, re-tempered to any distillation temperature."""
from .topk import TopK, capture_topk, load_topk, retemper, save_topk, topk_kd_divergence

__all__ = ["TopK", "capture_topk", "load_topk", "retemper", "save_topk", "topk_kd_divergence"]
