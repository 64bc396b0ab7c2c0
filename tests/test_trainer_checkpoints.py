"""A trainer's checkpoints with regdial: a run that regdial regrouped and regularized, stopped
and resumed from its checkpoint, continues as if it had never stopped (the Hugging Face
and Lightning Trainers), and the best checkpoint the Trainer loads at the end stays."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from regdial import Regularization, Space
from regdial.dial.hypergradient import HypergradientController
from regdial.integrations._common import regroup

transformers = pytest.importorskip("transformers")
lightning = pytest.importorskip("lightning")

from tests.test_integrations import Classifier, TokenTask, accuracy, blobs, tiny_bert  # noqa: E402

from regdial.integrations import huggingface as hf  # noqa: E402
from regdial.integrations import lightning as pl_integration  # noqa: E402

EVERY_KIND = Regularization(
    weight_decay=0.05, l1=1e-4, l2sp=0.01, ema=0.9, label_smoothing=0.1, early_stopping=50
)
"""Decay (regrouped), a prox, an anchor, an average, a smoothed loss, a patience counter."""


class StopAt(transformers.TrainerCallback):  # type: ignore[misc]
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            control.should_training_stop = True


def hf_run(
    out: Path,
    callback: hf.HuggingFaceCallback,
    stop: int | None = None,
    resume: str | None = None,
    save_steps: int = 4,
) -> Any:
    """12 steps, evaluated and saved every 4. Evaluated before it is saved in the same step,
    as here: the checkpoint's RNG state is then the one the uninterrupted run trains on
    (an evaluation draws from it: its DataLoader's seed)."""
    arguments = transformers.TrainingArguments(
        output_dir=str(out), num_train_epochs=3, per_device_train_batch_size=32, learning_rate=2e-3,
        eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=save_steps, logging_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=tiny_bert(), args=arguments, train_dataset=TokenTask(0, 128),
                                   eval_dataset=TokenTask(1, 128), compute_metrics=accuracy,
                                   callbacks=[callback] + ([StopAt(stop)] if stop else []))  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def timeless(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History rows without the evaluation's timings (``val_runtime``, ``val_samples_per_second``)."""
    return [{k: v for k, v in row.items() if "runtime" not in k and "per_second" not in k} for row in rows]


def same_weights(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


@pytest.mark.parametrize("kind", ["setting", "online", "online on the Trainer's evaluation data"])
def test_a_resumed_hugging_face_run_continues_as_if_it_never_stopped(tmp_path: Path, kind: str) -> None:
    """Stopped at step 8 of 12 and resumed from checkpoint-8: the same weights, record and
    strengths as the run that never stopped. Before regdial saved the Trainer's grouping,
    torch refused the checkpoint (``loaded state dict has a different number of parameter
    groups``); before it saved its own state, the average restarted from the saved model
    (the average itself), L2-SP anchored at step 8's weights and the record began again."""

    def callback() -> hf.HuggingFaceCallback:
        if kind.startswith("online"):
            # Its own held-out batches, or the Trainer's evaluation data, which the Trainer hands
            # callbacks only from a run's first evaluation (a resumed run has not had one yet):
            # regdial makes the Trainer's evaluation loader itself as the run starts.
            space = Space({"weight_decay": (1e-9, 1.0), "label_smoothing": (0.0, 0.3)})  # room to move
            held_out = (
                torch.utils.data.DataLoader(TokenTask(2, 64), batch_size=32) if kind == "online" else None
            )
            return hf.HuggingFaceCallback(
                online=HypergradientController(space, every=2, warmup=0), online_data=held_out
            )
        return hf.HuggingFaceCallback(EVERY_KIND)

    whole_callback, first, second = callback(), callback(), callback()
    whole = hf_run(tmp_path / "whole", whole_callback)
    hf_run(tmp_path / "parts", first, stop=8)
    assert (tmp_path / "parts" / "checkpoint-8" / hf.STATE_DIR / "last.json").is_file()
    resumed = hf_run(tmp_path / "parts", second, resume=str(tmp_path / "parts" / "checkpoint-8"))
    assert same_weights(whole.model, resumed.model) == 0.0
    assert [g["lr"] for g in whole.optimizer.param_groups] == [
        g["lr"] for g in resumed.optimizer.param_groups
    ]
    assert len(second.history) == len(whole_callback.history) == 3
    assert timeless(second.history.rows) == timeless(whole_callback.history.rows)
    if kind.startswith("online"):
        assert second.online is not None and whole_callback.online is not None
        assert second.online.controller.updates == whole_callback.online.controller.updates == 6
        assert second.online.controller.values == whole_callback.online.controller.values
        moves = whole_callback.online.controller.moves
        assert second.online.controller.moves == moves and any(m["step"] > 8 for m in moves)


def test_a_run_resumed_between_two_evaluations_records_the_training_loss_of_all_their_steps(
    tmp_path: Path,
) -> None:
    # Saved at step 6, evaluated at 4 and 8: the row of step 8 is the mean loss of steps 5-8,
    # two of them trained before the stop (the resumed run's row held steps 7-8 alone).
    whole_callback, first, second = (hf.HuggingFaceCallback(EVERY_KIND) for _ in range(3))
    whole = hf_run(tmp_path / "whole", whole_callback, save_steps=2)
    hf_run(tmp_path / "parts", first, stop=6, save_steps=2)
    resumed = hf_run(
        tmp_path / "parts", second, resume=str(tmp_path / "parts" / "checkpoint-6"), save_steps=2
    )
    assert same_weights(whole.model, resumed.model) == 0.0
    assert timeless(second.history.rows) == timeless(whole_callback.history.rows)


def test_a_checkpoint_copied_out_of_the_output_directory_or_trained_again_continues(tmp_path: Path) -> None:
    """Resumed from a copy elsewhere under another name, into another output directory (plain
    Hugging Face resumes it exactly; regdial looked only in the output directory), and the
    same Trainer trained again from its own checkpoint (it keeps its regrouped optimizer, and
    torch refused the checkpoint's groups): both end as the run that never stopped."""
    whole = hf_run(tmp_path / "whole", hf.HuggingFaceCallback(EVERY_KIND))
    stopped = hf_run(tmp_path / "parts", hf.HuggingFaceCallback(EVERY_KIND), stop=8)
    shutil.copytree(tmp_path / "parts" / "checkpoint-8", tmp_path / "elsewhere" / "kept")
    moved = hf_run(
        tmp_path / "other", hf.HuggingFaceCallback(EVERY_KIND), resume=str(tmp_path / "elsewhere" / "kept")
    )
    assert same_weights(whole.model, moved.model) == 0.0
    for callback in stopped.callback_handler.callbacks:
        if isinstance(callback, StopAt):
            callback.step = -1
    stopped.train(resume_from_checkpoint=str(tmp_path / "parts" / "checkpoint-8"))
    assert same_weights(whole.model, stopped.model) == 0.0
    assert [(g["weight_decay"], len(g["params"])) for g in stopped.optimizer.param_groups] == [
        (g["weight_decay"], len(g["params"])) for g in whole.optimizer.param_groups
    ]


def test_a_hugging_face_checkpoint_without_regdials_state_says_what_starts_afresh(
    tmp_path: Path, caplog
) -> None:
    hf_run(tmp_path, hf.HuggingFaceCallback(EVERY_KIND), stop=8)
    shutil.rmtree(tmp_path / "checkpoint-8" / hf.STATE_DIR)
    with caplog.at_level(logging.WARNING, logger="regdial.integrations"):
        hf_run(tmp_path, hf.HuggingFaceCallback(EVERY_KIND), resume=str(tmp_path / "checkpoint-8"))
    said = [r.getMessage() for r in caplog.records if "without regdial's state" in r.getMessage()]
    assert said == ["regdial: resumed at step 8 from a checkpoint without regdial's state (regdial/, saved beside "
                    "the Trainer's files) or of another run: its record, early stopping and average start afresh "
                    "here"]  # fmt: skip
    hf_run(tmp_path / "online", hf.HuggingFaceCallback(online=Space({"weight_decay": (1e-4, 1.0)})), stop=8)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="regdial.integrations"):
        hf_run(tmp_path / "online", hf.HuggingFaceCallback(online=Space({"weight_decay": (1e-4, 1.0)})),
               resume=str(tmp_path / "online" / "checkpoint-8"))  # fmt: skip
    # regdial makes the Trainer's evaluation loader itself: nothing waits for an evaluation
    assert "the hypergradient waits" not in caplog.text
    online = hf.HuggingFaceCallback(online=Space({"weight_decay": (1e-4, 1.0)}))
    with pytest.raises(ValueError, match=r"^online must be a run from its start, or resumed from a checkpoint this "
                       r"callback saved \(with its regdial/ folder\), got a run resumed at step 8 without the "
                       r"controller's state$"):  # fmt: skip
        hf_run(tmp_path, online, resume=str(tmp_path / "checkpoint-8"))


def test_the_regrouped_optimizer_saves_the_grouping_it_was_built_with() -> None:
    """Its state loads into an optimizer built as the trainer built it, per parameter, with the
    lr in force and the built weight decay; regrouped again, it steps as the original would."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))

    def built() -> torch.optim.AdamW:  # a trainer's two groups, in its own order
        params = list(model.parameters())
        return torch.optim.AdamW(
            [{"params": params[::2], "weight_decay": 0.1}, {"params": params[1::2]}], lr=0.01
        )

    optimizer = built()
    hook = regroup(optimizer, model, Regularization(weight_decay=0.05))
    assert hook is not None and len(optimizer.param_groups) == 3  # the weights; the norm; the biases
    optimizer.register_state_dict_post_hook(hook)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    for group in optimizer.param_groups:
        group["lr"] = 0.003  # a scheduler's
    fresh = built()
    fresh.load_state_dict(optimizer.state_dict())
    assert [g["weight_decay"] for g in fresh.param_groups] == [0.1, 0.01] and {
        g["lr"] for g in fresh.param_groups
    } == {0.003}
    for p in model.parameters():
        assert torch.equal(fresh.state[p]["exp_avg_sq"], optimizer.state[p]["exp_avg_sq"])
    regroup(fresh, model, Regularization(weight_decay=0.05), resumed=True)
    assert [(g["weight_decay"], len(g["params"])) for g in fresh.param_groups] == [
        (g["weight_decay"], len(g["params"])) for g in optimizer.param_groups
    ]
    with pytest.raises(ValueError, match=r"^optimizer must be one that has not stepped yet"):
        regroup(built_and_stepped(model), model, Regularization(weight_decay=0.05))


def built_and_stepped(model: nn.Module) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return optimizer


def test_a_resumed_lightning_run_keeps_its_anchor_and_continues_as_if_it_never_stopped(
    tmp_path: Path,
) -> None:
    """L2-SP's anchor is the start's weights after a resume, not the checkpoint's (Lightning
    restores the weights before the callback applies the setting), and the run ends where
    the one that never stopped does."""
    setting = Regularization(weight_decay=0.05, l2sp=0.1, ema=0.9, early_stopping=50)

    def fit(epochs: int, out: Path, resume: str | None = None) -> tuple[Classifier, Any]:
        callback = pl_integration.LightningCallback(setting, num_classes=3)
        saver = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=str(out), every_n_epochs=1, save_top_k=-1)
        trainer = lightning.pytorch.Trainer(max_epochs=epochs, accelerator="cpu", default_root_dir=str(out),
                                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                                            num_sanity_val_steps=0, callbacks=[callback, saver])  # fmt: skip
        module = Classifier()
        trainer.fit(module, blobs(0, 192), blobs(1, 96), ckpt_path=resume)
        return module, callback

    start = {k: v.clone() for k, v in Classifier().state_dict().items()}
    whole, _ = fit(3, tmp_path / "whole")
    fit(2, tmp_path / "parts")
    resumed, callback = fit(3, tmp_path / "parts", str(sorted((tmp_path / "parts").glob("*.ckpt"))[-1]))
    anchors = callback.session.applied._penalty_by_knob["l2sp"].anchors(resumed)
    assert anchors and all(torch.equal(anchor, start[name]) for name, anchor in anchors.items())
    assert same_weights(whole, resumed) < 1e-6


def test_the_best_checkpoint_the_trainer_loads_at_the_end_stays(tmp_path: Path) -> None:
    """``load_best_model_at_end``: the final model is the best checkpoint's (the average it
    evaluated), not the last average or regdial's own best, which replaced it silently."""
    from safetensors.torch import load_file

    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=12, per_device_train_batch_size=32, learning_rate=2e-2,
        eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2, logging_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
    )  # fmt: skip
    for setting in (Regularization(ema=0.9),):
        callback = hf.HuggingFaceCallback(setting)
        trainer = transformers.Trainer(model=tiny_bert(), args=arguments, train_dataset=TokenTask(0, 64),
                                       eval_dataset=TokenTask(1, 128), callbacks=[callback])  # fmt: skip
        trainer.train()
        best = trainer.state.best_model_checkpoint
        assert best is not None and not best.endswith(
            f"-{trainer.state.global_step}"
        )  # the best is not the last
        saved = load_file(str(Path(best) / "model.safetensors"))
        final = trainer.model.state_dict()
        assert max(float((final[k] - saved[k]).abs().max()) for k in saved) == 0.0
        assert trainer.evaluate()["eval_loss"] == pytest.approx(trainer.state.best_metric, abs=1e-6)


