"""``online=Space(...)``: one run inside the real Hugging Face and Lightning Trainers turns its own knobs."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from regdial import Regularization, Space
from regdial.dial.hypergradient import HypergradientController

transformers = pytest.importorskip("transformers")
lightning = pytest.importorskip("lightning")

from tests.test_integrations import Classifier, TokenTask, blobs, hf_trainer, lightning_fit, tiny_bert  # noqa: E402

from regdial.integrations import huggingface as hf  # noqa: E402
from regdial.integrations import lightning as pl_integration  # noqa: E402
from regdial.integrations._online import smoothed  # noqa: E402


def test_the_hypergradients_smoothed_loss_is_transformers_label_smoother() -> None:
    """On a tiny GPT-2 (labels shifted) and a BERT classifier (not shifted), ignored labels included."""
    from transformers.trainer_pt_utils import LabelSmoother

    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1,
                                                               n_head=2)).eval()  # fmt: skip
    ids = torch.randint(0, 50, (3, 12))
    labels = ids.clone()
    labels[0, :4] = -100
    out = gpt(input_ids=ids, labels=labels)
    expected = LabelSmoother(epsilon=0.2)(out, labels, shift_labels=True)
    assert float(smoothed(out.loss, out.logits, labels, torch.tensor(0.2), True).detach()) == pytest.approx(
        float(expected), rel=1e-5
    )
    bert = tiny_bert().eval()
    y = torch.tensor([0, 1, 1])
    out = bert(input_ids=ids, labels=y)
    expected = LabelSmoother(epsilon=0.2)(out, y)
    assert float(smoothed(out.loss, out.logits, y, torch.tensor(0.2), False).detach()) == pytest.approx(
        float(expected), rel=1e-5
    )


def test_online_turns_the_knobs_inside_a_hugging_face_trainer(tmp_path: Path, caplog) -> None:
    space = Space({"weight_decay": (1e-4, 1.0), "label_smoothing": (0.0, 0.3)})
    controller = HypergradientController(space, every=2)
    callback = hf.HuggingFaceCallback(online=controller)
    trainer = hf_trainer(tiny_bert(), callback, tmp_path / "out", epochs=3)
    with caplog.at_level(logging.WARNING, logger="regdial.integrations"):
        trainer.train()
    assert "held-out batches from the Trainer's evaluation data" in caplog.text
    assert controller.updates >= 8
    assert {m["knob"] for m in controller.moves} == {"weight_decay", "label_smoothing"}
    applied_decay = [g["weight_decay"] for g in trainer.optimizer.param_groups if g["regularize"]]
    assert applied_decay == [pytest.approx(controller.values["weight_decay"])] * len(applied_decay)
    in_force = callback.session.applied.setting  # what the training forward smooths with
    assert in_force.label_smoothing == pytest.approx(controller.values["label_smoothing"])
    meta = callback.history.meta["online"]
    assert meta["hypergradient_steps"] == controller.updates and meta["moves"] == controller.moves
    assert 0 < meta["cost"] < 10
    report = tmp_path / "out" / "regdial_report.html"
    assert (
        "Knobs over training" in report.read_text()
        and (tmp_path / "out" / "regdial_report" / "knobs.png").is_file()
    )
    # the strengths moved away from where they started (the middle of each range, on its log scale)
    assert controller.values["weight_decay"] != pytest.approx(0.01, rel=1e-3)


def test_a_moves_epoch_counts_the_trainers_evaluations_as_the_history_does(tmp_path: Path) -> None:
    """Evaluating every 4 of 8 steps an epoch: the history's rows are evaluations, and so is
    every move's epoch, the hypergradient's and the curves' alike."""
    from tests.test_integrations import accuracy

    space = Space({"weight_decay": (1e-4, 1.0), "dropout": (0.0, 0.5)})
    controller = HypergradientController(space, every=2, warmup=0, epochs_every=1)
    callback = hf.HuggingFaceCallback(online=controller)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=32,
                                          learning_rate=2e-3, eval_strategy="steps", eval_steps=4, save_strategy="no",
                                          logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)  # fmt: skip
    transformers.Trainer(model=tiny_bert(), args=args, train_dataset=TokenTask(0, 256), eval_dataset=TokenTask(1, 128),
                         compute_metrics=accuracy, callbacks=[callback]).train()  # fmt: skip
    assert len(callback.history) == 4  # steps 4, 8, 12, 16
    hyper = [m for m in controller.moves if m["knob"] == "weight_decay"]
    assert hyper and all(m["epoch"] == 1 + (m["step"] - 1) // 4 for m in hyper)
    assert max(m["epoch"] for m in hyper) == 4  # the trainer's own epoch never passes 2
    assert all(1 <= m["epoch"] <= len(callback.history) + 1 for m in controller.moves)


def test_online_on_a_causal_lm_inside_the_trainer_smooths_shifted_labels(tmp_path: Path, monkeypatch) -> None:
    class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __init__(self, seed: int, n: int) -> None:
            g = torch.Generator().manual_seed(seed)
            start = torch.randint(0, 40, (n, 1), generator=g)
            self.ids = (start + torch.arange(12)) % 40  # counting: a next token the model can learn

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1,
                                                                 n_head=2))  # fmt: skip
    controller = HypergradientController(Space({"label_smoothing": (0.0, 0.3), "l2": (1e-5, 1e-1)}), every=2)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=4, per_device_train_batch_size=16,
                                          learning_rate=3e-3, eval_strategy="epoch", save_strategy="no",
                                          logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)  # fmt: skip
    callback = hf.HuggingFaceCallback(online=controller)
    scored = _record_the_validation_objective(monkeypatch)
    transformers.Trainer(model=model, args=args, train_dataset=Tokens(0, 128), eval_dataset=Tokens(1, 64),
                         callbacks=[callback]).train()  # fmt: skip
    assert {m["knob"] for m in controller.moves} == {"label_smoothing", "l2"}
    assert callback._shift is True
    # A language model logs no accuracy: the curves' judge reads its loss, not the
    # evaluation's clock, which the Trainer logs first (eval_runtime was read as the metric).
    assert "val_runtime" in callback.history.columns and callback.history.metric == "loss"
    # The validation objective is fit's, the calibrated cross-entropy (not the plain loss,
    # whose hypergradient walks smoothing and decay to their floors), on the next tokens:
    # the logits of positions 0-10 against the tokens at 1-11.
    assert len(scored) == controller.updates > 0
    for logits, targets in scored:
        assert logits.shape == (*targets.shape, 40) and targets.shape[1] == 11


