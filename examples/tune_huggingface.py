"""Tune a Hugging Face Trainer run: a tiny BERT, its regularization chosen by regdial.

The objective builds a model (warm-started when the regularization path hands it
weights), trains it with ``transformers.Trainer`` and a ``HuggingFaceCallback`` that applies
the trial's setting and reports every evaluation to the trial, so that the search can
prune it. The model is built from a config with random weights: nothing is downloaded.

    python examples/tune_huggingface.py            # about two minutes on a 2-core CPU
"""

from __future__ import annotations

import sys
import tempfile

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)

import regdial
from regdial.integrations.huggingface import HuggingFaceCallback


class MarkerTask(torch.utils.data.Dataset):
    """Which pair of marker tokens occurs more often: a task that needs the whole sequence."""

    def __init__(self, seed: int, n: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, 60, (n, 16), generator=generator)
        first = (self.ids == 7).sum(1) + (self.ids == 8).sum(1)
        second = (self.ids == 9).sum(1) + (self.ids == 10).sum(1)
        self.ids[:, 0] = 2  # [CLS]
        self.labels = (first > second).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


TRAIN, VAL = MarkerTask(0, 384), MarkerTask(1, 256)


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)  # fmt: skip
    return BertForSequenceClassification(config)


def accuracy(prediction: object) -> dict[str, float]:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}  # type: ignore[attr-defined]


def objective(setting: regdial.Regularization, trial: regdial.Trial) -> None:
    model = tiny_bert()
    if trial.initial_weights is not None:
        model.load_state_dict(trial.initial_weights)
    with tempfile.TemporaryDirectory() as output:
        args = TrainingArguments(output_dir=output, num_train_epochs=trial.epochs, per_device_train_batch_size=32,
                                 learning_rate=2e-3, eval_strategy="epoch", save_strategy="no", logging_strategy="no",
                                 report_to=[], use_cpu=True, disable_tqdm=True, seed=0)  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=TRAIN, eval_dataset=VAL, compute_metrics=accuracy,
                          callbacks=[HuggingFaceCallback(setting, trial)])  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # the search prints one line per trial
        trainer.train()
    trial.save_weights(model)


def main(budget: str = "8 trials", epochs: int = 8, run_dir: str = "runs/huggingface") -> regdial.TuneResult:
    space = regdial.Space({"weight_decay": (1e-4, 0.3), "dropout": (0.0, 0.4), "label_smoothing": (0.0, 0.2)})
    result = regdial.tune(objective, space=space, metric="val_accuracy", epochs=epochs, budget=budget,
                          run_dir=run_dir, progress=print)  # fmt: skip
    print(f"unregularized val accuracy {result.baseline['val_accuracy']:.4f}; tuned {result.best_value:.4f}")
    print(f"chosen: {result.best_setting.active()}; report: {run_dir}/report.html")
    return result


if __name__ == "__main__":
    main(*sys.argv[1:2])
