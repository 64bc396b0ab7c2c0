"""Causal-LM label smoothing and a LoRA fine-tune inside Hugging Face's Trainer, with and without regdial.

Prints the eval loss of a tiny GPT-2 (built from a config, random weights) trained on a
synthetic next-token task: without the callback, with ``label_smoothing=0.1`` through
``HuggingFaceCallback``, and with the Trainer's own ``label_smoothing_factor=0.1`` (the
reference: transformers' ``LabelSmoother`` with its own causal-model mapping). Then a LoRA
(peft) fine-tune of the same model on a shifted task, with and without the callback.
Same seed everywhere::

    PYTHONPATH=src python benchmarks/trainer_knobs.py
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

import torch
import transformers

from regdial import Regularization
from regdial.integrations.huggingface import HuggingFaceCallback


class NextToken(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Sequences where each token follows from the last (``3x + offset mod 100``, 10% random)."""

    def __init__(self, seed: int, n: int, offset: int = 7, length: int = 24) -> None:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.empty(n, length, dtype=torch.long)
        ids[:, 0] = torch.randint(0, 100, (n,), generator=generator)
        for t in range(1, length):
            follow = (3 * ids[:, t - 1] + offset) % 100
            noise = torch.randint(0, 100, (n,), generator=generator)
            ids[:, t] = torch.where(torch.rand(n, generator=generator) < 0.9, follow, noise)
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> Any:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=100, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def train(
    model: Any, callbacks: list[Any], epochs: int, offset: int = 7, lr: float = 3e-3, **args: Any
) -> float:
    with tempfile.TemporaryDirectory() as out:
        arguments = transformers.TrainingArguments(
            output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=32, learning_rate=lr,
            eval_strategy="no", save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True,
            disable_tqdm=True, seed=0, **args,
        )  # fmt: skip
        trainer = transformers.Trainer(model=model, args=arguments, train_dataset=NextToken(0, 512, offset),
                                       eval_dataset=NextToken(1, 256, offset), callbacks=callbacks)  # fmt: skip
        trainer.train()
        trainer.label_smoother = (
            None  # every figure is the plain cross-entropy, the Trainer's own smoothing too
        )
        return float(trainer.evaluate()["eval_loss"])


def main() -> None:
    logging.getLogger("regdial").setLevel(logging.ERROR)
    epochs = 6
    plain = train(tiny_gpt2(), [], epochs)
    ours = train(tiny_gpt2(), [HuggingFaceCallback(Regularization(label_smoothing=0.1))], epochs)
    theirs = train(tiny_gpt2(), [], epochs, label_smoothing_factor=0.1)
    print(f"GPT-2, {epochs} epochs, eval loss: no smoothing {plain:.3f}; regdial label_smoothing=0.1 "
          f"{ours:.3f}; Trainer label_smoothing_factor=0.1 {theirs:.3f}")  # fmt: skip

    try:
        import peft
    except ImportError:
        print("peft is not installed: no LoRA figures")
        return
    base = tiny_gpt2()
    train(base, [], epochs)  # "pre-training" on offset 7
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for label, setting in (("without the callback", None),
                           ("with Regularization(dropout=0.1, weight_decay=0.01, label_smoothing=0.1, ema=0.9)",
                            Regularization(dropout=0.1, weight_decay=0.01, label_smoothing=0.1, ema=0.9))):  # fmt: skip
        model = tiny_gpt2()
        model.load_state_dict(state)
        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["c_attn", "c_fc"],
                                 fan_in_fan_out=True, task_type="CAUSAL_LM")  # fmt: skip
        lora = peft.get_peft_model(model, config)
        trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        start = time.perf_counter()
        callbacks = [] if setting is None else [HuggingFaceCallback(setting)]
        loss = train(lora, callbacks, 3, offset=11, lr=1e-2)
        print(f"LoRA r=4 ({trainable} trainable parameters) on the shifted task, {label}: eval loss {loss:.3f}, "
              f"{time.perf_counter() - start:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
