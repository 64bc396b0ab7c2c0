"""Tune the regularization of your own model, trained on your own DataLoaders.

The model and the data here are ordinary PyTorch: a small CNN written by hand and
DataLoaders over scikit-learn's 8x8 digits (300 training images, so it overfits). regdial
searches the knobs that apply to it (weight decay, dropout, label smoothing: it finds the
model's dropout layers), then trains the chosen setting and the unregularized baseline
again and scores both on the test loader, which the search never saw.

    python examples/tune_own_model.py            # about two minutes on a 2-core CPU
"""

from __future__ import annotations

import sys

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import regdial


class SmallCNN(nn.Module):
    """Your model: nothing regdial-specific in it, only ordinary dropout layers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.0), nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
                                  nn.Dropout(0.0), nn.Linear(128, 10))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.head(self.features(x))
        return output


def make_model() -> nn.Module:
    """A fresh model for each trial, as Hugging Face's ``model_init``."""
    return SmallCNN()


def make_loaders(seed: int = 0) -> tuple[DataLoader, DataLoader, DataLoader]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    rest_x, test_x, rest_y, test_y = train_test_split(x, y, test_size=500, random_state=seed, stratify=y)
    train_x, val_x, train_y, val_y = train_test_split(rest_x, rest_y, train_size=300, test_size=400,
                                                      random_state=seed, stratify=rest_y)  # fmt: skip
    shuffled = torch.Generator().manual_seed(seed)
    return (
        DataLoader(TensorDataset(train_x, train_y), batch_size=32, shuffle=True, generator=shuffled),
        DataLoader(TensorDataset(val_x, val_y), batch_size=256),
        DataLoader(TensorDataset(test_x, test_y), batch_size=256),
    )


def main(budget: str = "10 trials", epochs: int = 30, run_dir: str = "runs/own-model") -> regdial.TuneResult:
    train, val, test = make_loaders()
    result = regdial.tune(make_model, train=train, val=val, test=test, num_classes=10, epochs=epochs,
                          budget=budget, run_dir=run_dir, progress=print)  # fmt: skip
    print(f"\n{'':<16}{'val accuracy':>14}{'test accuracy':>15}")
    for label, scores in (("unregularized", result.baseline), ("tuned", result.tuned)):
        print(f"{label:<16}{scores['val_accuracy']:>14.4f}{scores['test_accuracy']:>15.4f}")
    print(f"chosen: {result.best_setting.active()} ({result.chosen_by})")
    for note in result.notes:
        print(f"note: {note}")
    print(f"report: {run_dir}/report.html")
    return result


if __name__ == "__main__":
    main(*sys.argv[1:2])
