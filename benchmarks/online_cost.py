"""The hypergradient controller's cost, as a share of the plain training step.

One model (an MLP, 64 -> 512 -> 512 -> 10, on random 10-class data in batches of 128),
trained by ``fit`` with AdamW under weight decay, label smoothing and input noise. In
the same process, alternately: epochs without a controller (the reference: its training
seconds per step, ``fit``'s ``seconds`` column, which excludes the end-of-epoch
evaluation) and epochs with a ``HypergradientController`` over those three knobs, whose
hypergradient steps are timed one by one. Printed: one hypergradient step in plain
training steps, and the extra cost per training step for ``every`` in (10, 20, 50) and
``solve_steps`` in (0, 1, 2): ``cost of one hypergradient step / every``, a ratio against
the plain step measured in the same run; and, end to end, the training step with the
default controller (every 20, one solve step) against the plain one, retunes included.
The noise knob's antithetic pairs pass twice the batch through the Hessian-vector
products; a line without it says what the other knobs cost.

Run: ``python benchmarks/online_cost.py`` (about a minute on two CPU cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch import nn

from regdial import Regularization, Space, fit
from regdial.dial.hypergradient import HypergradientController


class Timed(HypergradientController):
    """The controller, timing each hypergradient step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timings: list[float] = []

    def _hypergradients(self, run: Any, inputs: Any, targets: torch.Tensor) -> dict[str, float]:
        started = time.perf_counter()
        grads = super()._hypergradients(run, inputs, targets)
        self.timings.append(time.perf_counter() - started)
        return grads


def data(seed: int, rows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 64, generator=g)
    y = (x[:, :10] + 0.5 * torch.randn(rows, 10, generator=g)).argmax(1)
    return [(x[i : i + 128], y[i : i + 128]) for i in range(0, rows, 128)]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


SPACE = Space({"weight_decay": (1e-4, 1.0), "label_smoothing": (0.0, 0.2), "noise": (0.0, 0.5)})
START = {"weight_decay": 1e-2, "label_smoothing": 0.05, "noise": 0.1}


def plain_step_seconds(train: list[Any], val: list[Any], epochs: int) -> float:
    history = fit(model(), Regularization(**START), train=train, val=val, num_classes=10, epochs=epochs,
                  train_eval_size=256, progress=False)  # fmt: skip
    return sum(r["seconds"] for r in history.rows[1:]) / (len(train) * (epochs - 1))  # epoch 1 warms up


def hypergradient_seconds(train: list[Any], val: list[Any], solve_steps: int, noise: bool = True) -> float:
    space = SPACE if noise else Space({k: v for k, v in SPACE.knobs.items() if k != "noise"})
    start = START if noise else {k: v for k, v in START.items() if k != "noise"}
    controller = Timed(space, every=5, warmup=0, solve_steps=solve_steps, start=start)
    fit(model(), controller.start(), train=train, val=val, num_classes=10, epochs=2, train_eval_size=256,
        progress=False, controller=controller)  # fmt: skip
    return statistics.median(controller.timings[2:])


def controlled_step_seconds(train: list[Any], val: list[Any], epochs: int) -> float:
    """Seconds per training step with the default controller (every 20, one solve step),
    end to end: the hypergradient steps and the retunes they cause included."""
    controller = HypergradientController(SPACE, warmup=0, start=START)
    history = fit(model(), controller.start(), train=train, val=val, num_classes=10, epochs=epochs,
                  train_eval_size=256, progress=False, controller=controller)  # fmt: skip
    return sum(r["seconds"] for r in history.rows[1:]) / (len(train) * (epochs - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, val = data(0, 128 * 40), data(1, 128 * 2)
    plain: list[float] = []
    controlled: list[float] = []
    hyper: dict[int, list[float]] = {0: [], 1: [], 2: []}
    without_noise: list[float] = []
    for _ in range(args.repeats):  # alternately, so drift on a shared machine hits both
        plain.append(plain_step_seconds(train, val, epochs=3))
        controlled.append(controlled_step_seconds(train, val, epochs=3))
        for solve_steps, times in hyper.items():
            times.append(hypergradient_seconds(train, val, solve_steps))
        without_noise.append(hypergradient_seconds(train, val, 1, noise=False))
    step = statistics.median(plain)
    print(f"plain training step: {1e3 * step:.2f} ms (median of {args.repeats} runs)")
    print("solve_steps  one hypergradient step  extra cost per training step, every = 10 / 20 / 50")
    for solve_steps, times in hyper.items():
        ratio = statistics.median(times) / step
        shares = " / ".join(f"{ratio / every:5.1%}" for every in (10, 20, 50))
        print(f"{solve_steps:>11}  {ratio:>9.2f} steps           {shares}")
    ratio = statistics.median(without_noise) / step
    print(
        f"without the noise knob (no antithetic pairs), solve_steps 1: {ratio:.2f} steps, "
        f"{ratio / 20:.1%} of the step at every = 20"
    )
    ratios = [c / p for c, p in zip(controlled, plain, strict=True)]
    print(
        f"end to end, the default (every 20, solve_steps 1): a training step costs "
        f"{statistics.median(ratios):.2f}x the plain one (runs: {', '.join(f'{r:.2f}' for r in ratios)})"
    )


if __name__ == "__main__":
    main()
