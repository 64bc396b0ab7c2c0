"""fit: determinism, the run directory, resume after SIGKILL and Ctrl-C, divergence."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regdial import Regularization, fit
from regdial.training.checkpoint import load_weights
from regdial.training.history import metric_columns
from regdial.training.metrics import evaluate
from regdial.training.models import build_model
from regdial.training.tasks import TASKS, load_task

SETTING = Regularization(dropout=0.2, augment=0.5, ema=0.9, label_smoothing=0.05, l1=1e-5, early_stopping=50)


def without_seconds(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_same_seed_same_numbers() -> None:
    first = fit("wine", SETTING, epochs=4, progress=False)
    second = fit("wine", SETTING, epochs=4, progress=False)
    assert without_seconds(first.rows) == without_seconds(second.rows)
    other = fit("wine", SETTING, epochs=4, seed=1, progress=False)
    assert without_seconds(other.rows) != without_seconds(first.rows)


def test_fit_leaves_the_callers_random_state_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit("wine", SETTING, epochs=1, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_run_directory(tmp_path: Path) -> None:
    history = fit("wine", SETTING, epochs=3, run_dir=tmp_path, progress=False)
    assert {p.name for p in tmp_path.iterdir()} >= {
        "config.toml",
        "history.csv",
        "history.json",
        "summary.json",
        "checkpoints",
    }
    lines = (tmp_path / "history.csv").read_text().splitlines()
    assert lines[0].split(",") == metric_columns("classification")
    assert len(lines) == 4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["epochs_run"] == 3
    assert Regularization.from_dict(summary["setting"]) == SETTING
    assert set(summary["final"]) == {
        "val_loss", "val_accuracy", "val_accuracy_se", "test_loss", "test_accuracy", "test_accuracy_se"
    }  # fmt: skip
    assert summary["best_epoch"] == history.best_epoch()
    assert {"final.safetensors", "best.safetensors", "last.json"} <= {
        p.name for p in (tmp_path / "checkpoints").iterdir()
    }
    # Nothing pickled: weights are safetensors, the rest is JSON and TOML.
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))
    row = history.rows[-1]
    assert row["gap"] == pytest.approx(row["val_loss"] - row["train_loss"])
    assert 0.0 < row["zero_fraction"] < 1.0  # L1's exact zeros in the trained weights... of the EMA model
    # The best checkpoint scores, evaluated again, what summary.json says of it.
    best = history.rows[summary["best_epoch"] - 1]
    assert {k: summary["best"][k] for k in ("val_loss", "val_accuracy")} == {
        k: best[k] for k in ("val_loss", "val_accuracy")
    }
    data = load_task("wine")
    model = build_model(TASKS["wine"].model, data)
    model.load_state_dict(load_weights(tmp_path / "checkpoints" / "best.safetensors"))
    scores = evaluate(model, [(data.x_val, data.y_val)], data.num_classes, torch.device("cpu"))
    assert scores["accuracy"] == pytest.approx(summary["best"]["val_accuracy"])
    assert scores["loss"] == pytest.approx(summary["best"]["val_loss"], rel=1e-5)


RUNNER = """
import sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))  # the parent's: another count sums in another order
from regdial import fit, Regularization
setting = Regularization(dropout=0.2, augment=0.5, ema=0.9, label_smoothing=0.05, l1=1e-5, early_stopping=50)
fit("digits-small", setting, epochs=10, run_dir=sys.argv[1], checkpoint_seconds=0, progress=False,
    on_epoch=lambda row: time.sleep(0.2))