def _record_the_validation_objective(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every call of the hypergradient's calibrated cross-entropy: its (logits, targets)."""
    from regdial.dial import implicit

    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = implicit.calibrated_cross_entropy

    def calibrated(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append((logits.detach(), targets))
        return original(logits, targets)

    monkeypatch.setattr(implicit, "calibrated_cross_entropy", calibrated)
    return calls


def test_a_space_takes_a_hypergradient_step_every_15_steps_as_the_readme_says() -> None:
    from regdial.integrations._online import Online

    assert Online(Space({"weight_decay": (1e-4, 1.0)}), None).controller.every == 15
    assert (
        Online(Space({"noise": (0.0, 0.5)}), None).controller.every == 24
    )  # antithetic pairs: twice the batch


def test_online_in_a_trainer_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    space = Space({"weight_decay": (1e-4, 1.0)})
    with pytest.raises(ValueError, match=r"^setting must be None when online= is given"):
        hf.HuggingFaceCallback(Regularization(dropout=0.1), online=space)
    with pytest.raises(ValueError, match=r"^online_data must be None without online="):
        hf.HuggingFaceCallback(Regularization(), online_data=[1])
    callback = hf.HuggingFaceCallback(online=space)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, eval_strategy="no",
                                          save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)  # fmt: skip
    trainer = transformers.Trainer(
        model=tiny_bert(), args=args, train_dataset=TokenTask(0, 64), callbacks=[callback]
    )
    with pytest.raises(
        ValueError,
        match=r"^online_data must be held-out batches for the hypergradient: a Trainer that evaluates",
    ):
        trainer.train()
    noise = hf.HuggingFaceCallback(
        online=HypergradientController(Space({"noise": (0.0, 0.5)}), every=1, warmup=0)
    )
    with pytest.raises(
        ValueError,
        match=r"^online\.noise must be a knob of a model whose inputs are floats, not input_ids .*: leave "
        r"noise out of the Space, or use embedding_noise, got noise in the Space$",
    ):
        hf_trainer(tiny_bert(), noise, tmp_path / "noise", epochs=1).train()


def test_online_data_replaces_the_trainers_evaluation_data(tmp_path: Path, caplog) -> None:
    held_out = torch.utils.data.DataLoader(TokenTask(5, 64), batch_size=32)
    controller = HypergradientController(Space({"weight_decay": (1e-4, 1.0)}), every=1, warmup=0)
    callback = hf.HuggingFaceCallback(online=controller, online_data=held_out)
    with caplog.at_level(logging.WARNING, logger="regdial.integrations"):
        hf_trainer(tiny_bert(), callback, tmp_path, epochs=1).train()
    assert "held-out batches from online_data" in caplog.text
    assert (
        controller.updates == 8 and controller.val_index == 2
    )  # 8 steps over the 2 held-out batches, in order


# -- Lightning -------------------------------------------------------------------------------


def test_online_turns_the_knobs_inside_a_lightning_trainer(tmp_path: Path, monkeypatch) -> None:
    space = Space({"weight_decay": (1e-4, 1.0), "label_smoothing": (0.0, 0.3), "dropout": (0.0, 0.5)})
    controller = HypergradientController(space, every=1, epochs_every=1)
    callback = pl_integration.LightningCallback(online=controller, num_classes=3)
    module = Classifier()
    scored = _record_the_validation_objective(monkeypatch)
    trainer = lightning_fit(module, callback, tmp_path, epochs=8)
    assert controller.updates >= 20
    assert len(scored) == controller.updates  # fit's calibrated objective, not the plain loss
    assert {"weight_decay", "label_smoothing"} <= {m["knob"] for m in controller.moves}
    decay = [g["weight_decay"] for g in trainer.optimizers[0].param_groups if g["regularize"]]
    assert decay == [pytest.approx(controller.values["weight_decay"])] * len(decay)
    assert module.regdial.setting.label_smoothing == pytest.approx(controller.values["label_smoothing"])
    assert module.net[2].p == module.regdial.setting.dropout  # the curve controller's knob, applied
    assert callback.history.meta["online"]["moves"] == controller.moves
    state = callback.state_dict()["online"]
    assert state["updates"] == controller.updates and len(state["q"]) == len(list(module.parameters()))


def test_lightning_online_needs_held_out_data(tmp_path: Path) -> None:
    class NoValidation(Classifier):
        validation_step = lightning.pytorch.LightningModule.validation_step

    callback = pl_integration.LightningCallback(online=Space({"weight_decay": (1e-4, 1.0)}), num_classes=3)
    trainer = lightning.pytorch.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=str(tmp_path), logger=False,
                                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[callback],
                                        enable_model_summary=False)  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"^online_data must be held-out batches for the hypergradient: a Trainer that validates",
    ):
        trainer.fit(NoValidation(), blobs(0, 64))


