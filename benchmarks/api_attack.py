"""Attack the Python API by category and count what comes back (issue 21's closing note).

    PYTHONPATH=src python benchmarks/api_attack.py [--verbose]

Each case is one call, tagged with what it should do:

- ``bad``: bad input; the one-line ``InputError`` is the right answer. A success is a
  *silent acceptance*; any other exception, or a message over one line, is *not one line*;
  one line that blames the wrong thing (the budget, for an objective's NaN) is *misworded*.
- ``ok``: a call that should work as people write it (the README's examples, the usual
  shapes of a model's output). An exception is a *refusal of good input*.
- ``theirs``: the user's own code raises; it should keep its type and say which trial
  and setting (an ``InputError`` here would reword their bug as bad input).

The table prints, per category, the calls tried and each kind of wrong answer. Every call
trains at most one epoch of a 4-feature model on 64 rows, so the whole attack takes seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import regdial
from regdial._checks import InputError

Case = tuple[str, str, str, Callable[[], object]]  # (category, expectation, name, call)


def loader(x: torch.Tensor, y: torch.Tensor) -> DataLoader[Any]:
    return DataLoader(TensorDataset(x, y), batch_size=16)


X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] > 0).long()
TRAIN, VAL = loader(X, Y), loader(X, Y)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2))


class Tupled(nn.Module):
    """(logits, aux), as many research models return."""

    def __init__(self) -> None:
        super().__init__()
        self.body = make_model()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.body(x)
        return logits, logits.detach().sum()


class Dicted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = make_model()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.body(x)}


class TakesBatch(nn.Module):
    """``forward(self, batch)``: the dict batch whole."""

    def __init__(self) -> None:
        super().__init__()
        self.body = make_model()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.body(batch["pixels"])


class DictBatches:
    def __iter__(self) -> Any:
        for x, y in TRAIN:
            yield {"pixels": x, "labels": y}


class Buggy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = make_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ZeroDivisionError("the user's own bug")


def quick(**extra: Any) -> dict[str, Any]:
    return {"budget": "1 trials", "strategy": "tpe", "retrain": False, "report": False, "epochs": 1} | extra


def objective_returning(value: object) -> Callable[..., object]:
    def train(setting: regdial.Regularization, trial: regdial.Trial) -> object:
        return value

    return train


def reporting(**values: Any) -> Callable[..., None]:
    def train(setting: regdial.Regularization, trial: regdial.Trial) -> None:
        for epoch in range(trial.epochs):
            trial.report(epoch, **values)

    return train


def report_on_trial(*args: Any, **kwargs: Any) -> None:
    trial = regdial.Trial(regdial.Regularization(), number=0, metric="val_loss", epochs=3)
    trial.report(*args, **kwargs)


def fit_own(**extra: Any) -> object:
    options: dict[str, Any] = {"train": TRAIN, "val": VAL, "num_classes": 2, "epochs": 1, "progress": False}
    model = extra.pop("net", None) or make_model()
    return regdial.fit(model, regdial.Regularization(), **(options | extra))


def tune_own(factory: Callable[[], nn.Module] = make_model, **extra: Any) -> object:
    options: dict[str, Any] = {"train": TRAIN, "val": VAL, "num_classes": 2}
    return regdial.tune(factory, **(quick() | options | extra))


def a_file() -> str:
    path = Path(tempfile.mkdtemp()) / "a-file"
    path.write_text("not a directory\n")
    return str(path)


def cases() -> list[Case]:
    labels3 = torch.arange(64) % 3
    return [
        # -- Space and Regularization ---------------------------------------------------
        ("Space", "ok", "README Space(weight_decay=..., dropout=...)",
         lambda: regdial.Space(weight_decay=(1e-5, 1e-1), dropout=(0, 0.5))),
        ("Space", "ok", "Space({...})", lambda: regdial.Space({"weight_decay": (1e-5, 1e-1)})),
        ("Space", "bad", "Space(bogus=(0, 1))", lambda: regdial.Space(bogus=(0, 1))),
        ("Space", "bad", "Space({'dropout': (0, 'a')})", lambda: regdial.Space({"dropout": (0, "a")})),
        ("Space", "bad", "Space(5)", lambda: regdial.Space(5)),  # type: ignore[arg-type]
        ("Space", "bad", "Space({'dropout': (0.5, 0.1)})", lambda: regdial.Space({"dropout": (0.5, 0.1)})),
        ("Space", "bad", "Space({'dropout': (0, 0.5, 1)})", lambda: regdial.Space({"dropout": (0, 0.5, 1)})),
        ("Space", "bad", "Regularization(dropout=1.5)", lambda: regdial.Regularization(dropout=1.5)),
        ("Space", "bad", "Regularization(dropout='a')", lambda: regdial.Regularization(dropout="a")),
        ("Space", "bad", "Regularization(bogus=1)", lambda: regdial.Regularization(bogus=1)),  # type: ignore[call-arg]
        # -- Trial.report ---------------------------------------------------------------
        ("Trial.report", "ok", "report(0, ...)", lambda: report_on_trial(0, train_loss=1.0, val_loss=1.0)),
        ("Trial.report", "bad", "report(val_loss=True)", lambda: report_on_trial(1, train_loss=1.0, val_loss=True)),
        ("Trial.report", "bad", "report(val_loss='a')", lambda: report_on_trial(1, train_loss=1.0, val_loss="a")),
        ("Trial.report", "bad", "report(val_loss=None)", lambda: report_on_trial(1, train_loss=1.0, val_loss=None)),
        ("Trial.report", "bad", "report('1', ...)", lambda: report_on_trial("1", train_loss=1.0, val_loss=1.0)),
        ("Trial.report", "bad", "report(-1, ...)", lambda: report_on_trial(-1, train_loss=1.0, val_loss=1.0)),
        ("Trial.report", "bad", "report(1, val_accuracy=[1])",
         lambda: report_on_trial(1, train_loss=1.0, val_loss=1.0, val_accuracy=[1])),
        # -- tune(objective) --------------------------------------------------------------
        ("tune(objective)", "ok", "objective returns its score (default metric)",
         lambda: regdial.tune(objective_returning(0.5), **quick())),
        ("tune(objective)", "ok", "reports from epoch 0 (range(n))",
         lambda: regdial.tune(reporting(train_loss=1.0, val_loss=1.0), **quick(epochs=2))),
        ("tune(objective)", "bad", "objective returns NaN every trial",
         lambda: regdial.tune(objective_returning(math.nan), **quick())),
        ("tune(objective)", "bad", "objective returns a string",
         lambda: regdial.tune(objective_returning("good"), **quick())),
        ("tune(objective)", "bad", "objective returns inf",
         lambda: regdial.tune(objective_returning(math.inf), **quick())),
        ("tune(objective)", "bad", "epochs=0", lambda: regdial.tune(objective_returning(0.5), **quick(epochs=0))),
        ("tune(objective)", "bad", "epochs='2'", lambda: regdial.tune(objective_returning(0.5), **quick(epochs="2"))),
        ("tune(objective)", "bad", "metric=5", lambda: regdial.tune(objective_returning(0.5), **quick(metric=5))),
        ("tune(objective)", "bad", "budget='lots'", lambda: regdial.tune(objective_returning(0.5), **quick(budget="lots"))),
        ("tune(objective)", "bad", "strategy='bogus'",
         lambda: regdial.tune(objective_returning(0.5), **quick(strategy="bogus"))),
        ("tune(objective)", "bad", "space={'dropout': 5}",
         lambda: regdial.tune(objective_returning(0.5), space={"dropout": 5}, **quick())),  # type: ignore[arg-type]
        ("tune(objective)", "bad", "workers=0", lambda: regdial.tune(objective_returning(0.5), **quick(workers=0))),
        ("tune(objective)", "theirs", "objective raises its own bug",
         lambda: regdial.tune(lambda s, t: 1 / 0, **quick())),
        # -- tune(factory, loaders) ---------------------------------------------------------
        ("tune(factory)", "ok", "model returns (logits, aux)", lambda: tune_own(Tupled)),
        ("tune(factory)", "ok", "model returns a dict with logits", lambda: tune_own(Dicted)),
        ("tune(factory)", "bad", "kind='bogus'", lambda: tune_own(kind="bogus")),
        ("tune(factory)", "bad", "model_options=5", lambda: tune_own(model_options=5)),
        ("tune(factory)", "bad", "metrics={'acc': 5}", lambda: tune_own(metrics={"acc": 5})),
        ("tune(factory)", "bad", "loss_fn returns a float", lambda: tune_own(loss_fn=lambda out, batch: 1.0)),
        ("tune(factory)", "bad", "num_classes=5 for 2 outputs", lambda: tune_own(num_classes=5)),
        ("tune(factory)", "bad", "num_classes=2 with labels 0-2",
         lambda: tune_own(train=loader(X, labels3), val=loader(X, labels3))),
        ("tune(factory)", "bad", "num_classes='2'", lambda: tune_own(num_classes="2")),
        ("tune(factory)", "bad", "epochs=-1", lambda: tune_own(epochs=-1)),
        ("tune(factory)", "bad", "lr='fast'", lambda: tune_own(lr="fast")),
        # -- fit ------------------------------------------------------------------------------
        ("fit", "ok", "dict batches, forward(self, batch)",
         lambda: regdial.fit(TakesBatch(), train=DictBatches(), val=DictBatches(), num_classes=2, epochs=1,
                             progress=False)),
        ("fit", "ok", "model returns (logits, aux)", lambda: fit_own(net=Tupled())),
        ("fit", "bad", "fit('wine', model=5)", lambda: regdial.fit("wine", model=5, epochs=1, progress=False)),
        ("fit", "bad", "run_dir=<a regular file>", lambda: fit_own(run_dir=a_file())),
        ("fit", "bad", "initial_weights=5", lambda: fit_own(initial_weights=5)),
        ("fit", "bad", "on_epoch=5", lambda: fit_own(on_epoch=5)),
        ("fit", "bad", "augment_options={'bogus': 1}", lambda: fit_own(augment_options={"bogus": 1})),
        ("fit", "bad", "epochs='2'", lambda: fit_own(epochs="2")),
        ("fit", "bad", "metrics={'acc': 5}", lambda: fit_own(metrics={"acc": 5})),
        ("fit", "bad", "loss_fn returns a float", lambda: fit_own(loss_fn=lambda out, batch: 1.0)),
        ("fit", "bad", "labels >= num_classes", lambda: fit_own(train=loader(X, Y + 4), val=loader(X, Y + 4))),
        ("fit", "bad", "float labels with num_classes", lambda: fit_own(train=loader(X, Y.float()), val=loader(X, Y.float()))),
        ("fit", "bad", "one-hot labels", lambda: fit_own(train=loader(X, nn.functional.one_hot(Y, 2)),
                                                         val=loader(X, nn.functional.one_hot(Y, 2)))),
        ("fit", "bad", "num_classes=5 for 2 outputs", lambda: fit_own(num_classes=5)),
        ("fit", "bad", "setting=0.1", lambda: regdial.fit(make_model(), 0.1, train=TRAIN, val=VAL, num_classes=2)),  # type: ignore[arg-type]
        ("fit", "theirs", "the model's forward raises", lambda: fit_own(net=Buggy())),
    ]  # fmt: skip


# Bad input whose one line must name the real cause (the budget was not the problem).
WORDS = {
    "objective returns NaN every trial": "objective",
    "objective returns a string": "objective",
    "objective returns inf": "objective",
}


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Prints, logging and warnings of a call swallowed (the verdict is what it raises)."""
    out, err = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
    with out, err, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def judge(expectation: str, call: Callable[[], object], words: str = "") -> tuple[str, str]:
    """(verdict, what came back). Verdicts: right, silent, not one line, misworded (one line
    that blames something else), refused, reworded."""
    try:
        with quiet():
            call()
    except Exception as error:
        text = f"{type(error).__name__}: {error}"
        one_line = isinstance(error, InputError) and "\n" not in str(error)
        if expectation == "bad":
            if one_line and words not in str(error):
                return "misworded", text
            return ("right" if one_line else "not one line"), text
        if expectation == "theirs":
            return ("reworded" if isinstance(error, InputError) else "right"), text
        return "refused", text
    if expectation == "bad":
        return "silent", "accepted"
    if expectation == "theirs":
        return "silent", "accepted"
    return "right", "ok"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="print every case and what it got")
    verbose = parser.parse_args().verbose
    logging.disable(logging.CRITICAL)
    table: dict[str, Counter[str]] = {}
    for category, expectation, name, call in cases():
        verdict, text = judge(expectation, call, WORDS.get(name, ""))
        counts = table.setdefault(category, Counter())
        counts["tried"] += 1
        counts[verdict] += 1
        if verbose or verdict != "right":
            first = text.splitlines()[0] if text else ""
            extra = f" (+{len(text.splitlines()) - 1} lines)" if "\n" in text else ""
            print(f"{verdict:>12}  {category:<16} {name:<46} {first[:110]}{extra}")
    columns = ("tried", "right", "not one line", "misworded", "silent", "refused", "reworded")
    print()
    print("| category | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    total: Counter[str] = Counter()
    for category, counts in table.items():
        total.update(counts)
        print(f"| {category} | " + " | ".join(str(counts[c]) for c in columns) + " |")
    print("| all | " + " | ".join(str(total[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