def test_a_lightning_checkpoint_holds_the_average_it_validated(tmp_path: Path) -> None:
    """With ``ema``, each checkpoint's ``state_dict`` is the average the validation scored
    (``load_from_checkpoint`` and ``ckpt_path="best"`` get those weights), as Lightning's
    own ``WeightAveraging`` saves it; the live weights travel in the callback's state."""
    callback = pl_integration.LightningCallback(Regularization(ema=0.9), num_classes=3)
    saver = lightning.pytorch.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path), monitor="val_loss", save_top_k=1
    )
    trainer = lightning.pytorch.Trainer(max_epochs=4, accelerator="cpu", default_root_dir=str(tmp_path), logger=False,
                                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                        callbacks=[callback, saver])  # fmt: skip
    trainer.fit(Classifier(), blobs(0, 192), blobs(1, 96))
    best = torch.load(saver.best_model_path, weights_only=True)
    module = Classifier()
    module.load_state_dict(best["state_dict"])
    scored = lightning.pytorch.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                                       enable_model_summary=False).validate(module, blobs(1, 96), verbose=False)  # fmt: skip
    assert scored[0]["val_loss"] == pytest.approx(float(saver.best_model_score), rel=1e-6)
    live = best["callbacks"][callback.state_key]["live"]
    assert live and any(not torch.equal(live[k], best["state_dict"][k]) for k in live)


