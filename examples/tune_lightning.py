"""Tune a Lightning module's regularization with regdial.

The module's ``training_step`` uses ``self.regdial`` (the setting the ``LightningCallback``
applies) for its batch and loss, so label smoothing reaches it; the callback does the
rest (dropout, weight decay on the weights only, early stopping) and reports each
validation to the trial, so the search prunes runs.

    python examples/tune_lightning.py            # about a minute on a 2-core CPU
"""

from __future__ import annotations

import logging
import sys
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

import regdial
from regdial.integrations.lightning import LightningCallback


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Dropout(0.0), nn.Linear(128, 128), nn.ReLU(),
                                 nn.Dropout(0.0), nn.Linear(128, 4))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = self.regdial.batch(*batch)
        return self.regdial.loss(self(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def loader(seed: int, n: int, shuffle: bool) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 20, generator=torch.Generator().manual_seed(42)) * 0.8
    y = torch.randint(0, 4, (n,), generator=generator)
    x = centers[y] + torch.randn(n, 20, generator=generator)
    data = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(
        data, batch_size=32, shuffle=shuffle, generator=generator if shuffle else None
    )


def objective(setting: regdial.Regularization, trial: regdial.Trial) -> None:
    torch.manual_seed(0)
    module = Classifier()
    if trial.initial_weights is not None:
        module.load_state_dict(trial.initial_weights)
    trainer = pl.Trainer(max_epochs=trial.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[LightningCallback(setting, trial, num_classes=4)])  # fmt: skip
    trainer.fit(module, loader(0, 160, True), loader(1, 400, False))
    trial.save_weights(module)


def main(budget: str = "10 trials", epochs: int = 20, run_dir: str = "runs/lightning") -> regdial.TuneResult:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")  # Lightning's own deprecation notices
    space = regdial.Space({"weight_decay": (1e-3, 1.0), "dropout": (0.0, 0.5), "label_smoothing": (0.0, 0.2)})
    result = regdial.tune(objective, space=space, metric="val_accuracy", epochs=epochs, budget=budget,
                          run_dir=run_dir, progress=print)  # fmt: skip
    print(f"unregularized val accuracy {result.baseline['val_accuracy']:.4f}; tuned {result.best_value:.4f}")
    print(f"chosen: {result.best_setting.active()}; report: {run_dir}/report.html")
    return result


if __name__ == "__main__":
    main(*sys.argv[1:2])
