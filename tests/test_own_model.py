"""The dial on the user's own model, data and training code (issue 11)."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import optuna
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import regdial
from regdial import Applied, Regularization, Space, Trial, fit, tune
from regdial.cli import main
from regdial.config import load_config
from regdial.diagnosis import diagnose
from regdial.training.history import History

FIXTURES = Path(__file__).resolve().parent / "fixtures"


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Dropout(0.0),
                                  nn.Linear(8 * 8 * 8, 10))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.body(x)
        return output


def loaders(n: int = 240, seed: int = 0) -> tuple[DataLoader, DataLoader, DataLoader]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[: 2 * n] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y[: 2 * n])
    third = 2 * n // 3
    return (
        DataLoader(TensorDataset(x[:third], y[:third]), batch_size=32, shuffle=True,
                   generator=torch.Generator().manual_seed(seed)),
        DataLoader(TensorDataset(x[third : 2 * third], y[third : 2 * third]), batch_size=128),
        DataLoader(TensorDataset(x[2 * third :], y[2 * third :]), batch_size=128),
    )  # fmt: skip


def test_your_cnn_and_loaders_through_tune(tmp_path: Path) -> None:
    train, val, test = loaders()
    run = tmp_path / "mine"
    result = tune(TinyCNN, train=train, val=val, test=test, num_classes=10, epochs=3, budget="3 trials",
                  strategy="tpe", run_dir=run)  # fmt: skip
    assert set(Space.for_model(TinyCNN(), "classification").knobs) == {
        "weight_decay",
        "dropout",
        "label_smoothing",
        "ema",
    }
    assert {"result.json", "best.toml", "trials.csv", "study.db", "report.html", "best"} <= {
        p.name for p in run.iterdir()
    }
    assert "test_accuracy" in result.baseline and "test_accuracy" in result.tuned
    assert Regularization.from_toml(run / "best.toml") == result.best_setting
    # regdial run has neither these loaders nor this model: it trained digits-small in their place
    assert "[search]\nown_data = true\nepochs = " in (run / "best.toml").read_text()
    with pytest.raises(SystemExit) as stopped:
        main(["run", str(run / "best.toml"), "--epochs", "1", "--out", str(tmp_path / "rerun"), "--quiet"])
    assert stopped.value.code == 2 and not (tmp_path / "rerun").exists()
    assert load_config(run / "best.toml", {"task": "wine"}).run.task == "wine"  # a task given: it runs
    assert (run / "best" / "baseline" / "summary.json").is_file()
    first = [(t["number"], t["value"]) for t in result.trials]
    again = tune(TinyCNN, train=train, val=val, test=test, num_classes=10, epochs=3, budget="3 trials",
                 strategy="tpe", run_dir=run, retrain=False)  # fmt: skip
    assert [(t["number"], t["value"]) for t in again.trials] == first  # resumed: nothing trained twice
    # Other rows of data, or another model, in the same directory: the old result was read
    # back as theirs (the identity named only the factory and the seed).
    other = loaders(n=200)
    with pytest.raises(regdial.InputError, match=r"^run_dir must be a new directory, .*another identity"):
        tune(TinyCNN, train=other[0], val=other[1], num_classes=10, epochs=3, budget="3 trials",
             strategy="tpe", run_dir=run, retrain=False)  # fmt: skip

    class Wider(TinyCNN):
        def __init__(self) -> None:
            super().__init__()
            self.body[-1] = nn.Linear(8 * 8 * 8, 10, bias=False)

    Wider.__name__ = Wider.__qualname__ = "TinyCNN"  # the same name: only its structure differs
    with pytest.raises(regdial.InputError, match=r"another identity"):
        tune(Wider, train=train, val=val, test=test, num_classes=10, epochs=3, budget="3 trials",
             strategy="tpe", run_dir=run, retrain=False)  # fmt: skip
    # Every trial saw the same batches: the loader's own generator is seeded per run.
    torch.manual_seed(0)
    one = fit(TinyCNN(), Regularization(), train=train, val=val, num_classes=10, epochs=2, progress=False)
    torch.manual_seed(0)
    two = fit(TinyCNN(), Regularization(), train=train, val=val, num_classes=10, epochs=2, progress=False)
    assert one.rows[-1]["val_loss"] == two.rows[-1]["val_loss"]


def test_a_classifier_without_num_classes_is_one_line() -> None:
    train, val, _ = loaders(60)
    with pytest.raises(
        ValueError, match=r"^num_classes must be the number of classes: your targets are class labels"
    ):
        tune(TinyCNN, train=train, val=val, epochs=1, budget="1 trials")
    with pytest.raises(
        ValueError, match=r"^num_classes must be the number of classes: your targets are class labels"
    ):
        fit(TinyCNN(), train=train, val=val, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"^task must be a function returning a fresh model for each trial"):
        tune(TinyCNN(), train=train, val=val, num_classes=10)


def test_a_search_over_dropout_for_a_model_without_dropout_is_one_line() -> None:
    """Every trial would train the same; the chosen rate would read as if it had mattered."""
    train, val, _ = loaders(60)
    no_dropout = lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # noqa: E731
    with pytest.raises(ValueError, match=r"^space.dropout must be left out for a model with no dropout .*: "
                       r"Sequential has none, got \[0, 0.5\]$"):  # fmt: skip
        tune(no_dropout, Space({"dropout": (0.0, 0.5)}), train=train, val=val, num_classes=10, epochs=1,
             budget="1 trials")  # fmt: skip
    result = tune(no_dropout, train=train, val=val, num_classes=10, epochs=1, budget="1 trials", strategy="random",
                  retrain=False, report=False)  # fmt: skip
    assert "dropout" not in result.space  # the default space leaves it out


def test_a_one_time_iterator_is_refused() -> None:
    train, val, _ = loaders(60)
    with pytest.raises(ValueError, match=r"^train must be a DataLoader or another re-iterable of batches .* got a "
                       r"one-time iterator \(generator\)"):  # fmt: skip
        fit(TinyCNN(), train=(b for b in train), val=val, num_classes=10, epochs=1, progress=False)


class DictModel(nn.Module):
    """Hugging Face style: keyword inputs, an output object with ``.logits``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 3)
        self.dropout = nn.Dropout(0.0)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> object:
        return type("Output", (), {"logits": self.linear(self.dropout(features))})()