def test_a_setting_changed_at_resume_is_refused_in_one_line(tmp_path: Path) -> None:
    """A resumed run continues the saved one: another setting would be replaced, silently, by
    the saved state in force (the optimizer ran on with 0.05 where 0.1 was given)."""
    hf_run(tmp_path, hf.HuggingFaceCallback(Regularization(weight_decay=0.05, label_smoothing=0.1)), stop=8)
    for given, said in (
        (Regularization(weight_decay=0.1, label_smoothing=0.2),
         "weight_decay=0.05, label_smoothing=0.1 (resume it unchanged, or start a new run), got weight_decay=0.1, "
         "label_smoothing=0.2"),
        (Regularization(weight_decay=0.05, label_smoothing=0.1, ema=0.9), "ema=0.0 (resume it unchanged, or start "
         "a new run), got ema=0.9"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=r"^regularization must be the setting the checkpoint's run started "
                           r"with, " + re.escape(said) + "$"):  # fmt: skip
            hf_run(tmp_path, hf.HuggingFaceCallback(given), resume=str(tmp_path / "checkpoint-8"))

    def fit(setting: Regularization, epochs: int, resume: str | None = None) -> None:
        saver = lightning.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "pl"), every_n_epochs=1)
        trainer = lightning.pytorch.Trainer(max_epochs=epochs, accelerator="cpu", default_root_dir=str(tmp_path),
                                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                                            num_sanity_val_steps=0,
                                            callbacks=[pl_integration.LightningCallback(setting, num_classes=3), saver])  # fmt: skip
        trainer.fit(Classifier(), blobs(0, 192), blobs(1, 96), ckpt_path=resume)

    fit(Regularization(l2sp=0.01), 1)
    with pytest.raises(ValueError, match=r"^regularization must be the setting .* got l2sp=0\.0$"):
        fit(Regularization(), 2, str(next((tmp_path / "pl").glob("*.ckpt"))))


