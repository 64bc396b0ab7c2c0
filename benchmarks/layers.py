"""Noise and mixing layers: time per batch as a ratio to nn.Dropout on the same tensor.

For each layer it times a training-mode forward pass on one activation batch, alternating
with ``nn.Dropout(0.1)`` on the same tensor so that drift hits both, and prints the ratio.
Targets (issue 3): DropPath <= 1.5x, DropBlock2d <= 3x. Run: ``python benchmarks/layers.py``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _timing import paired_ms
from torch import nn

from regdial import DropBlock2d, DropPath, Mixup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[64, 64, 32, 32], metavar=("N", "C", "H", "W"))
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(*args.shape)
    labels = torch.randint(0, 10, (args.shape[0],))
    dropout = nn.Dropout(0.1).train()
    drop_path, block7, block3 = (
        DropPath(0.1).train(),
        DropBlock2d(0.1, 7).train(),
        DropBlock2d(0.1, 3).train(),
    )
    mixup = Mixup(0.2, num_classes=10)
    layers: dict[str, tuple[Callable[[], object], float | None]] = {
        "DropPath(0.1)": (lambda: drop_path(x), 1.5),
        "DropBlock2d(0.1, 7)": (lambda: block7(x), 3.0),
        "DropBlock2d(0.1, 3)": (lambda: block3(x), 3.0),
        "Mixup(0.2)": (lambda: mixup(x, labels), None),
    }
    print(f"batch {tuple(x.shape)} float32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    header = f"{'layer':<22}{'ms':>8}{'Dropout ms':>12}{'ratio':>8}{'target':>10}"
    print(header)
    print("-" * len(header))
    for name, (fn, target) in layers.items():
        ms, reference_ms = paired_ms(fn, lambda: dropout(x), args.repeats)
        ratio = ms / reference_ms
        mark = "-" if target is None else f"<={target:.1f}" + (" ok" if ratio <= target else " !!")
        print(f"{name:<22}{ms:8.3f}{reference_ms:12.3f}{ratio:8.2f}{mark:>10}")


if __name__ == "__main__":
    main()
