"""Write a thermokd data set as ``.npz`` (``x_train, y_train, x_val, y_val, x_test, y_test``), to exercise
``--data npz:FILE``; the validation split is written as drawn, so the file reproduces it.

    python benchmarks/export_npz.py --data digits --out runs/npz/digits.npz
    python benchmarks/export_npz.py --data fashion-mnist --train 10000 --test 2000 --out runs/npz/fashion10k.npz

The inputs are written un-normalised (``x·std + mean`` with the bundle's own statistics), as a user's file would
hold them; ``npz:`` normalises them again on load. ``--train``/``--test`` keep the first N of each split.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from thermokd.data import load_data


def raw(x, mean: list[float], std: list[float]) -> np.ndarray:
    """Undo the bundle's normalisation (per channel for images, per feature for vectors)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = np.asarray(mean, dtype=np.float32).reshape(shape)
    s = np.asarray(std, dtype=np.float32).reshape(shape)
    return x.numpy() * s + m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a thermokd --data spec with image or feature inputs")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, help="keep the first N training samples")
    parser.add_argument("--test", type=int, help="keep the first N test samples")
    args = parser.parse_args()
    bundle = load_data(args.data)
    if bundle.vocab_size:
        raise SystemExit(f"{args.data} holds token ids; export image or feature data only")
    tr, te = slice(args.train), slice(args.test)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, x_train=raw(bundle.train.x[tr], bundle.mean, bundle.std),
                        y_train=bundle.train.y[tr].numpy(), x_test=raw(bundle.test.x[te], bundle.mean, bundle.std),
                        y_test=bundle.test.y[te].numpy(), x_val=raw(bundle.val.x, bundle.mean, bundle.std),
                        y_val=bundle.val.y.numpy())
    print(f"wrote {args.out}: {len(bundle.train.y[tr])} train / {len(bundle.val.y)} val / "
          f"{len(bundle.test.y[te])} test, "
          f"{bundle.num_classes} classes, inputs {tuple(bundle.train.x.shape[1:])}")


if __name__ == "__main__":
    main()