def test_fit_with_dict_batches_your_loss_metric_and_optimizer_class() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    batches = [{"features": x[i : i + 20], "labels": y[i : i + 20]} for i in range(0, 80, 20)]
    val = [{"features": x[80:], "labels": y[80:]}]
    calls = {"loss": 0}

    def loss_fn(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        calls["loss"] += 1
        return F.cross_entropy(output, batch["labels"])

    def macro_recall(outputs: torch.Tensor, targets: torch.Tensor) -> float:
        predicted = outputs.argmax(dim=1)
        recalls = [float((predicted[targets == c] == c).float().mean()) for c in targets.unique()]
        return sum(recalls) / len(recalls)

    model = DictModel()
    history = fit(model, Regularization(dropout=0.1), train=batches, val=val, num_classes=3, epochs=30,
                  optimizer=torch.optim.Adam, lr=0.05, loss_fn=loss_fn, metrics={"recall": macro_recall},
                  metric="recall", progress=False)  # fmt: skip
    assert calls["loss"] >= 30 * len(batches)
    assert history.metric == "recall" and "val_recall" in history.columns
    assert history.rows[-1]["val_recall"] > 0.6
    assert model.dropout.p == 0.1


def test_an_objective_is_tuned_and_pruned() -> None:
    """Your own loop as an objective: its reports are a History, and pruning stops trials."""
    x = torch.randn(200, 10, generator=torch.Generator().manual_seed(1))
    y = (x[:, :3].sum(dim=1) > 0).long()

    def train(setting: Regularization, trial: Trial) -> None:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Dropout(0.0), nn.Linear(64, 2))
        applied = Applied(setting, model, lambda groups: torch.optim.AdamW(groups, lr=3e-3), num_classes=2)
        for epoch in range(1, trial.epochs + 1):
            model.train()
            for i in range(0, 120, 20):
                xb, yb = applied.batch(x[i : i + 20], y[i : i + 20])
                loss = applied.loss(model(xb), yb)
                applied.optimizer.zero_grad()
                loss.backward()
                applied.optimizer.step()
            model.eval()
            with torch.no_grad():
                train_loss = float(F.cross_entropy(model(x[:120]), y[:120]))
                logits = model(x[120:])
                val_loss = float(F.cross_entropy(logits, y[120:]))
                accuracy = float((logits.argmax(1) == y[120:]).float().mean())
            trial.report(epoch, train_loss=train_loss, val_loss=val_loss, val_accuracy=accuracy)

    space = Space({"weight_decay": (1e-4, 1.0), "dropout": (0.0, 0.6)})
    result = tune(train, space=space, metric="val_accuracy", epochs=8, budget="10 trials")
    pruned = [t for t in result.trials if t["state"] == "pruned"]
    assert pruned and all(t["epochs"] < 8 for t in pruned)
    assert not result.path  # it never calls trial.save_weights: no warm-started path, TPE from the start
    assert result.retrain["baseline"]["final"]["val_accuracy"] > 0
    assert math.isfinite(result.best_value)