def test_a_lightning_test_from_a_checkpoint_leaves_the_callback_as_the_fit_left_it(tmp_path: Path) -> None:
    """``trainer.test(ckpt_path=...)`` hands the callback the checkpoint's state too: it no longer
    rewinds the record, and a later fit of a fresh model with the callback starts from that
    model's own weights (the checkpoint's live weights were loaded into it, 0.33 away)."""
    callback = pl_integration.LightningCallback(Regularization(weight_decay=0.01, ema=0.9), num_classes=3)
    saver = lightning.pytorch.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path), monitor="val_loss", save_top_k=-1
    )

    def trainer(epochs: int, *more: Any) -> Any:
        return lightning.pytorch.Trainer(max_epochs=epochs, accelerator="cpu", default_root_dir=str(tmp_path),
                                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                                         num_sanity_val_steps=0, callbacks=[callback, *more])  # fmt: skip

    class Tested(Classifier):
        def test_step(self, batch: Any, batch_idx: int) -> None:
            self.validation_step(batch, batch_idx)

    first = trainer(4, saver)
    first.fit(Tested(), blobs(0, 192), blobs(1, 96))
    assert len(callback.history) == 4
    first.test(dataloaders=blobs(1, 96), ckpt_path=str(sorted(tmp_path.glob("*.ckpt"))[0]), verbose=False)
    assert len(callback.history) == 4
    fresh = Classifier()
    fresh.net[0].weight.data.add_(0.5)  # not the weights any checkpoint holds
    start = {k: v.clone() for k, v in fresh.state_dict().items()}
    seen: dict[str, Any] = {}

    class Spy(lightning.pytorch.Callback):  # type: ignore[misc]
        def on_train_start(self, trainer: Any, module: Any) -> None:
            seen.update({k: v.clone() for k, v in module.state_dict().items()})

    trainer(1, Spy()).fit(fresh, blobs(0, 192), blobs(1, 96))
    assert max(float((seen[k] - start[k]).abs().max()) for k in start) == 0.0


