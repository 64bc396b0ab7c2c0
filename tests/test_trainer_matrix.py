"""Every knob inside the trainers, on real model classes built from configs (random weights, tiny):
applied as its doc says, at the first step and at the end, without breaking training, or refused
in one line. Also: the trainer's own settings left alone, hyperparameter_search, LoRA, Lightning's
own optimizer layouts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regdial import Regularization, Space

transformers = pytest.importorskip("transformers")
lightning = pytest.importorskip("lightning")

from regdial.integrations import huggingface as hf  # noqa: E402
from regdial.integrations import lightning as pl_integration  # noqa: E402

VOCAB, LENGTH = 100, 16

# -- data: a next-token rule (causal LMs), its sequence-to-sequence form (T5), a label (BERT) --


def successor(ids: torch.Tensor) -> torch.Tensor:
    return (3 * ids + 7) % VOCAB


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Sequences where each token follows from the last by ``successor`` (10% random)."""

    def __init__(self, kind: str, seed: int, n: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.empty(n, LENGTH, dtype=torch.long)
        ids[:, 0] = torch.randint(0, VOCAB, (n,), generator=generator)
        for t in range(1, LENGTH):
            noise = torch.randint(0, VOCAB, (n,), generator=generator)
            ids[:, t] = torch.where(torch.rand(n, generator=generator) < 0.9, successor(ids[:, t - 1]), noise)
        self.kind, self.ids = kind, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        if self.kind == "seq2seq":  # map each token to its successor
            return {"input_ids": ids, "labels": successor(ids)}
        if self.kind == "classify":  # is the first token even
            return {"input_ids": ids, "labels": ids[0] % 2}
        return {"input_ids": ids, "labels": ids}


# -- the models ------------------------------------------------------------------------------


class NanoAttention(nn.Module):
    """nanoGPT's CausalSelfAttention: the attention rate is a float passed to SDPA."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.resid_dropout = nn.Dropout(dropout)
        self.heads, self.dropout = heads, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.c_attn(x).split(C, 2)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class NanoGPT(nn.Module):
    """A nanoGPT-style model whose forward takes what the Trainer's batches hold."""

    def __init__(self, dim: int = 32, layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, dim), nn.Embedding(LENGTH, dim)
        self.blocks = nn.ModuleList(NanoAttention(dim, 2, dropout) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers + 1))
        self.lm_head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        x = self.wte(input_ids) + self.wpe(torch.arange(input_ids.shape[1]))
        for block, norm in zip(self.blocks, self.norms, strict=False):
            x = x + block(norm(x))
        logits = self.lm_head(self.norms[-1](x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return transformers.modeling_outputs.CausalLMOutput(loss=loss, logits=logits)


def gpt2() -> Any:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def llama() -> Any:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=LENGTH,
                                      attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def bert() -> Any:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=LENGTH, num_labels=2)  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def t5() -> Any:
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


def lora() -> Any:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["c_attn", "c_fc"],
                             fan_in_fan_out=True, task_type="CAUSAL_LM")  # fmt: skip
    return peft.get_peft_model(gpt2(), config)


MODELS: dict[str, tuple[Callable[[], Any], str, bool]] = {  # builder, data, whether labels are shifted
    "gpt2": (gpt2, "causal", True),
    "llama": (llama, "causal", True),
    "bert": (bert, "classify", False),
    "t5": (t5, "seq2seq", False),
    "lora": (lora, "causal", True),
    "nanogpt": (NanoGPT, "causal", True),
}

KNOBS: dict[str, dict[str, Any]] = {  # a common strength of each knob that applies to token models
    "dropout": {"dropout": 0.1},
    "weight_decay": {"weight_decay": 0.1},
    "l1": {"l1": 1e-4},
    "label_smoothing": {"label_smoothing": 0.1},
    "embedding_noise": {"embedding_noise": 0.5},  # NEFTune's 5 swamps embeddings of width 32 (std 0.02)
    "ema": {"ema": 0.9},
}
ALL = Regularization(**{k: v for strengths in KNOBS.values() for k, v in strengths.items()})

