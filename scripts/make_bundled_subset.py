"""Regenerate src/latentdiff/assets/fashion_mnist_subset.npz from the four Fashion-MNIST IDX files.

The subset is the first 10,000 training and the first 2,000 test images (with labels), in file
order, so it is fully determined by the official files. Usage:

    python scripts/make_bundled_subset.py [--data-dir DIR] [--out PATH]

Without --data-dir the files are found like `latentdiff` finds them (the Debian package
dataset-fashion-mnist, $LATENTDIFF_FASHION_MNIST_DIR, or the download cache).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from latentdiff.data import BUNDLED_NPZ, BUNDLED_SIZES, FASHION_MNIST_SPLITS, find_fashion_mnist, read_idx

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "latentdiff" / "assets" / BUNDLED_NPZ


def _idx_path(directory: Path, name: str) -> Path:
    """``name`` (.gz) in ``directory``, or its uncompressed twin, as find_fashion_mnist accepts."""
    path = directory / name
    return path if path.is_file() else path.with_suffix("")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="folder with the four IDX .gz files")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output .npz (default: the asset)"
    )
    args = parser.parse_args(argv)

    directory = find_fashion_mnist(args.data_dir)
    arrays = {}
    for split, (images_name, labels_name) in FASHION_MNIST_SPLITS.items():
        n = BUNDLED_SIZES[split]
        images = read_idx(_idx_path(directory, images_name))
        labels = read_idx(_idx_path(directory, labels_name))
        assert images.shape[1:] == (28, 28) and len(images) >= n and len(labels) == len(images)
        arrays[f"{split}_images"] = np.ascontiguousarray(images[:n])  # uint8 n×28×28
        arrays[f"{split}_labels"] = np.ascontiguousarray(labels[:n])  # uint8 n, values 0..9
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    size_mb = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({size_mb:.2f} MB) from {directory}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