"""


def slow_fit(run_dir: Path, resume: bool = False):
    return fit(
        "digits-small", SETTING, epochs=10, run_dir=run_dir, checkpoint_seconds=0, progress=False, resume=resume,
        on_epoch=lambda row: None,
    )  # fmt: skip


def epoch_on_disk(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoints" / "last.json").read_text())["state"]["loop"]["epoch"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def interrupt_at(run_dir: Path, epoch: int, sig: int) -> subprocess.CompletedProcess[str] | None:
    process = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(run_dir), str(torch.get_num_threads())],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while epoch_on_disk(run_dir) < epoch and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    assert process.poll() is None, process.communicate()
    process.send_signal(sig)
    out, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def assert_same_run(resumed: Path, uninterrupted: Path) -> None:
    a, b = (
        load_weights(resumed / "checkpoints" / "final.safetensors"),
        load_weights(uninterrupted / "checkpoints" / "final.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows_a = json.loads((resumed / "history.json").read_text())["rows"]
    rows_b = json.loads((uninterrupted / "history.json").read_text())["rows"]
    assert without_seconds(rows_a) == without_seconds(rows_b)


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    done = interrupt_at(killed, 4, signal.SIGKILL)
    assert done is not None and done.returncode == -signal.SIGKILL
    stopped_at = epoch_on_disk(killed)
    assert 4 <= stopped_at < 10  # really in the middle
    assert not (killed / "summary.json").exists()
    history = slow_fit(killed, resume=True)
    assert history.meta["status"] == "completed"
    slow_fit(tmp_path / "straight")
    assert_same_run(killed, tmp_path / "straight")


@pytest.mark.slow
def test_ctrl_c_saves_mid_epoch_and_resumes_exactly(tmp_path: Path) -> None:
    stopped = tmp_path / "stopped"
    done = interrupt_at(stopped, 3, signal.SIGINT)
    assert done is not None and done.returncode == 0
    state = json.loads((stopped / "checkpoints" / "last.json").read_text())["state"]["loop"]
    assert state["batch"] > 0  # saved inside an epoch, not at its end
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["reason"].startswith("interrupted at epoch")
    slow_fit(stopped, resume=True)
    slow_fit(tmp_path / "straight")
    assert_same_run(stopped, tmp_path / "straight")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    history = fit(
        "breast-cancer", Regularization(), epochs=20, optimizer="sgd", lr=1e6, lr_schedule="constant",
        run_dir=tmp_path, checkpoint_seconds=0, progress=False,
    )  # fmt: skip
    assert history.meta["status"] == "diverged"
    assert "non-finite training loss" in history.meta["reason"]
    assert "at epoch" in history.meta["reason"] and "step" in history.meta["reason"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert summary["kept"] == "no checkpoint was written before it"  # it diverged inside epoch 1
    assert not (tmp_path / "checkpoints").exists() or not list(
        (tmp_path / "checkpoints").glob("*.safetensors")
    )


def test_a_divergence_after_the_first_epoch_keeps_that_checkpoint(tmp_path: Path) -> None:
    """The first epoch always leaves a checkpoint; a later divergence keeps it, finite."""
    from regdial.training.loop import Run

    original = Run.end_epoch

    def end_epoch_then_blow_up(self, epoch: int, seconds: float) -> dict[str, float]:
        row = original(self, epoch, seconds)
        for group in self.applied.optimizer.param_groups:
            group["initial_lr"] = 1e6  # from epoch 2 on the steps explode
        return row

    Run.end_epoch = end_epoch_then_blow_up
    try:
        history = fit("breast-cancer", Regularization(), epochs=5, optimizer="sgd", lr=1e-2, lr_schedule="constant",
                      run_dir=tmp_path, checkpoint_seconds=3600, progress=False)  # fmt: skip
    finally:
        Run.end_epoch = original
    assert history.meta["status"] == "diverged" and "at epoch 2" in history.meta["reason"]
    assert history.meta["kept"] == "the last good checkpoint (after epoch 1) is kept"
    assert epoch_on_disk(tmp_path) == 1
    pointer = json.loads((tmp_path / "checkpoints" / "last.json").read_text())
    weights = load_weights(tmp_path / "checkpoints" / pointer["tensors"])
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def test_early_stopping_ends_the_run_and_says_why() -> None:
    history = fit("breast-cancer", Regularization(early_stopping=3), epochs=200, lr=1e-2, progress=False)
    assert history.meta["status"] == "stopped early"
    assert history.meta["reason"].startswith("stopped at epoch")
    assert len(history) < 200


@pytest.mark.parametrize("early_stopping", [0, 30])
def test_an_accuracys_tied_epochs_are_told_apart_by_the_validation_loss(early_stopping: int) -> None:
    """Wine's 36 validation rows are all right from the first epoch on: every epoch ties
    on val_accuracy, and the best is the one with the lowest val_loss, not the first."""
    history = fit("wine", Regularization(early_stopping=early_stopping), epochs=12, lr=3e-3,
                  monitor="val_accuracy", progress=False)  # fmt: skip
    top = max(row["val_accuracy"] for row in history)
    tied = [row for row in history if row["val_accuracy"] == top]
    assert len(tied) > 1 and tied[0]["val_loss"] > min(row["val_loss"] for row in tied)
    expected = int(min(tied, key=lambda row: row["val_loss"])["epoch"])
    assert history.meta["summary"]["best_epoch"] == expected == history.best_epoch("val_accuracy")
    best = next(row for row in history if row["epoch"] == expected)
    assert history.meta["summary"]["best"]["val_loss"] == pytest.approx(best["val_loss"])


def test_own_model_with_dataloaders() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(200, 5), torch.randint(0, 2, (200,))
    train = DataLoader(TensorDataset(x[:150], y[:150]), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(x[150:], y[150:]), batch_size=64)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, 2))
    history = fit(
        model,
        Regularization(dropout=0.1, weight_decay=0.01),
        train=train,
        val=val,
        num_classes=2,
        epochs=3,
        progress=False,
    )
    assert len(history) == 3
    assert model[2].p == 0.1
    assert "test_accuracy" not in history.meta["summary"]["final"]


def test_regression_with_l1_selects_the_lassos_features() -> None:
    """Full batch, L1 in Adam's metric: the features kept are scikit-learn's Lasso's.

    The trainer's loss is the mean squared error, twice the lasso's (1/2n)||y - Xw||^2,
    so L1(s) is Lasso(alpha=s/2).
    """
    import numpy as np
    from sklearn.linear_model import Lasso

    from regdial import load_task
    from regdial.training.summary import selected_features

    data = load_task("sparse-regression")
    for strength in (0.3, 1.0):
        history = fit("sparse-regression", Regularization(l1=strength), progress=False)
        lasso = Lasso(alpha=strength / 2, tol=1e-10, max_iter=100_000).fit(
            data.x_train.double().numpy(), data.y_train.double().numpy()
        )
        summary = history.meta["summary"]
        assert summary["support"]["features"] == [int(i) for i in np.nonzero(lasso.coef_)[0]]
        assert summary["support"]["recall"] == 1.0
    assert summary["support"]["precision"] == 1.0  # at 1.0: exactly the true support
    assert history.columns == metric_columns("regression")
    assert history.rows[-1]["zero_fraction"] == 0.9
    plain = fit("sparse-regression", Regularization(), progress=False).meta["summary"]
    mild = fit("sparse-regression", Regularization(l1=0.3), progress=False).meta["summary"]
    assert plain["support"]["selected"] == 100  # without L1 every feature stays
    assert mild["final"]["test_rmse"] < 0.8 * plain["final"]["test_rmse"]  # and L1 generalizes better
    assert selected_features(nn.Linear(3, 1)) == [0, 1, 2]
    assert np.isfinite(mild["final"]["test_r2"])


def test_on_epoch_can_prune_and_initial_weights_warm_start() -> None:
    pruned = fit("wine", epochs=10, on_epoch=lambda row: row["epoch"] >= 2, progress=False)
    assert pruned.meta["status"] == "pruned"
    assert len(pruned) == 2
    from regdial import build_model, load_task

    model = build_model("mlp", load_task("wine"))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    zero_start = fit("wine", epochs=1, initial_weights=model.state_dict(), lr=1e-12, progress=False)
    assert zero_start.rows[0]["val_loss"] == pytest.approx(
        math.log(3), rel=1e-4
    )  # zero weights: uniform output


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, r"^run.epochs must be an integer in \[1, 100000\], got 0$"),
        ({"epochs": True}, r"^run.epochs must be an integer in \[1, 100000\], got True$"),
        ({"seed": 1.0}, r"^run.seed must be an integer in \[0, 4294967295\], got 1.0$"),
        (
            {"optimizer": "adamx"},
            r"^run.optimizer must be one of 'adamw', 'adam', 'sgd', 'nadam', 'radam', 'rmsprop', 'adagrad', "
            r"got 'adamx'$",
        ),
        ({"lr": -1.0}, r"^run.lr must be a number in \(0, 1000000\], got -1.0$"),
        ({"lr_schedule": "step"}, r"^run.lr_schedule must be one of 'cosine', 'constant', got 'step'$"),
        ({"device": "gpu"}, r"^run.device must be one of auto, cpu, cuda, cuda:N, mps, got 'gpu'$"),
        (
            {"model": "transformer"},
            r"^model must be one of 'linear', 'mlp', 'cnn', 'cnn1d', 'resnet', got 'transformer'$",
        ),
        ({"model": "cnn"}, r"^model must be a model for tabular inputs, not 'cnn'"),
        ({"resume": True}, r"^resume must be a run directory to resume from, got None$"),
    ],
)
def test_bad_arguments(kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fit("wine", **kwargs)


def test_resume_needs_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^resume must be a run directory with a checkpoint"):
        fit("wine", epochs=1, run_dir=tmp_path, resume=True)


def test_task_names_are_checked() -> None:
    with pytest.raises(ValueError, match=r"^task must be one of 'digits'"):
        fit("mnist")


def test_ctrl_c_after_the_last_batch_completes_the_run_and_still_stops_the_caller(tmp_path: Path) -> None:
    def press_ctrl_c_at_the_end(row: dict[str, float]) -> bool:
        if row["epoch"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # caught by fit's handler: a flag, no exception
        return False

    before = signal.getsignal(signal.SIGINT)  # what the process had (another test may have changed it)
    with pytest.raises(KeyboardInterrupt, match="the run completed and was saved"):
        fit(
            "wine",
            Regularization(),
            epochs=3,
            run_dir=tmp_path,
            progress=False,
            on_epoch=press_ctrl_c_at_the_end,
        )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_run"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


class _StopError(Exception):
    """Stands for a kill between two epochs: the run stops without its own clean-up."""


def _stop_at(epoch: int):
    def on_epoch(row: dict[str, float]) -> bool:
        if row["epoch"] == epoch:
            raise _StopError
        return False

    return on_epoch


def test_a_run_with_a_controller_resumes_exactly_after_a_retune(tmp_path: Path) -> None:
    """The setting in force after the controller's turn, and the controller's own state,
    are in the checkpoint: the resumed epochs train at the turned strengths."""
    from regdial import OnlineController, Space

    space = Space({"weight_decay": (1e-3, 1.0), "dropout": (0.0, 0.5)})

    def run(run_dir: Path, **kwargs) -> object:
        controller = OnlineController(space, every=3)
        return fit(
            "digits-small", controller.start(), epochs=14, lr=3e-3, run_dir=run_dir, checkpoint_seconds=0,
            progress=False, controller=controller, **kwargs,
        )  # fmt: skip

    straight = run(tmp_path / "straight")
    turns = straight.meta.get("retunes", [])
    assert turns and turns[0]["epoch"] < 9, "the controller must turn before the interruption"
    with pytest.raises(_StopError):
        run(tmp_path / "killed", on_epoch=_stop_at(9))
    run(tmp_path / "killed", resume=True)
    assert_same_run(tmp_path / "killed", tmp_path / "straight")
    saved = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert saved["best_setting"] == straight.meta["summary"]["best_setting"]


def test_weight_statistics_describe_the_evaluated_model(tmp_path: Path) -> None:
    """With EMA the evaluated model is the average: its zeros, not the live weights', go in the row."""
    history = fit(
        "sparse-regression", Regularization(l1=1.0, ema=0.9), epochs=60, run_dir=tmp_path, progress=False
    )
    live_zeros = 0.9  # L1 at 1.0 zeroes the 90 useless features of the live weights (tested above)
    final = load_weights(tmp_path / "checkpoints" / "final.safetensors")
    average = final["0.1.weight"] if "0.1.weight" in final else final["1.weight"]
    row = history.rows[-1]
    assert row["zero_fraction"] == pytest.approx(float((average == 0).float().mean()))
    assert row["zero_fraction"] < live_zeros
    assert row["weight_norm"] == pytest.approx(float(average.norm()), rel=1e-5)