BOUND = 1.25
"""A knob at its common strength (or all of them together): eval loss at most this times
the loss trained without it. Label smoothing raises the evaluated cross-entropy by design
(the Trainer's own ``label_smoothing_factor=0.1`` costs about 1.15x on this task); the
label smoothing against unshifted labels that this bounds cost GPT-2 3.2x."""


class Probe(transformers.TrainerCallback):  # type: ignore[misc]
    """What the model and optimizer look like at the first step and after the last."""

    def __init__(self, look: Callable[[Any, Any], dict[str, Any]]) -> None:
        self.look, self.first, self.last = look, {}, {}

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                      **kwargs: Any) -> None:  # fmt: skip
        if state.global_step == 0:
            self.first = self.look(model, optimizer)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    **kwargs: Any) -> None:  # fmt: skip
        if state.global_step == state.max_steps:
            self.last = self.look(model, optimizer)


def look(model: Any, optimizer: Any) -> dict[str, Any]:
    groups = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    rates = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    rates += [getattr(m, a) for m in model.modules() for a in ("attention_dropout", "dropout")
              if isinstance(getattr(m, a, None), float)]  # fmt: skip
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.wte
    return {"decay": decay, "rates": rates, "embedding_hooks": len(embedding._forward_hooks)}


def train(
    name: str, setting: Regularization | None, tmp: Path, steps: int = 20, **args: Any
) -> dict[str, Any]:
    build, kind, _ = MODELS[name]
    torch.manual_seed(0)
    model = build()
    callback = (
        None
        if setting is None
        else hf.HuggingFaceCallback(setting, causal_lm=True if name == "nanogpt" else None)
    )
    probe = Probe(look)
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp), max_steps=steps, per_device_train_batch_size=16, learning_rate=1e-2,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0, **args,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=Tokens(kind, 0, 320),
                                   eval_dataset=Tokens(kind, 1, 64),
                                   callbacks=[c for c in (callback, probe) if c is not None])  # fmt: skip
    trainer.train()
    return {"model": model, "callback": callback, "probe": probe, "optimizer": trainer.optimizer,
            "eval_loss": float(trainer.evaluate()["eval_loss"])}  # fmt: skip


@pytest.fixture(scope="module")
def baselines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Each model trained without regdial, the reference for the knobs' bounds."""
    out = tmp_path_factory.mktemp("baselines")
    return {name: train(name, None, out / name) for name in MODELS}


def is_weight(name: str) -> bool:
    return not any(
        part in name for part in ("bias", "norm", "ln_", "wte", "wpe", "embed", "shared", "LayerNorm")
    )


def check_effects(
    run: dict[str, Any], strengths: dict[str, Any], baseline: dict[str, Any], shifted: bool
) -> None:
    """Each knob of ``strengths`` as its doc says, at the first step and after the last."""
    first, last = run["probe"].first, run["probe"].last
    applied = run["callback"].session.applied
    if "dropout" in strengths:
        assert first["rates"] and all(r == strengths["dropout"] for r in first["rates"] + last["rates"])
    for view in (first, last):
        decay = strengths.get("weight_decay", 0.0)
        assert {n: d for n, d in view["decay"].items() if is_weight(n)} == dict.fromkeys(
            [n for n in view["decay"] if is_weight(n)], decay
        )
        assert all(d == 0.0 for n, d in view["decay"].items() if not is_weight(n))
        assert view["embedding_hooks"] == ("embedding_noise" in strengths)
    if "l1" in strengths:
        assert "L1" in [type(p).__name__ for p in applied.penalties]
        assert weight_norm(run["model"]) < weight_norm(baseline["model"])
    if "label_smoothing" in strengths:
        assert run["callback"]._shift is shifted
    if "ema" in strengths:
        assert applied.ema is not None
        averaged = applied.ema.module.state_dict()
        assert all(
            torch.equal(v, averaged[k]) for k, v in run["model"].state_dict().items()
        )  # the final model
    assert run["eval_loss"] <= BOUND * baseline["eval_loss"], (run["eval_loss"], baseline["eval_loss"])


def weight_norm(model: nn.Module) -> float:
    with torch.no_grad():
        return sum(
            float(p.abs().sum()) for n, p in model.named_parameters() if p.requires_grad and is_weight(n)
        )


