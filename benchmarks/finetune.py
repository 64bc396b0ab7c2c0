"""Fine-tuning, measured: what keeps a fine-tuned model from forgetting and overfitting.

``digits-transfer`` fine-tunes a CNN pre-trained on 1000 clean digits to 30 digits of
another look. For each seed (the target's split): no regularization, weight decay,
L2-SP (toward the pre-trained weights), and the dial's choice (``regdial.tune`` with its
default space for a fine-tuning task, which includes L2-SP), each scored once on the
target's test split. Printed: the mean over the seeds and each seed's score.

    python benchmarks/finetune.py            # about 10 minutes on a 2-core CPU
"""

from __future__ import annotations

import logging
import statistics
import sys

from regdial import Regularization, fit, tune

FIXED = {"no regularization": Regularization.off(), "weight decay 0.05": Regularization(weight_decay=0.05),
         "L2-SP 0.1": Regularization(l2sp=0.1)}  # fmt: skip


def main(seeds: int = 3, budget: str = "12 trials") -> None:
    logging.disable(logging.WARNING)
    scores: dict[str, list[float]] = {label: [] for label in [*FIXED, "the dial's choice"]}
    chosen = []
    for seed in range(seeds):
        for label, setting in FIXED.items():
            summary = fit("digits-transfer", setting, seed=seed, progress=False).meta["summary"]
            scores[label].append(summary["final"]["test_accuracy"])
        result = tune("digits-transfer", seed=seed, budget=budget)
        scores["the dial's choice"].append(result.tuned["test_accuracy"])
        chosen.append(result.best_setting.active())
    print(f"digits-transfer: target test accuracy, mean of {seeds} seeds (each seed's in brackets)")
    for label, values in scores.items():
        print(f"{label:<20}{statistics.fmean(values):.3f}  [{', '.join(f'{v:.3f}' for v in values)}]")
    for seed, setting in enumerate(chosen):
        print(f"seed {seed} chose: " + ", ".join(f"{k}={v:.3g}" for k, v in setting.items()))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
