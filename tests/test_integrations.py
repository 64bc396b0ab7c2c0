"""HuggingFaceCallback and LightningCallback inside the real Hugging Face Trainer and Lightning Trainer, on tiny models."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from optuna import TrialPruned
from torch import nn

from regdial import Regularization, Space, Trial

transformers = pytest.importorskip("transformers")
lightning = pytest.importorskip("lightning")

from regdial.integrations import huggingface as hf  # noqa: E402
from regdial.integrations import lightning as pl_integration  # noqa: E402

# -- Hugging Face ---------------------------------------------------------------------------


class TokenTask(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Which pair of marker tokens occurs more often: a task for a tiny BERT."""

    def __init__(self, seed: int, n: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, 60, (n, 16), generator=generator)
        first = (self.ids == 7).sum(1) + (self.ids == 8).sum(1)
        second = (self.ids == 9).sum(1) + (self.ids == 10).sum(1)
        self.ids[:, 0] = 2
        self.labels = (first > second).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_bert() -> Any:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=2)  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def accuracy(prediction: Any) -> dict[str, float]:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def hf_trainer(model: Any, callback: hf.HuggingFaceCallback, out: Path, epochs: int = 3, **args: Any) -> Any:
    arguments = transformers.TrainingArguments(
        output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=32, learning_rate=2e-3,
        eval_strategy="epoch", save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0, **args,
    )  # fmt: skip
    return transformers.Trainer(model=model, args=arguments, train_dataset=TokenTask(0, 256),
                                eval_dataset=TokenTask(1, 128), compute_metrics=accuracy, callbacks=[callback])  # fmt: skip


def test_every_knob_reaches_the_hugging_face_trainer(tmp_path: Path) -> None:
    setting = Regularization(dropout=0.2, weight_decay=0.01, l1=1e-5, label_smoothing=0.1, embedding_noise=5.0,
                             early_stopping=3, ema=0.9)  # fmt: skip
    model = tiny_bert()
    callback = hf.HuggingFaceCallback(setting)
    trainer = hf_trainer(model, callback, tmp_path / "out")
    assert model.config.hidden_dropout_prob == 0.2 and model.config.attention_probs_dropout_prob == 0.2
    trainer.train()
    groups = trainer.optimizer.param_groups
    weights = [g for g in groups if g["regularize"]]
    spared = [g for g in groups if not g["regularize"]]
    assert all(g["weight_decay"] == 0.01 for g in weights) and all(g["weight_decay"] == 0.0 for g in spared)
    named = {id(p): n for n, p in model.named_parameters()}
    spared_names = [named[id(p)] for g in spared for p in g["params"]]
    assert any(n.endswith("bias") for n in spared_names) and any("LayerNorm" in n for n in spared_names)
    assert any("word_embeddings" in n for n in spared_names)
    assert all(m.p == 0.2 for m in model.modules() if isinstance(m, nn.Dropout))
    applied = callback.session.applied
    assert applied is not None and applied.ema is not None and applied.embedding_noise is not None
    assert [type(p).__name__ for p in applied.penalties] == ["L1"]
    # label smoothing on the training loss: the hook's loss is torch's smoothed cross-entropy
    model.train()
    batch = TokenTask(2, 8)
    inputs, labels = batch.ids[:8], batch.labels[:8]
    # the callback is done: its hooks are removed, so the model is plain again
    plain = model(input_ids=inputs, labels=labels).loss
    assert torch.isfinite(plain)
    assert len(callback.history) == 3 and "val_accuracy" in callback.history.columns
    record = json.loads((tmp_path / "out" / "regdial_history.json").read_text())
    assert len(record["rows"]) == 3 and "diagnosis" in record["meta"]
    assert (tmp_path / "out" / "regdial_report.html").is_file()
    assert (tmp_path / "out" / "regdial_report" / "learning_curves.png").is_file()


def test_label_smoothing_and_noise_are_on_the_training_forward_only(tmp_path: Path) -> None:
    model = tiny_bert()
    callback = hf.HuggingFaceCallback(Regularization(label_smoothing=0.2, embedding_noise=10.0))
    trainer = hf_trainer(model, callback, tmp_path / "out", epochs=1)
    callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=model,
                            optimizer=trainer.create_optimizer())  # fmt: skip
    data = TokenTask(3, 16)
    model.train()
    torch.manual_seed(0)
    smoothed = model(input_ids=data.ids, labels=data.labels)
    expected = F.cross_entropy(smoothed.logits.float(), data.labels, label_smoothing=0.2)
    assert float(smoothed.loss) == pytest.approx(float(expected), rel=1e-5)
    first, second = model(input_ids=data.ids).logits, model(input_ids=data.ids).logits
    assert not torch.equal(first, second)  # NEFTune noise: two training forwards differ
    model.eval()
    clean = model(input_ids=data.ids, labels=data.labels)
    assert float(clean.loss) == pytest.approx(float(F.cross_entropy(clean.logits, data.labels)), rel=1e-5)
    assert torch.equal(model(input_ids=data.ids).logits, clean.logits)  # eval: no noise


