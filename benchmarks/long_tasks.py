"""Generated tasks where regularization pays only with long training (issue 19).

Each is written as a user's ``.npz`` file (``x``, ``y``, ``x_test``, ``y_test``; regdial
carves the validation split from ``x``), so ``benchmarks/dial.py`` tunes them the way a
user's own data is tuned: with no length known in advance, the dial learns it. Measured
with ``regdial run --data F.npz --model mlp`` (seed 0, this machine):

=================  ==========================================  ==============  ===================
task               what it is                                  unregularized   regularized by hand
=================  ==========================================  ==============  ===================
shifted-series     600 series of 40 steps, 10 classes, each    0.652 (best     0.831 (150 epochs,
                   a sum of three sinusoids shifted by up to   epoch 13)       best epoch 150)
                   12 steps, scaled, N(0, 1) noise
motifs             800 series of 64 steps, 6 classes, each a   0.398 (best     0.759 (200 epochs,
                   12-step motif at a random place in N(0,     epoch 4)        best epoch 200)
                   0.8) noise
wide-tabular       500 rows, 100 features of which 10 are      0.475 (best     0.579 (200 epochs,
                   informative, 4 classes, 5% labels flipped   epoch 4)        best epoch 142)
=================  ==========================================  ==============  ===================

Hand settings: shifted-series ``weight_decay=0.05 dropout=0.2 augment=0.5
label_smoothing=0.1 ema=0.99``; motifs the same; wide-tabular ``l1=0.01 dropout=0.2
ema=0.99``. Every test split has 1,000 rows.

Run: ``python benchmarks/long_tasks.py NAME OUT.npz`` then ``regdial tune --data OUT.npz --model mlp``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

Arrays = dict[str, np.ndarray]


def shifted_series(n_train: int = 600, shift: int = 12, length: int = 40, classes: int = 10) -> Arrays:
    """Each class a fixed sum of three sinusoids, rolled by up to ``shift`` steps, scaled by
    U(0.5, 1.5), plus N(0, 1) noise (issue 19's development task)."""
    rng = np.random.default_rng(1234)  # the class prototypes are fixed
    t = np.linspace(0, 1, length)
    prototypes = []
    for _ in range(classes):
        frequency, phase, amplitude = rng.uniform(1, 4, 3), rng.uniform(0, 2 * np.pi, 3), rng.normal(size=3)
        prototypes.append(
            sum(amplitude[k] * np.sin(2 * np.pi * frequency[k] * t + phase[k]) for k in range(3))
        )
    stacked = np.stack(prototypes)
    stacked /= stacked.std(axis=1, keepdims=True)
    rng = np.random.default_rng(0)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, size=n)
        shifts = rng.integers(-shift, shift + 1, size=n)
        x = np.stack([np.roll(stacked[c], s) for c, s in zip(y, shifts, strict=True)])
        x = x * rng.uniform(0.5, 1.5, size=(n, 1)) + rng.normal(scale=1.0, size=(n, length))
        return x.astype(np.float32)[:, None, :], y

    x, y = sample(n_train)
    x_test, y_test = sample(1000)
    return {"x": x, "y": y, "x_test": x_test, "y_test": y_test}


def motifs(n_train: int = 800, length: int = 64, width: int = 12, classes: int = 6) -> Arrays:
    """Each class a fixed ``width``-step motif (N(0, 1), standardized, times 1.5) added at a
    uniformly random place to N(0, 0.8) noise."""
    shapes = np.random.default_rng(99).normal(size=(classes, width))
    shapes /= shapes.std(axis=1, keepdims=True)
    rng = np.random.default_rng(0)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, n)
        x = rng.normal(scale=0.8, size=(n, length))
        places = rng.integers(0, length - width + 1, n)
        for i in range(n):
            x[i, places[i] : places[i] + width] += 1.5 * shapes[y[i]]
        return x.astype(np.float32)[:, None, :], y

    x, y = sample(n_train)
    x_test, y_test = sample(1000)
    return {"x": x, "y": y, "x_test": x_test, "y_test": y_test}


def wide_tabular(n_train: int = 500) -> Arrays:
    """scikit-learn's ``make_classification``: 100 features, 10 informative, 4 classes of
    two clusters each, separation 1.2, 5% of labels flipped."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=2000, n_features=100, n_informative=10, n_redundant=0, n_classes=4,
                               n_clusters_per_class=2, class_sep=1.2, flip_y=0.05, random_state=5)  # fmt: skip
    x = x.astype(np.float32)
    return {"x": x[:n_train], "y": y[:n_train], "x_test": x[1000:], "y_test": y[1000:]}


LONG_TASKS: dict[str, Callable[[], Arrays]] = {
    "shifted-series": shifted_series,
    "motifs": motifs,
    "wide-tabular": wide_tabular,
}


def write(name: str, path: Path) -> Path:
    """Write task ``name`` to ``path`` (an ``.npz``) unless it is there; return ``path``."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **LONG_TASKS[name]())
    return path


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in LONG_TASKS:
        sys.exit(f"usage: python benchmarks/long_tasks.py {{{','.join(LONG_TASKS)}}} OUT.npz")
    write(sys.argv[1], Path(sys.argv[2]))