@pytest.mark.parametrize("early_stopping", [0, 50])
def test_one_copy_of_the_best_weights(tmp_path: Path, early_stopping: int) -> None:
    """Early stopping's best weights are the run's best weights: one copy, checkpointed once."""
    from safetensors.torch import load_file

    fit("wine", Regularization(early_stopping=early_stopping), epochs=3, run_dir=tmp_path, progress=False)
    pointer = json.loads((tmp_path / "checkpoints" / "last.json").read_text())
    keys = load_file(str(tmp_path / "checkpoints" / pointer["tensors"])).keys()
    copies = {key.split("/best_state/")[0] for key in keys if "/best_state/" in key}
    assert copies == ({"applied/early_stopping"} if early_stopping else {"best"})


def test_a_resume_after_the_best_epoch_keeps_its_setting_and_removes_orphans(tmp_path: Path) -> None:
    """The settings in force per epoch are checkpointed: a run resumed after its best epoch
    still says which setting that was. A temporary file a killed write left is removed."""
    setting = Regularization(dropout=0.1)
    with pytest.raises(_StopError):
        fit("wine", setting, epochs=14, lr=0.1, run_dir=tmp_path, checkpoint_seconds=0, progress=False,
            on_epoch=_stop_at(8))  # fmt: skip
    orphan = tmp_path / "checkpoints" / ".state-000099.safetensors.abc.tmp"
    orphan.write_bytes(b"half a file")
    history = fit("wine", setting, epochs=14, lr=0.1, run_dir=tmp_path, checkpoint_seconds=0, progress=False,
                  resume=True)  # fmt: skip
    summary = history.meta["summary"]
    assert summary["best_epoch"] <= 7  # the best epoch came before the resume
    assert Regularization.from_dict(summary["best_setting"]) == setting
    assert not orphan.exists()