def test_early_stopping_restores_the_best_weights_and_the_model_reloads_with_its_dropout(
    tmp_path: Path,
) -> None:
    model = tiny_bert()
    callback = hf.HuggingFaceCallback(Regularization(early_stopping=1, dropout=0.3), monitor="eval_loss")
    trainer = hf_trainer(model, callback, tmp_path / "out", epochs=30)
    trainer.train()
    rows = callback.history.rows
    assert len(rows) < 30  # stopped early
    best = min(r["val_loss"] for r in rows)
    assert float(trainer.evaluate()["eval_loss"]) == pytest.approx(
        best, rel=1e-5
    )  # the best weights are back
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "saved"))
    assert reloaded.config.hidden_dropout_prob == 0.3
    assert all(m.p == 0.3 for m in reloaded.modules() if isinstance(m, nn.Dropout))


class AlwaysPrune:
    """An Optuna trial stand-in whose pruner stops every trial at its first report."""

    def report(self, value: float, step: int) -> None:
        self.reported = (value, step)

    def should_prune(self) -> bool:
        return True


def test_a_trial_prunes_a_trainer_run(tmp_path: Path) -> None:
    setting = Regularization(weight_decay=0.01)
    trial = Trial(setting, number=0, metric="val_accuracy", epochs=5, optuna_trial=AlwaysPrune())  # type: ignore[arg-type]
    trainer = hf_trainer(tiny_bert(), hf.HuggingFaceCallback(setting, trial), tmp_path / "out", epochs=5)
    with pytest.raises(TrialPruned):
        trainer.train()
    assert len(trial.history) == 1


def test_batch_knobs_are_refused_for_token_ids_and_conflicts_are_named(tmp_path: Path) -> None:
    trainer = hf_trainer(
        tiny_bert(), hf.HuggingFaceCallback(Regularization(mixup=0.2)), tmp_path / "a", epochs=1
    )
    with pytest.raises(
        ValueError, match=r"^regularization.mixup must be 0 for a model whose inputs are input_ids"
    ):
        trainer.train()
    with pytest.raises(ValueError, match=r"^regularization.label_smoothing must be 0 when TrainingArguments"):
        hf_trainer(tiny_bert(), hf.HuggingFaceCallback(Regularization(label_smoothing=0.1)), tmp_path / "b",
                   label_smoothing_factor=0.1)  # fmt: skip


def test_hp_space_gives_hugging_face_regdials_ranges() -> None:
    import optuna

    space = Space({"weight_decay": (1e-4, 1e-1), "label_smoothing": (0.0, 0.2)})
    with pytest.raises(ValueError, match=r"^tune.space.label_smoothing must be searched with the callback"):
        hf.hp_space(space)  # the Trainer reads label_smoothing_factor only when it is built
    suggest = hf.hp_space(space, hf.HuggingFaceCallback(Regularization()))
    trial = optuna.create_study().ask()
    values = suggest(trial)
    assert set(values) == {"weight_decay", "label_smoothing_factor"}
    assert 1e-4 <= values["weight_decay"] <= 1e-1 and 0.0 <= values["label_smoothing_factor"] <= 0.2
    with pytest.raises(
        ValueError, match=r"^tune.space.dropout must be a knob with a TrainingArguments field"
    ):
        hf.hp_space(Space({"dropout": (0.0, 0.5)}))
    # The callback's own strength of a searched knob replaced every trial's (the study
    # recorded decays that never trained), and a Space's base was never applied.
    with pytest.raises(ValueError, match=r"^regularization.weight_decay must be 0 when hp_space searches it "
                       r"\(it would replace each trial's TrainingArguments.weight_decay\), got 0.01$"):  # fmt: skip
        hf.hp_space(space, hf.HuggingFaceCallback(Regularization(weight_decay=0.01)))
    with pytest.raises(ValueError, match=r"^space.base must be unset for hp_space .*, got dropout=0.4$"):
        hf.hp_space(
            Space(space.knobs, base=Regularization(dropout=0.4)), hf.HuggingFaceCallback(Regularization())
        )


# -- Lightning -------------------------------------------------------------------------------


class Classifier(lightning.pytorch.LightningModule):
    def __init__(self, use_regdial: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Dropout(0.0), nn.Linear(64, 3))
        self.use_regdial = use_regdial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.net(x)
        return output

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.use_regdial and hasattr(self, "regdial"):
            x, y = self.regdial.batch(x, y)
            return self.regdial.loss(self(x), y)
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def blobs(seed: int, n: int) -> torch.utils.data.DataLoader[Any]:
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=generator)
    x = torch.randn(n, 8, generator=generator) + torch.eye(3, 8)[y] * 1.5
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


def lightning_fit(
    module: Classifier, callback: pl_integration.LightningCallback, out: Path, epochs: int = 4
) -> Any:
    trainer = lightning.pytorch.Trainer(max_epochs=epochs, accelerator="cpu", default_root_dir=str(out), logger=False,
                                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[callback],
                                        enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, blobs(0, 192), blobs(1, 96))
    return trainer