def test_lightning_online_refuses_label_smoothing_through_a_loss_of_its_own(tmp_path: Path) -> None:
    controller = HypergradientController(Space({"label_smoothing": (0.0, 0.3)}), every=1, warmup=0)
    callback = pl_integration.LightningCallback(online=controller, num_classes=3,
                                                loss_fn=lambda output, batch: torch.nn.functional.cross_entropy(output, batch[1]))  # fmt: skip
    with pytest.raises(ValueError, match=r"^online\.label_smoothing must be a knob of a classifier"):
        lightning_fit(Classifier(), callback, tmp_path, epochs=1)


def test_online_on_a_seq2seq_model_scores_its_decoders_logits_against_its_labels(
    tmp_path: Path, monkeypatch
) -> None:
    """A T5 builds its decoder inputs from the labels: the calibrated objective's logits
    are taken with them, unshifted, one per label."""

    class Reverse(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __init__(self, seed: int, n: int) -> None:
            self.x = torch.randint(1, 40, (n, 8), generator=torch.Generator().manual_seed(seed))

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.x[i], "labels": self.x[i].flip(0)}

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   decoder_start_token_id=0, pad_token_id=0)  # fmt: skip
    controller = HypergradientController(Space({"weight_decay": (1e-4, 1.0)}), every=2, warmup=0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=16,
                                          learning_rate=3e-3, eval_strategy="epoch", save_strategy="no",
                                          logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)  # fmt: skip
    callback = hf.HuggingFaceCallback(online=controller)
    scored = _record_the_validation_objective(monkeypatch)
    transformers.Trainer(model=transformers.T5ForConditionalGeneration(config), args=args,
                         train_dataset=Reverse(0, 64), eval_dataset=Reverse(1, 32), callbacks=[callback]).train()  # fmt: skip
    assert callback._shift is False and len(scored) == controller.updates > 0
    assert all(logits.shape == (*targets.shape, 40) and targets.shape[1] == 8 for logits, targets in scored)