@pytest.mark.parametrize("model_name", list(MODELS))
def test_every_knob_together_on_each_model(
    model_name: str, baselines: dict[str, Any], tmp_path: Path
) -> None:
    run = train(model_name, ALL, tmp_path)
    strengths = {k: v for s in KNOBS.values() for k, v in s.items()}
    check_effects(run, strengths, baselines[model_name], MODELS[model_name][2])


@pytest.mark.parametrize("knob", list(KNOBS))
def test_each_knob_alone_on_gpt2(knob: str, baselines: dict[str, Any], tmp_path: Path) -> None:
    run = train("gpt2", Regularization(**KNOBS[knob]), tmp_path)
    check_effects(run, KNOBS[knob], baselines["gpt2"], shifted=True)


# -- the trainer's own settings ----------------------------------------------------------------


def test_the_trainers_weight_decay_stays_unless_the_setting_sets_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = train("gpt2", Regularization(dropout=0.1), tmp_path / "a", steps=2, weight_decay=0.1)
    decays = {g["weight_decay"] for g in run["optimizer"].param_groups}
    assert decays == {0.1, 0.0}  # the Trainer's own groups, as it made them
    caplog.set_level(logging.WARNING, logger="regdial")
    run = train("gpt2", Regularization(weight_decay=0.01), tmp_path / "b", steps=2, weight_decay=0.1)
    assert {g["weight_decay"] for g in run["optimizer"].param_groups} == {0.01, 0.0}
    assert "weight_decay=0.01 replaces the optimizer's own (0.1)" in caplog.text


def test_the_label_shift_is_the_trainers_own_reference(tmp_path: Path) -> None:
    """regdial's label smoothing trains GPT-2 as transformers' Trainer does with label_smoothing_factor."""
    weights = {}
    for name, setting, args in (("ours", Regularization(label_smoothing=0.1), {}),
                                ("theirs", None, {"label_smoothing_factor": 0.1}),
                                ("plain", None, {})):  # fmt: skip
        weights[name] = train("gpt2", setting, tmp_path / name, steps=3, **args)["model"].state_dict()
    for key, value in weights["theirs"].items():
        torch.testing.assert_close(weights["ours"][key], value, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(weights["plain"][k], v) for k, v in weights["theirs"].items())


class Probed(transformers.TrainerCallback):  # type: ignore[misc]
    """Each trial's optimizer decay, record length and label smoothing, seen at its end."""

    def __init__(self, regdial: hf.HuggingFaceCallback) -> None:
        self.regdial, self.trials = regdial, []

    def on_train_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        decays = sorted({g["weight_decay"] for g in optimizer.param_groups})
        session = self.regdial.session
        self.trials.append({"args": args.weight_decay, "decays": decays, "epochs": len(session.history),
                            "smoothing": (args.label_smoothing_factor, session.setting.label_smoothing)})  # fmt: skip


def test_hyperparameter_search_applies_each_trials_knobs_afresh(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    regdial = hf.HuggingFaceCallback(Regularization(early_stopping=1))
    probed = Probed(regdial)
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=32, learning_rate=1e-2,
        eval_strategy="epoch", save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model_init=gpt2, args=arguments, train_dataset=Tokens("causal", 0, 64),
                                   eval_dataset=Tokens("causal", 1, 32), callbacks=[regdial, probed])  # fmt: skip
    space = Space({"weight_decay": (1e-3, 1e-1), "label_smoothing": (0.01, 0.2)})
    trainer.hyperparameter_search(backend="optuna", n_trials=3, hp_space=hf.hp_space(space, regdial),
                                  direction="minimize")  # fmt: skip
    assert len(probed.trials) == 3
    for trial in probed.trials:
        assert trial["decays"] == [
            0.0,
            pytest.approx(trial["args"]),
        ]  # the trial's decay reached the optimizer
        assert (
            trial["epochs"] == 3
        )  # its full length: no record or early stopping carried from the last trial
        assert trial["smoothing"][0] == trial["smoothing"][1] > 0  # the trial's smoothing is applied
    assert len({t["args"] for t in probed.trials}) == 3