def test_every_knob_reaches_the_lightning_trainer(tmp_path: Path) -> None:
    setting = Regularization(
        dropout=0.2, weight_decay=0.05, l1=1e-5, label_smoothing=0.1, ema=0.9, early_stopping=10
    )
    module = Classifier()
    callback = pl_integration.LightningCallback(setting, num_classes=3)
    trainer = lightning_fit(module, callback, tmp_path)
    groups = trainer.optimizers[0].param_groups
    assert {g["regularize"]: g["weight_decay"] for g in groups} == {True: 0.05, False: 0.0}
    assert module.net[2].p == 0.2
    assert module.regdial.calls["loss"] > 0 and module.regdial.ema is not None
    assert len(callback.history) == 4 and "val_accuracy" in callback.history.columns
    assert (tmp_path / "regdial_history.json").is_file() and (tmp_path / "regdial_report.html").is_file()
    page = (tmp_path / "regdial_report.html").read_text()  # the scores of the last and the best validation
    assert "No scores" not in page and "this run (best epoch)" in page and "val loss" in page


def test_lightning_early_stopping_restores_the_best_weights(tmp_path: Path) -> None:
    module = Classifier()
    callback = pl_integration.LightningCallback(Regularization(early_stopping=1), num_classes=3)
    trainer = lightning_fit(module, callback, tmp_path, epochs=40)
    rows = callback.history.rows
    assert len(rows) < 40
    result = trainer.validate(module, blobs(1, 96), verbose=False)[0]
    assert result["val_loss"] == pytest.approx(min(r["val_loss"] for r in rows), rel=1e-5)


def test_a_module_that_ignores_label_smoothing_is_told(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    callback = pl_integration.LightningCallback(Regularization(label_smoothing=0.1), num_classes=3)
    with pytest.raises(
        ValueError, match=r"^regularization.label_smoothing must be 0, or a training_step that uses"
    ):
        lightning_fit(Classifier(use_regdial=False), callback, tmp_path)


def test_a_trial_prunes_a_lightning_run(tmp_path: Path) -> None:
    setting = Regularization()
    trial = Trial(setting, number=0, metric="val_accuracy", epochs=4, optuna_trial=AlwaysPrune())  # type: ignore[arg-type]
    with pytest.raises(TrialPruned):
        lightning_fit(Classifier(), pl_integration.LightningCallback(setting, trial, num_classes=3), tmp_path)
    assert len(trial.history) == 1


def test_regrouping_keeps_the_schedulers_in_step() -> None:
    from regdial.integrations._common import regroup

    model = tiny_bert()
    decay = [p for n, p in model.named_parameters() if "bias" not in n and "LayerNorm" not in n]
    rest = [p for n, p in model.named_parameters() if "bias" in n or "LayerNorm" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=1e-3)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    regroup(optimizer, model, Regularization(weight_decay=0.01), [scheduler])
    assert len(scheduler.base_lrs) == len(optimizer.param_groups) == len(scheduler.lr_lambdas) == 3
    optimizer.step()
    scheduler.step()
    assert all(g["lr"] == pytest.approx(5e-4) for g in optimizer.param_groups)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_an_accumulated_language_models_training_loss_is_recorded_as_the_trainer_logs_it(
    tmp_path: Path,
) -> None:
    """With gradient accumulation the Trainer passes ``num_items_in_batch``, and a causal LM's
    loss for each micro-batch is its share of the whole batch's (its sum over all the batch's
    tokens): averaged, the record was half the Trainer's own logged loss."""
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    ids = torch.randint(0, 64, (64, 16), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": ids[i], "labels": ids[i]} for i in range(64)]
    callback = hf.HuggingFaceCallback(Regularization(weight_decay=0.01))
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        eval_strategy="epoch", save_strategy="no", logging_strategy="epoch", report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = transformers.Trainer(model=transformers.GPT2LMHeadModel(config), args=arguments, train_dataset=rows,
                                   eval_dataset=rows[:16], callbacks=[callback])  # fmt: skip
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert [row["train_loss"] for row in callback.history.rows] == pytest.approx(logged, rel=1e-4)


def test_a_search_trials_weight_decay_of_0_is_no_decay_not_the_optimizers_own() -> None:
    # The unregularized baseline, or an optional knob off: it trained with AdamW's default
    # 0.01 while trials.csv said 0. Outside a search, 0 still leaves the optimizer alone.
    from regdial.dial.trial import Trial
    from regdial.integrations._common import Session

    for trial, expected in (
        (Trial(Regularization(), number=0, metric="val_loss", epochs=1), {0.0}),
        (None, {0.01}),
    ):
        model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # weight_decay=0.01
        Session(Regularization(), trial, "val_loss").start(model, optimizer, None, None)
        assert {g["weight_decay"] for g in optimizer.param_groups} == expected