def test_an_evaluation_after_training_is_not_one_of_the_runs(tmp_path: Path) -> None:
    """trainer.evaluate() after train() (and Lightning's validate() after fit()) adds no
    row to the finished run's history and turns no knob."""
    controller = HypergradientController(Space({"weight_decay": (1e-4, 1.0), "dropout": (0.0, 0.5)}), every=2)
    callback = hf.HuggingFaceCallback(online=controller)
    trainer = hf_trainer(tiny_bert(), callback, tmp_path / "hf", epochs=2)
    trainer.train()
    rows, moves = len(callback.history), list(controller.moves)
    trainer.evaluate()
    assert len(callback.history) == rows == 2 and controller.moves == moves
    assert all(math.isfinite(row["train_loss"]) for row in callback.history)
    lit = pl_integration.LightningCallback(Regularization(weight_decay=0.01), num_classes=3)
    fitted = lightning_fit(Classifier(), lit, tmp_path / "pl", epochs=2)
    rows = len(lit.history)
    fitted.validate(fitted.lightning_module, blobs(1, 64), verbose=False)
    assert len(lit.history) == rows == 2


def test_a_knob_both_the_space_and_the_trainer_set_is_named_as_the_spaces(tmp_path: Path) -> None:
    """With ``online=``, the refusal names the Space's knob, not a setting the user never
    gave (the controller's start): Hugging Face's ``label_smoothing_factor``, and a
    Lightning ``training_step`` that computes its own loss."""
    space = Space({"weight_decay": (1e-4, 1.0), "label_smoothing": (0.0, 0.3)})
    with pytest.raises(
        ValueError,
        match=r"^online\.label_smoothing must be a knob the Trainer does not also set \(one place decides\): "
        r"leave label_smoothing out of the Space, or TrainingArguments\.label_smoothing_factor unset, "
        r"got label_smoothing in the Space and label_smoothing_factor=0\.1$",
    ):
        hf_trainer(
            tiny_bert(), hf.HuggingFaceCallback(online=space), tmp_path / "hf", label_smoothing_factor=0.1
        )
    with pytest.raises(
        ValueError,
        match=r"^regularization\.label_smoothing must be 0 when TrainingArguments\.label_smoothing_factor is set",
    ):
        hf_trainer(tiny_bert(), hf.HuggingFaceCallback(Regularization(label_smoothing=0.1)), tmp_path / "plain",
                   label_smoothing_factor=0.1)  # fmt: skip
    controller = HypergradientController(space, every=1, warmup=0)
    with pytest.raises(
        ValueError,
        match=r"^online\.label_smoothing must be a knob the training_step applies: use self\.regdial\.batch\(x, y\) "
        r"and self\.regdial\.loss\(logits, y\) there, or leave label_smoothing out of the Space .*got label_smoothing "
        r"in the Space$",
    ):
        lightning_fit(Classifier(use_regdial=False), pl_integration.LightningCallback(online=controller, num_classes=3),
                      tmp_path / "pl", epochs=1)  # fmt: skip


