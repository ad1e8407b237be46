"""Language-model distillation: token-level KD of causal LMs (logits ``[B, L, V]``, labels ``-100`` ignored), a
shipped-corpus demonstration, and top-k teacher caches re-tempered to any distillation temperature.

``transformers`` and ``tokenizers`` are imported only by the functions that need them.
"""
from .batches import IGNORE, Windows, make_labels, make_windows, next_token
from .corpus import Document, corpus_names, load_corpus, split_documents
from .distill import TeacherLogits, TrainSettings, evaluate, train_lm
from .experiment import LMConfig, method_loss, parse_methods, run_lm_experiment
from .models import LMSize, build_lm, count_parameters, lm_logits, parse_size
from .sample import sample
from .teacher import obtain_teacher
from .tokenizer import encode_documents, train_tokenizer
from .topk import TopK, capture_topk, load_topk, retemper, save_topk, topk_kd_divergence

__all__ = ["Document", "IGNORE", "LMConfig", "LMSize", "TeacherLogits", "TopK", "TrainSettings", "Windows",
           "build_lm", "capture_topk", "corpus_names", "count_parameters", "encode_documents", "evaluate",
           "lm_logits", "load_corpus", "load_topk", "make_labels", "make_windows", "method_loss", "next_token",
           "obtain_teacher", "parse_methods", "parse_size", "retemper", "run_lm_experiment", "sample", "save_topk",
           "split_documents", "topk_kd_divergence", "train_lm", "train_tokenizer"]