# -- LoRA -------------------------------------------------------------------------------------


def test_lora_frozen_base_gets_no_decay_prox_anchor_or_averaged_copy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="regdial")
    run = train("lora", Regularization(weight_decay=0.1, l1=1e-5, l2sp=0.01, ema=0.9, dropout=0.2), tmp_path)
    model, applied = run["model"], run["callback"].session.applied
    in_optimizer = {id(p) for g in run["optimizer"].param_groups for p in g["params"]}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and not any(id(p) in in_optimizer for p in frozen)
    assert {id(p) for p in applied.weights} <= {id(p) for p in model.parameters() if p.requires_grad}
    l2sp = next(p for p in applied.penalties if type(p).__name__ == "L2SP")
    assert all(p.requires_grad for p in l2sp.parameters())
    averaged = dict(applied.ema.module.named_parameters())
    for name, p in model.named_parameters():  # the average shares the frozen base: no copy of it
        assert (averaged[name] is p) == (not p.requires_grad)
    assert all(
        m.p == 0.2 for n, m in model.named_modules() if isinstance(m, nn.Dropout) and "lora_dropout" in n
    )
    assert "lora_B) is then under plain L2" in caplog.text


# -- refused in one line -----------------------------------------------------------------------


class Plain(nn.Module):
    """A model with no dropout and a float input (inputs_embeds)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, inputs_embeds: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        logits = self.net(inputs_embeds)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return transformers.modeling_outputs.SequenceClassifierOutput(loss=loss, logits=logits)


class Floats(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int = 64) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=generator)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"inputs_embeds": self.x[i], "labels": self.y[i]}


def plain_trainer(
    model: nn.Module, callbacks: list[Any], tmp: Path, evaluate: bool = False, **args: Any
) -> Any:
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp), max_steps=4, per_device_train_batch_size=16, save_strategy="no",
        logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, **args,
    )  # fmt: skip
    return transformers.Trainer(model=model, args=arguments, train_dataset=Floats(), callbacks=callbacks,
                                eval_dataset=Floats(16) if evaluate else None)  # fmt: skip


def test_a_plain_model_with_equal_groups_trains_and_gets_noise(tmp_path: Path) -> None:
    model = Plain()
    callback = hf.HuggingFaceCallback(Regularization(noise=0.1, weight_decay=0.01), num_classes=2)
    trainer = plain_trainer(model, [callback], tmp_path)
    trainer.train()  # crashed comparing parameter lists with tensor ==
    assert callback.session.applied is not None and callback.session.applied.noise is not None
    assert {g["weight_decay"] for g in trainer.optimizer.param_groups} == {0.01, 0.0}


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: hf.HuggingFaceCallback(Regularization(), num_classes=0), r"^num_classes must be an integer"),
        (lambda: hf.HuggingFaceCallback(Regularization(), trial=5), r"^trial must be a regdial.Trial"),
        (lambda: hf.HuggingFaceCallback(Regularization(), monitor=5), r"^monitor must be the name of"),
        (lambda: pl_integration.LightningCallback(Regularization(), num_classes=0), r"^num_classes must be"),
        (
            lambda: pl_integration.LightningCallback(Regularization(), trial=5),
            r"^trial must be a regdial.Trial",
        ),
        (
            lambda: pl_integration.LightningCallback(Regularization(), monitor=5),
            r"^monitor must be the name of",
        ),
    ],
)
def test_bad_callback_arguments_are_refused(make: Callable[[], Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    ("setting", "callbacks", "message"),
    [
        (
            Regularization(dropout=0.1),
            1,
            r"^regularization.dropout must be unset for a model with no dropout",
        ),
        (Regularization(), 2, r"^trainer must be one regdial callback"),
    ],
)
def test_what_would_do_nothing_is_refused(
    setting: Regularization, callbacks: int, message: str, tmp_path: Path
) -> None:
    trainer = plain_trainer(Plain(), [hf.HuggingFaceCallback(setting) for _ in range(callbacks)], tmp_path)
    with pytest.raises(ValueError, match=message):
        trainer.train()


def test_early_stopping_on_a_metric_never_logged_is_refused(tmp_path: Path) -> None:
    callback = hf.HuggingFaceCallback(Regularization(early_stopping=2), monitor="eval_f1")
    trainer = plain_trainer(Plain(), [callback], tmp_path, evaluate=True, eval_strategy="steps", eval_steps=2)
    with pytest.raises(
        ValueError,
        match=r"^monitor must be a value the evaluation logs \(.*val_loss.*\) for early stopping, got 'val_f1'$",
    ):
        trainer.train()


def test_an_unknown_token_model_must_say_whether_it_is_causal(tmp_path: Path) -> None:
    torch.manual_seed(0)
    callback = hf.HuggingFaceCallback(Regularization(label_smoothing=0.1))
    arguments = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                                               disable_tqdm=True, save_strategy="no")  # fmt: skip
    trainer = transformers.Trainer(model=NanoGPT(), args=arguments, train_dataset=Tokens("causal", 0, 16),
                                   callbacks=[callback])  # fmt: skip
    with pytest.raises(
        ValueError, match=r"^causal_lm must be True or False for a model transformers does not know"
    ):
        trainer.train()


def test_a_float_rate_that_is_not_turned_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = NanoGPT()
    model.blocks[0].my_drop = 0.3  # type: ignore[assignment]
    caplog.set_level(logging.WARNING, logger="regdial")
    trainer = transformers.Trainer(
        model=model, args=transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[],
                                                         use_cpu=True, disable_tqdm=True, save_strategy="no"),
        train_dataset=Tokens("causal", 0, 16), callbacks=[hf.HuggingFaceCallback(Regularization(dropout=0.2))],
    )  # fmt: skip
    trainer.train()
    assert all(b.dropout == 0.2 for b in model.blocks)  # nanoGPT's float passed to SDPA follows the knob
    assert "does not turn these float attributes, which look like rates: blocks.0.my_drop" in caplog.text


# -- Lightning's own optimizer layouts ---------------------------------------------------------


class OwnGroups(lightning.pytorch.LightningModule):
    """Lightning's usual module: its own AdamW groups (two of equal size), a StepLR."""

    def __init__(self, equal: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 3)
        self.equal = equal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.second(torch.relu(self.first(x)))
        return out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        if self.equal:  # two groups with the same number of tensors
            groups = [{"params": list(self.first.parameters()), "weight_decay": 0.1},
                      {"params": list(self.second.parameters()), "weight_decay": 0.1}]  # fmt: skip
        else:
            groups = [{"params": [self.first.weight, self.second.weight], "weight_decay": 0.1},
                      {"params": [self.first.bias, self.second.bias], "weight_decay": 0.0}]  # fmt: skip
        optimizer = torch.optim.AdamW(groups, lr=1e-2)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 2)}