def test_a_resumed_lightning_run_regroups_with_the_strengths_it_saved(tmp_path: Path, caplog) -> None:
    """Resumed from a checkpoint, the optimizer is regrouped with the controller's restored
    strengths, and the warning says those, not the fresh start's."""
    checkpoints = tmp_path / "checkpoints"

    def fit(epochs: int, resume: str | None = None) -> tuple[Any, pl_integration.LightningCallback]:
        controller = HypergradientController(Space({"weight_decay": (1e-4, 1.0)}), every=2, warmup=0)
        callback = pl_integration.LightningCallback(online=controller, num_classes=3)
        saver = lightning.pytorch.callbacks.ModelCheckpoint(
            dirpath=str(checkpoints), every_n_epochs=1, save_top_k=-1
        )
        trainer = lightning.pytorch.Trainer(max_epochs=epochs, accelerator="cpu", default_root_dir=str(tmp_path),
                                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                                            num_sanity_val_steps=0, callbacks=[callback, saver])  # fmt: skip
        trainer.fit(Classifier(), blobs(0, 192), blobs(1, 96), ckpt_path=resume)
        return trainer, callback

    _, first = fit(2)
    saved = first.online.controller.values["weight_decay"]
    assert saved != 0.05  # it moved from the recipe's start
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fit(3, str(sorted(checkpoints.glob("*.ckpt"))[-1]))
    said = [r.getMessage() for r in caplog.records if "replaces the optimizer's own" in r.getMessage()]
    assert said and f"weight_decay={saved:g}" in said[0] and "weight_decay=0.05 " not in said[0]


def test_a_trainers_evaluation_clock_is_not_a_histories_metric() -> None:
    from regdial.training.history import History

    row = {
        "epoch": 1.0,
        "train_loss": 2.0,
        "val_loss": 2.1,
        "val_runtime": 0.4,
        "val_samples_per_second": 160.0,
    }
    assert History(None, [row]).metric == "loss"
    assert History(None, [{**row, "val_accuracy_se": 0.01, "val_accuracy": 0.5}]).metric == "accuracy"


def test_a_spaces_knob_that_starts_at_0_is_checked_before_training(tmp_path: Path) -> None:
    """Mixup starts at 0 under the controller: checked only at its start value, it was
    recorded and plotted turning while the Lightning module (its own loss) never mixed, and
    a BERT (token ids) crashed at the first turn, ten evaluations in."""
    space = Space({"weight_decay": (1e-4, 1e-3), "mixup": (0.0, 0.4)})
    with pytest.raises(ValueError, match=r"^online\.mixup must be a knob the training_step applies: .*got mixup in "
                       r"the Space$"):  # fmt: skip
        lightning_fit(Classifier(use_regdial=False), pl_integration.LightningCallback(online=space, num_classes=3),
                      tmp_path / "pl", epochs=1)  # fmt: skip
    callback = hf.HuggingFaceCallback(online=space, num_classes=2)
    trainer = hf_trainer(tiny_bert(), callback, tmp_path / "hf", epochs=1)
    with pytest.raises(ValueError, match=r"^online\.mixup must be a knob of a model whose inputs are floats, not "
                       r"input_ids .*got mixup in the Space$"):  # fmt: skip
        trainer.train()
    assert trainer.state.global_step == 0  # at the first batch's forward, before any step


