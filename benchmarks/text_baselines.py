"""The bar a text teacher must clear: a linear SVM on word TF-IDF, on exactly the splits thermokd trains on.

The SVM sees the raw text of the training part (the validation split carved out as thermokd carves it), picks its
n-gram range and C on the validation split and is scored once on the test split. Seconds on one core:

    python benchmarks/text_baselines.py --data trec
    python benchmarks/text_baselines.py --data 20newsgroups
"""
from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch

from thermokd.data import DEFAULT_VAL_FRACTION, QUESTION_SETS, TEXT_SETS, read_tab, stratified_indices
from thermokd.data.questions import question_splits
from thermokd.data.shipped import text_datasets_dir

GRID = {"ngram_range": [(1, 1), (1, 2)], "C": [0.1, 0.3, 1.0, 3.0, 10.0]}


def raw_splits(name: str, seed: int) -> dict[str, tuple[list[str], list[str]]]:
    """``{"train" | "test": (categories, texts)}`` in the order thermokd's loader keeps them."""
    if name in QUESTION_SETS:
        return question_splits(name, seed)
    folder = text_datasets_dir()
    return {split: read_tab(folder / f"{TEXT_SETS[name]}-{split}.tab") for split in ("train", "test")}


def labelled_parts(name: str, seed: int, val_fraction: float, val_seed: int) -> dict[str, tuple[np.ndarray, list[str]]]:
    """``{"train" | "val" | "test": (class ids, texts)}``: the validation part carved from the training split as
    thermokd carves it (stratified, seeded), class ids in the sorted order of the training categories."""
    splits = raw_splits(name, seed)
    index = {c: i for i, c in enumerate(sorted(set(splits["train"][0])))}
    y = np.array([index[c] for c in splits["train"][0]])
    val = stratified_indices(torch.from_numpy(y), val_fraction, val_seed).numpy()
    train = np.setdiff1d(np.arange(len(y)), val)
    texts = splits["train"][1]
    return {"train": (y[train], [texts[i] for i in train]), "val": (y[val], [texts[i] for i in val]),
            "test": (np.array([index[c] for c in splits["test"][0]]), splits["test"][1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="trec", choices=[*TEXT_SETS, *QUESTION_SETS])
    parser.add_argument("--seed", type=int, default=0, help="the data seed (trec's test split)")
    parser.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION)
    parser.add_argument("--val-seed", type=int, default=0)
    args = parser.parse_args()
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC

    parts = labelled_parts(args.data, args.seed, args.val_fraction, args.val_seed)
    (y, texts), (val_y, val_texts), (test_y, test_texts) = parts["train"], parts["val"], parts["test"]
    print(f"{args.data}: {len(y)} training, {len(val_y)} validation, {len(test_y)} test texts, "
          f"{len(set(y) | set(test_y))} classes\n\n| n-grams | C | val % | test % |\n|---|---:|---:|---:|")
    best = None
    for ngrams, c in itertools.product(GRID["ngram_range"], GRID["C"]):
        vectorizer = TfidfVectorizer(ngram_range=ngrams, sublinear_tf=True)
        model = LinearSVC(C=c).fit(vectorizer.fit_transform(texts), y)
        val_acc = float((model.predict(vectorizer.transform(val_texts)) == val_y).mean())
        test_acc = float((model.predict(vectorizer.transform(test_texts)) == test_y).mean())
        print(f"| {ngrams[0]}-{ngrams[1]} | {c:g} | {100 * val_acc:.2f} | {100 * test_acc:.2f} |")
        if best is None or val_acc > best[0]:
            best = (val_acc, test_acc, ngrams, c)
    val_acc, test_acc, ngrams, c = best
    print(f"\nchosen on validation: n-grams {ngrams[0]}-{ngrams[1]}, C = {c:g}: validation {100 * val_acc:.2f} %, "
          f"test {100 * test_acc:.2f} %")


if __name__ == "__main__":
    main()