def blobs(n: int) -> Any:
    generator = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=generator)
    x = torch.randn(n, 8, generator=generator) + torch.eye(3, 8)[y]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def fit(module: Any, setting: Regularization, tmp: Path) -> Any:
    trainer = lightning.pytorch.Trainer(max_epochs=2, accelerator="cpu", default_root_dir=str(tmp), logger=False,
                                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                        num_sanity_val_steps=0,
                                        callbacks=[pl_integration.LightningCallback(setting)])  # fmt: skip
    trainer.fit(module, blobs(64), blobs(32))
    return trainer


@pytest.mark.parametrize("equal", [True, False])
def test_lightning_keeps_the_modules_own_decay_and_regroups_any_layout(
    equal: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = fit(OwnGroups(equal), Regularization(ema=0.9), tmp_path / "own")
    assert [g["weight_decay"] for g in trainer.optimizers[0].param_groups] == (
        [0.1, 0.1] if equal else [0.1, 0.0]
    )
    caplog.set_level(logging.WARNING, logger="regdial")
    trainer = fit(
        OwnGroups(equal), Regularization(weight_decay=0.01), tmp_path / "set"
    )  # crashed on equal groups
    groups = trainer.optimizers[0].param_groups
    assert sorted(g["weight_decay"] for g in groups) == ([0.0, 0.0, 0.01, 0.01] if equal else [0.0, 0.01])
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert len(scheduler.base_lrs) == len(groups)
    assert all(
        g["lr"] == pytest.approx(1e-3) for g in groups
    )  # StepLR(2) after 8 steps: 1e-2 * 0.1^4... in step
    assert "replaces the optimizer's own (0.1)" in caplog.text


def test_a_dropout_the_online_controller_moves_is_the_one_a_saved_model_reloads_with(tmp_path: Path) -> None:
    from regdial.integrations._common import Session

    model = lora()
    session = Session(Regularization(dropout=0.1), None, "val_loss")
    session.start(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]), None, None)
    session.retune(Regularization(dropout=0.04))  # an online move
    assert model.config.resid_pdrop == model.config.attn_pdrop == 0.04
    assert model.peft_config["default"].lora_dropout == 0.04
    model.save_pretrained(tmp_path)
    assert '"lora_dropout": 0.04' in (tmp_path / "adapter_config.json").read_text()