def test_on_epoch_sees_the_epoch_early_stopping_ends_on() -> None:
    seen: list[int] = []
    history = fit(
        "wine", Regularization(early_stopping=1), epochs=60, lr=0.3, progress=False,
        on_epoch=lambda row: seen.append(int(row["epoch"])) and False,
    )  # fmt: skip
    assert history.meta["status"] == "stopped early"
    assert seen == [int(row["epoch"]) for row in history.rows]


def test_an_early_stopped_trial_counts_every_epoch_it_ran() -> None:
    from regdial.dial.objective import FitObjective
    from regdial.dial.trial import Trial

    setting = Regularization(early_stopping=1)
    trial = Trial(setting, number=0, metric="val_accuracy", epochs=60)
    FitObjective("wine", lr=0.3)(setting, trial)
    assert trial.history.meta["status"] == "stopped early"
    assert trial.epochs_run == trial.history.meta["summary"]["epochs_run"] < 60


def test_an_empty_val_or_test_loader_is_one_line_naming_it_before_training() -> None:
    from torch.utils.data import DataLoader, TensorDataset

    x, y = torch.randn(40, 4), torch.randint(0, 2, (40,))
    full, empty = (DataLoader(TensorDataset(x[:n], y[:n]), batch_size=8) for n in (40, 0))
    seen: list[object] = []
    with pytest.raises(ValueError, match=r"^val must be at least one batch, got an empty source$"):
        fit(torch.nn.Linear(4, 2), train=full, val=empty, num_classes=2, on_epoch=seen.append, progress=False)
    with pytest.raises(ValueError, match=r"^test must be at least one batch, got an empty source$"):
        fit(torch.nn.Linear(4, 2), train=full, val=full, test=empty, num_classes=2, on_epoch=seen.append,
            progress=False)  # fmt: skip
    assert not seen  # no epoch trained first

    class Empty(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(())

    with pytest.raises(ValueError, match=r"^val must be at least one sample to evaluate"):
        fit(torch.nn.Linear(4, 2), train=full, val=DataLoader(Empty()), num_classes=2, progress=False)
