"""Language-model distillation: token-level KD of causal LMs (logits ``[B, L, V]``, labels ``-100`` ignored) on the
Hugging Face Trainer, with online, cached-logit and top-k teacher sources, on-policy batches, and a corpus
demonstration (``thermokd lm``).

``transformers`` and ``tokenizers`` are imported only by the functions that need them.
"""
from .batches import IGNORE, Windows, make_labels, make_windows, next_token
from .corpus import Document, corpus_names, load_corpus, split_documents
from .evaluate import evaluate
from .models import LMSize, build_lm, count_parameters, lm_logits, parse_size
from .onpolicy import OnPolicy, generate, on_policy_batch
from .sample import sample
from .tokenizer import encode_documents, train_tokenizer
from .topk import TopK, capture_topk, load_topk, retemper, save_topk

__all__ = ["Document", "IGNORE", "LMSize", "OnPolicy", "TopK", "Windows", "build_lm", "capture_topk",
           "corpus_names", "count_parameters", "encode_documents", "evaluate", "generate", "lm_logits",
           "load_corpus", "load_topk", "make_labels", "make_windows", "next_token", "on_policy_batch", "parse_size",
           "retemper", "sample", "save_topk", "split_documents", "train_tokenizer"]