def test_a_trials_weight_decay_0_turns_off_the_decay_the_users_optimizer_was_built_with(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """torch's AdamW decays at 0.01 unless told: a trial at weight_decay 0 (the unregularized
    baseline) trained with it while its record said 0. Outside a search, 0 leaves it alone."""
    seen: list[tuple[float, list[float]]] = []
    x = torch.randn(60, 4, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()

    def train(setting: Regularization, trial: Trial) -> float:
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        applied = Applied(setting, model, torch.optim.AdamW(model.parameters(), lr=1e-2))
        seen.append(
            (float(setting.weight_decay), [g["weight_decay"] for g in applied.optimizer.param_groups])
        )  # type: ignore[arg-type]
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        applied.optimizer.step()
        return float(loss.detach())

    with caplog.at_level("WARNING", logger="regdial"):
        tune(train, space=Space({"dropout": (0.0, 0.5)}), metric="val_loss", epochs=1, budget="2 trials")
    assert seen and all(decay == 0.0 and groups == [0.0] for decay, groups in seen)
    assert (
        "a search trial's weight_decay=0 turns the optimizer's own (0.01) off in every group" in caplog.text
    )
    model = nn.Linear(4, 2)
    outside = Applied(Regularization(dropout=0.0), model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    assert [g["weight_decay"] for g in outside.optimizer.param_groups] == [0.01]


@pytest.mark.slow
def test_module_function_strings_with_two_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "mine.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset

        def make_model(input_shape=None, num_classes=None):
            return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, 2))

        def make_loaders():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(160, 5, generator=g)
            y = (x[:, 0] > 0).long()
            return DataLoader(TensorDataset(x[:120], y[:120]), batch_size=20), DataLoader(TensorDataset(x[120:], y[120:]))
    '''))  # fmt: skip
    monkeypatch.syspath_prepend(str(package))
    result = tune("mine:make_model", data="mine:make_loaders", num_classes=2, epochs=2, budget="4 trials",
                  strategy="tpe", workers=2, run_dir=tmp_path / "search", retrain=False)  # fmt: skip
    assert sum(t["state"] == "complete" for t in result.trials) == 4
    study = optuna.load_study(
        study_name="regdial-make_model-tpe", storage=f"sqlite:///{tmp_path / 'search' / 'study.db'}"
    )
    assert (
        len({t.user_attrs["worker"] for t in study.get_trials() if t.state.name == "COMPLETE"}) == 2
    )  # really two processes, one SQLite study
    with pytest.raises(
        ValueError, match=r"^workers must be 1 when the model, data, loss or metrics are Python objects"
    ):
        tune(
            lambda: nn.Linear(5, 2),
            data="mine:make_loaders",
            num_classes=2,
            workers=2,
            run_dir=tmp_path / "x",
        )
    with pytest.raises(
        ValueError, match=r"^model must be a module that imports, got 'nosuch': ModuleNotFoundError"
    ):
        tune("nosuch:make_model", data="mine:make_loaders", num_classes=2, run_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_the_cli_trains_your_model_on_your_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from regdial.cli import main

    (tmp_path / "models.py").write_text(textwrap.dedent('''
        from torch import nn

        def make_model(input_shape, num_classes):
            return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], 8), nn.ReLU(), nn.Linear(8, num_classes))
    '''))  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 4)).astype(np.float32)
    np.savez(tmp_path / "mine.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    main(
        [
            "run",
            "--model",
            "models:make_model",
            "--data",
            "mine.npz",
            "--epochs",
            "2",
            "--out",
            "run",
            "--quiet",
        ]
    )
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"
    with pytest.raises(SystemExit) as done:
        main(["run", "--model", "models:nothing", "--data", "mine.npz", "--out", "stray", "--quiet"])
    assert done.value.code == 2 and not (tmp_path / "stray").exists()


def test_the_cli_calls_every_form_of_factory_and_labels_a_crash_inside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from regdial.cli import main

    (tmp_path / "factories.py").write_text(textwrap.dedent('''
        from torch import nn

        def by_kwargs(**offered):
            return nn.Sequential(nn.Linear(offered["input_shape"][0], offered["num_classes"]))

        def needs_width(width):
            return nn.Linear(4, width)

        def crashes(input_shape, num_classes):
            raise RuntimeError("the user's own bug")
    '''))  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 4)).astype(np.float32)
    np.savez(tmp_path / "mine.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))

    def code(factory: str) -> int:
        try:
            main(["run", "--model", f"factories:{factory}", "--data", "mine.npz", "--epochs", "1", "--out",
                  factory, "--quiet"])  # fmt: skip
        except SystemExit as done:
            return int(done.code or 0)
        return 0

    assert code("by_kwargs") == 0  # a **kwargs factory is offered both sizes
    capsys.readouterr()
    assert code("needs_width") == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("regdial: error: run.model must be a function of input_shape and/or num_classes")
    assert "needs_width(width)" in line and "\n" not in line
    assert code("crashes") == 3  # the user's code raised: not worded as bad input
    line = capsys.readouterr().err.strip()
    assert line.startswith("regdial: error: the training raised RuntimeError: the user's own bug")
    assert "not bad input" in line and "REGDIAL_DEBUG=1" in line


def test_diagnose_reads_lightning_and_hugging_face_logs() -> None:
    lightning = History.load(FIXTURES / "lightning_metrics.csv")
    assert len(lightning) == 12 and lightning.metric == "accuracy"
    reading = diagnose(lightning)
    assert reading.state == "overfitting" and reading.overfit_epoch is not None
    hugging_face = History.load(FIXTURES / "trainer_state.json")
    assert hugging_face.meta["source"] == "huggingface" and len(hugging_face) == 10
    assert diagnose(hugging_face).state == "overfitting"
    assert regdial.diagnose is diagnose


def test_diagnose_uses_the_runs_own_setting() -> None:
    history = fit("wine", Regularization(weight_decay=0.05), epochs=3, progress=False)
    advice = diagnose(history)
    if advice.direction > 0:
        assert "0.05" in advice.message and "0 ->" not in advice.message
    assert history.meta["setting"]["weight_decay"] == 0.05


def test_an_objective_searchs_trials_keep_their_histories_and_diagnose_reads_the_chosen_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from regdial.cli import main

    def train(setting: Regularization, trial: Trial) -> None:
        for epoch in range(trial.epochs):  # a curve that overfits: validation turns up after epoch 3
            trial.report(
                epoch, train_loss=1.0 / (epoch + 1), val_loss=abs(epoch - 3) * 0.1 + 0.5 + setting.dropout
            )

    space = Space({"weight_decay": (1e-4, 1e-1), "dropout": (0.0, 0.5)})
    result = tune(train, space=space, epochs=12, budget="3 trials", strategy="random", run_dir=tmp_path)
    for trial in result.trials:
        saved = History.load(tmp_path / "trials" / str(trial["number"]))
        assert len(saved) == 12 and saved.meta["setting"]["dropout"] == pytest.approx(trial["dropout"])
    assert not (tmp_path / "best").exists()  # an objective's choice is not trained again into best/
    capsys.readouterr()
    main(["diagnose", str(tmp_path)])
    printed = " ".join(capsys.readouterr().out.split())
    assert f"the search's chosen trial ({result.best_trial}), as it trained" in printed
    assert "overfitting since epoch" in printed