def test_lightnings_accumulated_loss_is_recorded_as_the_training_step_returned_it(tmp_path: Path) -> None:
    """With ``accumulate_grad_batches=2`` Lightning hands ``on_train_batch_end`` the loss divided
    by 2 (what it backpropagates); the record was half the training loss, and the diagnosis
    read a gap that was not there."""
    losses: list[float] = []

    class Recording(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            losses.append(float(loss))
            return loss

    callback = pl_integration.LightningCallback(Regularization(weight_decay=0.01), num_classes=3)
    trainer = lightning.pytorch.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=str(tmp_path), logger=False,
                                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                        enable_checkpointing=False, accumulate_grad_batches=2, callbacks=[callback])  # fmt: skip
    trainer.fit(Recording(), blobs(0, 192), blobs(1, 96))
    assert callback.history.rows[0]["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)


def test_one_callback_on_a_second_trainer_regroups_that_trainers_own_optimizer(tmp_path: Path) -> None:
    """After training the callback keeps a way to put its optimizer back as built (for a later
    train() of the same Trainer); a second Trainer, or a search's next trial, builds its own
    optimizer, which must be left alone (the first one's groups crashed it)."""
    callback = hf.HuggingFaceCallback(Regularization(weight_decay=0.05))
    hf_run(tmp_path / "first", callback)
    second = hf_run(tmp_path / "second", callback)
    in_optimizer = {id(p) for g in second.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in second.model.parameters()}
    assert {g["weight_decay"] for g in second.optimizer.param_groups} == {0.05, 0.0}


def test_regdials_state_is_found_beside_a_log_that_ends_in_nan(tmp_path: Path) -> None:
    """The state is matched to the resumed run by the Trainer's last log entry; a NaN in it (an
    overflowed grad norm) is not == itself, and the state was taken for another run's."""
    from types import SimpleNamespace

    from regdial.integrations._resume import save_state, saved_state

    (tmp_path / "checkpoint-8").mkdir()
    args = SimpleNamespace(output_dir=str(tmp_path))
    state = SimpleNamespace(global_step=8, log_history=[{"loss": 0.5, "grad_norm": float("nan"), "step": 8}])
    save_state(args, state, {"history": {"rows": []}})
    found = saved_state(args, state)
    assert found is not None and found["history"] == {"rows": []}
    other = SimpleNamespace(global_step=8, log_history=[{"loss": 0.6, "grad_norm": float("nan"), "step": 8}])
    assert saved_state(args, other) is None
