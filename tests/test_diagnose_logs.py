"""The diagnosis of logs people have: losses only, counted in steps (a language model's loop).

Each log is a CSV with an ``iter`` column (no ``epoch``), training losses on rows of their
own every 50 steps and a validation loss every 250, written here; ``History.load`` reads it
by step and the diagnosis words its answer in steps.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from regdial.diagnosis import diagnose
from regdial.training.history import History

EVALUATIONS = 40


def write_log(
    path: Path, train: Callable[[int], float], val: Callable[[int], float], counter: str = "iter"
) -> Path:
    """A step log: five training rows, then one validation row, per evaluation."""
    rng = random.Random(0)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([counter, "train_loss", "val_loss"])
        for i in range(1, EVALUATIONS + 1):
            for k in range(5):
                writer.writerow([i * 250 - 200 + k * 50, train(i) + rng.gauss(0, 0.02), ""])
            writer.writerow([i * 250, "", val(i) + rng.gauss(0, 0.008)])
    return path


def falling(start: float, end: float, scale: float = 8.0) -> Callable[[int], float]:
    return lambda i: end + (start - end) * math.exp(-i / scale)


def language_model_validation(i: int) -> float:
    """Down to its minimum 2.635 at evaluation 13, then up to 2.74: a 4% rise, under the 5% the
    diagnosis once asked for whatever the noise (the issue's log, 2.635 to 2.767, read as good fit)."""
    if i <= 13:
        return 2.635 + (3.6 - 2.635) * ((13 - i) / 12) ** 2
    return 2.635 + (2.74 - 2.635) * (i - 13) / (EVALUATIONS - 13)


@pytest.mark.parametrize("counter", ["iter", "step", "global_step", "iteration"])
def test_a_loss_only_language_model_log_by_step_is_overfitting(tmp_path: Path, counter: str) -> None:
    log = write_log(tmp_path / "log.csv", falling(2.48, 0.56), language_model_validation, counter)
    history = History.load(log)
    assert len(history) == EVALUATIONS and history.meta["epoch_unit"] == "step"
    assert history.rows[0]["epoch"] == 250  # the evaluation's step, the training rows before it averaged
    result = diagnose(history)
    assert result.state == "overfitting"
    assert 2750 <= (result.overfit_epoch or 0) <= 4250  # the minimum is at step 3250
    assert result.message.startswith(f"overfitting since step {result.overfit_epoch}")
    assert "records no setting" in result.message


def test_a_loss_only_log_that_settles_is_a_good_fit(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.csv", falling(2.48, 0.6, 4.0), falling(2.6, 0.7, 4.0))
    result = diagnose(History.load(log))
    assert result.state == "good fit", result.message
    assert "best step" in result.message and "already off" not in result.message


def test_a_loss_only_log_that_stays_high_is_underfitting(tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.csv", falling(2.48, 2.3, 4.0), falling(2.5, 2.35, 4.0))
    result = diagnose(History.load(log))
    assert result.state == "underfitting", result.message
    assert "records no setting" in result.message and "already off" not in result.message
    # a loss-only log's reference is its first evaluation, not an untrained model's (ln V)
    assert "of its first evaluation's (train" in result.message


def _overfitting_rows() -> list[dict[str, float]]:
    return [{"epoch": float(e), "train_loss": 2.0 * math.exp(-e / 4), "val_loss": 1.0 + 0.02 * (e - 8) ** 2}
            for e in range(1, 17)]  # fmt: skip


def test_a_lightning_log_directory_prefers_regdials_own_history(tmp_path: Path) -> None:
    """metrics.csv beside the callback's regdial_history.json: the one that records the setting wins."""
    from regdial.cli import main

    directory = tmp_path / "lightning_logs" / "version_0"
    directory.mkdir(parents=True)
    rows = _overfitting_rows()
    with (directory / "metrics.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "step", "train_loss", "val_loss"])
        for row in rows:
            writer.writerow(
                [int(row["epoch"]) - 1, int(row["epoch"]) * 10, row["train_loss"], row["val_loss"]]
            )
    History(None, rows, setting={"weight_decay": 0.05}).save(tmp_path / "scratch")
    (tmp_path / "scratch" / "history.json").rename(directory / "regdial_history.json")
    history = History.load(directory)
    assert history.meta["setting"] == {"weight_decay": 0.05}
    result = diagnose(history)
    assert result.setting_known and result.moves["weight_decay"] > 0.05  # turned up from 0.05, not from off
    main(["diagnose", str(directory)])  # returns on success


def test_a_trainer_output_directory_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Hugging Face output directory: regdial_history.json if the callback wrote it, else the
    newest checkpoint-N/trainer_state.json."""
    from regdial.cli import main

    log = [entry for row in _overfitting_rows() for entry in (
        {"epoch": row["epoch"], "loss": row["train_loss"]}, {"epoch": row["epoch"], "eval_loss": row["val_loss"]})]  # fmt: skip
    for step in (8, 16):
        (tmp_path / f"checkpoint-{step}").mkdir()
        state = {"log_history": log[: 2 * step]}
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(state))
    history = History.load(tmp_path)
    assert history.meta["source"] == "huggingface" and len(history) == 16  # the newest checkpoint's
    main(["diagnose", str(tmp_path)])
    assert capsys.readouterr().out.startswith("overfitting")
    History(None, _overfitting_rows(), setting={"dropout": 0.2}).save(tmp_path / "scratch")
    (tmp_path / "scratch" / "history.json").rename(tmp_path / "regdial_history.json")
    assert History.load(tmp_path).meta["setting"] == {"dropout": 0.2}


def test_a_tensorboard_log_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Event files written by torch's SummaryWriter under Hugging Face's tag names, read by
    TensorBoard's own reader: the language model's overfitting, by step."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    from regdial.cli import main

    writer = SummaryWriter(str(tmp_path / "runs"))
    train = falling(2.48, 0.56)
    for i in range(1, EVALUATIONS + 1):
        for k in range(5):
            writer.add_scalar("train/loss", train(i), i * 250 - 200 + k * 50)
        writer.add_scalar("eval/loss", language_model_validation(i), i * 250)
    writer.close()
    history = History.load(tmp_path / "runs")
    assert history.meta["source"] == "tensorboard" and len(history) == EVALUATIONS
    assert diagnose(history).state == "overfitting"
    main(["diagnose", str(tmp_path / "runs")])
    assert capsys.readouterr().out.startswith("overfitting since step")


def test_a_lightning_metrics_csv_says_how_its_epochs_are_counted(tmp_path: Path) -> None:
    """Lightning counts epochs from 0, regdial from 1: the diagnosis of its metrics.csv
    says so, so 'overfitting since epoch 11' is not read as the file's epoch 11."""
    rows = _overfitting_rows()
    path = tmp_path / "metrics.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "step", "train_loss", "val_loss"])
        for row in rows:
            writer.writerow(
                [int(row["epoch"]) - 1, int(row["epoch"]) * 10, row["train_loss"], row["val_loss"]]
            )
    history = History.load(path)
    assert [int(e) for e in history.column("epoch")] == [int(r["epoch"]) for r in rows]
    message = diagnose(history).message
    assert message.startswith("overfitting since epoch ")
    assert message.endswith(" (epochs counted from 1: the log's epoch 0 is epoch 1 here)")


def _trainer_state(tmp_path: Path, entries: list[dict[str, float]]) -> Path:
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps({"log_history": entries}))  # NaN as JSON's NaN, as the Trainer writes it
    return path


def test_a_trainer_log_whose_training_loss_went_nan_is_diverged(tmp_path: Path) -> None:
    # logging_nan_inf_filter=False: the Trainer logs the NaN itself. Its evaluations were
    # dropped, and the healthy epochs before them read as a good fit.
    entries = []
    for row in _overfitting_rows()[:12]:
        nan = row["epoch"] >= 7
        entries += [{"epoch": row["epoch"], "loss": math.nan if nan else row["train_loss"]},
                    {"epoch": row["epoch"], "eval_loss": math.nan if nan else row["val_loss"]}]  # fmt: skip
    history = History.load(_trainer_state(tmp_path, entries))
    assert len(history) == 12
    reading = diagnose(history)
    assert reading.state == "diverged" and "epoch 7" in reading.message


def test_a_trainer_log_that_logs_its_training_loss_rarely_keeps_every_evaluation(tmp_path: Path) -> None:
    # logging_steps past several evaluations (the Trainer's 500 on a small run): the
    # evaluations before the first training loss were dropped and the epochs shifted by 5.
    rows = _overfitting_rows()
    entries = []
    for row in rows:
        entries.append({"epoch": row["epoch"], "eval_loss": row["val_loss"]})
        if row["epoch"] % 6 == 0:
            entries.append({"epoch": row["epoch"], "loss": row["train_loss"]})
    history = History.load(_trainer_state(tmp_path, entries))
    assert [r["epoch"] for r in history.rows] == [r["epoch"] for r in rows]
    assert history.rows[0]["train_loss"] == rows[5]["train_loss"]  # the first logged mean covers them
    assert diagnose(history).overfit_epoch == diagnose(History(None, rows)).overfit_epoch == 8


def test_an_epoch_log_that_validates_every_other_epoch_is_read_by_its_evaluations(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    rows = _overfitting_rows()
    path.write_text("epoch,train_loss,val_loss\n" + "".join(
        f"{int(r['epoch'])},{r['train_loss']},{r['val_loss'] if r['epoch'] % 2 == 0 else ''}\n" for r in rows))  # fmt: skip
    history = History.load(path)
    assert [r["epoch"] for r in history.rows] == [float(e) for e in range(2, 17, 2)]
    assert history.meta["epoch_unit"] == "epoch" and diagnose(history).overfit_epoch == 8


@pytest.mark.parametrize("epoch", ["one", None])
def test_a_trainer_log_with_an_epoch_that_is_no_number_is_one_line(
    tmp_path: Path, epoch: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    from regdial.cli import main

    path = tmp_path / "trainer_state.json"
    path.write_text(
        json.dumps({"log_history": [{"loss": 1.0, "epoch": 1}, {"eval_loss": 1.0, "epoch": epoch}]})
    )
    with pytest.raises(SystemExit) as exit_:
        main(["diagnose", str(path)])
    err = capsys.readouterr().err
    assert (
        exit_.value.code == 2
        and "log_history epochs are numbers" in err
        and len(err.strip().splitlines()) == 1
    )


def _csv(path: Path, header: str, rows: list[dict[str, float]], order: list[int] | None = None) -> Path:
    keys = [k.strip() for k in header.split(",")]
    source = {"epoch": "epoch", "step": "epoch", "loss": "train_loss", "train_loss": "train_loss",
              "val_loss": "val_loss", "eval_loss": "val_loss"}  # fmt: skip
    picked = [rows[i] for i in order] if order is not None else rows
    lines = [
        ",".join(str(int(r["epoch"]) * 50 if k == "step" else r[source[k]]) for k in keys) for r in picked
    ]
    path.write_text(header + "\n" + "\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("header", "order", "said"),
    [
        ("epoch,step,train_loss,val_loss", None, ""),  # epochs from 1 with a step column: not Lightning's 0
        ("epoch,loss,val_loss", None, ""),  # Keras's CSVLogger names
        (" epoch, train_loss, val_loss", None, ""),  # spaces after the commas
        ("epoch,step,loss,eval_loss", None, ""),
        ("epoch,train_loss,val_loss", list(range(15, -1, -1)), "newest first"),
        ("epoch,train_loss,val_loss", list(range(16)) * 2, "goes back in its epoch column"),  # appended twice
        ("epoch,train_loss,val_loss", [*range(10), *range(6, 16)], "goes back"),  # a resumed run's rows win
    ],
)
def test_another_loops_csv_is_read_in_its_epochs_order_under_its_own_names(
    header: str, order: list[int] | None, said: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each read as another run: a step column made epochs shift by one (and said the log's
    epoch 0 was 1), Keras's `loss` was refused, rows newest first or appended after a restart
    read as underfitting "65 times its first epoch's loss"."""
    rows = _overfitting_rows()
    with caplog.at_level("WARNING", logger="regdial"):
        history = History.load(_csv(tmp_path / "log.csv", header, rows, order))
    assert [r["epoch"] for r in history.rows] == [float(e) for e in range(1, 17)]
    assert [r["val_loss"] for r in history.rows] == pytest.approx([r["val_loss"] for r in rows])
    reading = diagnose(history)
    assert reading.state == "overfitting" and reading.overfit_epoch == 8
    assert "epoch 0" not in reading.message
    assert (said in caplog.text) if said else "regdial" not in caplog.text


def test_a_lightning_log_of_several_val_dataloaders_reads_the_first(tmp_path: Path, caplog) -> None:
    """metrics.csv names each dataloader's loss val_loss/dataloader_idx_N and has no val_loss."""
    path = tmp_path / "metrics.csv"
    rows = ["epoch,step,train_loss,val_loss/dataloader_idx_0,val_loss/dataloader_idx_1"]
    for epoch, (t, v, w) in enumerate(
        [(1.0, 0.9, 0.95), (0.8, 0.7, 0.8), (0.6, 0.65, 0.7), (0.5, 0.6, 0.66)]
    ):
        rows += [f"{epoch},{5 + 6 * epoch},{t},,", f"{epoch},{5 + 6 * epoch},,{v},{w}"]
    path.write_text("\n".join(rows) + "\n")
    with caplog.at_level("WARNING", logger="regdial"):
        history = History.load(path)
    assert history.column("val_loss") == [0.9, 0.7, 0.65, 0.6]
    assert "logs several val dataloaders: the first's (val_loss/dataloader_idx_0) is read" in caplog.text
    assert diagnose(history).state != "diverged"