class RaisesAt(transformers.TrainerCallback):
    """The user's code failing (or Ctrl-C) at step 3, after the evaluation at step 2."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 3:
            raise self.error


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("boom")])
def test_a_hugging_face_run_stopped_by_an_exception_keeps_its_record_so_far(
    error: BaseException, tmp_path: Path
) -> None:
    """The Trainer tells callbacks of no exception: the record written at each evaluation
    is what survives (it was lost: nothing was written before on_train_end)."""
    import json

    callback = hf.HuggingFaceCallback(Regularization(weight_decay=0.01), num_classes=2)
    trainer = plain_trainer(Plain(), [callback, RaisesAt(error)], tmp_path, evaluate=True,
                            eval_strategy="steps", eval_steps=2)  # fmt: skip
    with pytest.raises(type(error)):
        trainer.train()
    record = json.loads((tmp_path / "regdial_history.json").read_text())
    assert record["meta"]["status"] == "unfinished" and len(record["rows"]) == 1
    from regdial.training.history import History

    assert History.from_dict(record).rows[0]["val_loss"] == callback.history.rows[0]["val_loss"]
    finished = plain_trainer(Plain(), [hf.HuggingFaceCallback(Regularization())], tmp_path / "whole",
                             evaluate=True, eval_strategy="steps", eval_steps=2)  # fmt: skip
    finished.train()
    whole = json.loads((tmp_path / "whole" / "regdial_history.json").read_text())
    assert whole["meta"]["status"] == "completed" and len(whole["rows"]) == 2


class Crashing(OwnGroups):
    """Stops its own run at its 9th step, as Ctrl-C or an error in the user's code does."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(equal=False)
        self.error = error

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == 8:
            raise self.error
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(("error", "status"), [(KeyboardInterrupt(), "interrupted"),
                                               (RuntimeError("boom"), "failed (RuntimeError)")])  # fmt: skip
def test_a_lightning_run_stopped_by_an_exception_keeps_its_record_and_says_how_it_ended(
    error: BaseException, status: str, tmp_path: Path
) -> None:
    """Two epochs were recorded before the stop: they were lost (Ctrl-C) or never written."""
    import json
    import signal

    # Lightning ignores SIGINT from a Ctrl-C on, and children inherit that: put it back.
    handler = signal.getsignal(signal.SIGINT)
    trainer = lightning.pytorch.Trainer(max_epochs=4, accelerator="cpu", default_root_dir=str(tmp_path),
                                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                        enable_model_summary=False, num_sanity_val_steps=0,
                                        callbacks=[pl_integration.LightningCallback(Regularization(ema=0.9))])  # fmt: skip
    try:
        with pytest.raises((SystemExit, RuntimeError)):  # Lightning exits 1 on Ctrl-C
            trainer.fit(Crashing(error), blobs(64), blobs(32))
    finally:
        signal.signal(signal.SIGINT, handler)
    record = json.loads((tmp_path / "regdial_history.json").read_text())
    assert record["meta"]["status"] == status and len(record["rows"]) == 2
    summary = json.loads((tmp_path / "regdial_report" / "summary.json").read_text())
    assert summary["status"] == status