def test_a_curves_knob_in_a_run_that_never_evaluates_is_one_line(tmp_path: Path) -> None:
    """online_data serves the hypergradient: dropout stayed at its start all run, unsaid."""
    held_out = torch.utils.data.DataLoader(TokenTask(5, 64), batch_size=32)
    callback = hf.HuggingFaceCallback(online=Space({"weight_decay": (1e-4, 1.0), "dropout": (0.0, 0.3)}),
                                      online_data=held_out)  # fmt: skip
    trainer = hf_trainer(tiny_bert(), callback, tmp_path, epochs=1)
    trainer.args.eval_strategy = transformers.IntervalStrategy.NO
    with pytest.raises(ValueError, match=r"^online\.dropout must be a knob of a Trainer that evaluates .*: the curves "
                       r"turn it at each evaluation, and online_data serves only the hypergradient's knobs "
                       r"\(weight_decay\), got dropout in the Space$"):  # fmt: skip
        trainer.train()


def test_an_eval_dataset_dict_records_its_first_dataset(tmp_path: Path, caplog) -> None:
    """The Trainer evaluates each dataset of the dict in turn (eval_a_loss, eval_b_loss): a
    row each, with NaN losses, read as 'diverged at epoch 0'."""
    from regdial.diagnosis import diagnose

    callback = hf.HuggingFaceCallback(Regularization(weight_decay=0.01))
    trainer = hf_trainer(tiny_bert(), callback, tmp_path, epochs=2)
    trainer.eval_dataset = {"a": TokenTask(1, 64), "b": TokenTask(2, 64)}
    with caplog.at_level(logging.WARNING, logger="regdial.integrations"):
        trainer.train()
    assert "eval_dataset holds several datasets: the record, early stopping and the online controller read the " \
           "first, 'a' (eval_a_loss)" in caplog.text  # fmt: skip
    history = callback.history
    assert len(history) == 2 and all(math.isfinite(row["val_loss"]) for row in history.rows)
    assert diagnose(history).state != "diverged"


def test_dropout_in_the_space_of_a_model_without_dropout_is_named_as_the_spaces(tmp_path: Path) -> None:
    """It was refused as regularization.dropout, got 0.1: a rate the user never set (the
    Space's start)."""

    class NoDropout(Classifier):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))

    space = Space({"weight_decay": (1e-4, 1.0), "dropout": (0.0, 0.5)})
    with pytest.raises(ValueError, match=r"^online\.dropout must be a knob of a model with dropout .*: leave dropout "
                       r"out of the Space, got dropout in the Space$"):  # fmt: skip
        lightning_fit(
            NoDropout(), pl_integration.LightningCallback(online=space, num_classes=3), tmp_path, epochs=1
        )


def test_a_lightning_run_with_several_val_dataloaders_records_the_first(tmp_path: Path) -> None:
    """Each dataloader's metrics come as val_loss/dataloader_idx_N, and no val_loss: every
    row's val_loss was NaN, read as 'diverged at epoch 1'."""
    from regdial.diagnosis import diagnose

    class Two(Classifier):
        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

    callback = pl_integration.LightningCallback(Regularization(weight_decay=0.01), num_classes=3)
    trainer = lightning.pytorch.Trainer(max_epochs=3, accelerator="cpu", default_root_dir=str(tmp_path), logger=False,
                                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[callback],
                                        enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    from tests.test_integrations import blobs as data

    trainer.fit(Two(), data(0, 192), [data(1, 96), data(2, 96)])
    rows = callback.history.rows
    assert len(rows) == 3 and all(r["val_loss"] == r["val_loss_dataloader_idx_0"] for r in rows)
    assert all(math.isfinite(r["val_loss"]) for r in rows) and diagnose(callback.history).state != "diverged"
