"""L1 through attach_prox on a tiny BERT: the old default against the safe one.

A 2-layer BERT (hidden 64, from a config, random weights: nothing is downloaded) learns a
generated token task (which pair of marker tokens occurs more often) for 6 epochs with
AdamW, as Hugging Face's Trainer would build it: one optimizer over every parameter. The
proximal L1 is attached the old way (no warm-up, every parameter of those groups) and the
new way (``model=`` spares biases, normalization and embeddings; the strength warms up
over Adam's second-moment horizon). Printed: validation accuracy (mean of seeds), the
share of exact zeros, and the tensors that ended entirely zero.

    python benchmarks/l1_bert.py            # about a minute
"""

from __future__ import annotations

import logging
import statistics
import sys

import torch
import torch.nn.functional as F

from regdial import L1, attach_prox


def task(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (n, 24), generator=generator)
    first = (ids == 7).sum(1) + (ids == 8).sum(1)
    second = (ids == 9).sum(1) + (ids == 10).sum(1)
    ids[:, 0] = 2  # [CLS]
    return ids, (first > second).long()


def tiny_bert(seed: int) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=32, num_labels=2)  # fmt: skip
    return BertForSequenceClassification(config)


def train(strength: float, way: str, seed: int, epochs: int = 6) -> tuple[float, float, list[str]]:
    model = tiny_bert(seed)
    x, y = task(0, 1200)
    x_val, y_val = task(1, 400)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)  # the trainer's groups
    if strength and way == "before":
        attach_prox(optimizer, L1(strength), warmup=0)
    elif strength:
        attach_prox(optimizer, L1(strength), model=model)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            rows = order[i : i + 32]
            loss = F.cross_entropy(model(input_ids=x[rows]).logits, y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(input_ids=x_val).logits.argmax(1) == y_val).float().mean())
    parameters = dict(model.named_parameters())
    zeros = sum(int((p == 0).sum()) for p in parameters.values()) / sum(
        p.numel() for p in parameters.values()
    )
    dead = [name for name, p in parameters.items() if p.numel() > 1 and not bool(p.any())]
    return accuracy, zeros, dead


def main(seeds: int = 3) -> None:
    logging.disable(logging.WARNING)
    print(f"tiny BERT, 6 epochs of AdamW on the trainer's own optimizer groups; mean of {seeds} seeds")
    print(f"{'L1 strength':>11}  {'attached':<7} {'val accuracy':>12} {'exact zeros':>12}  entirely zero")
    for strength in (0.0, 1e-5, 3e-5, 1e-4):
        for way in ("before", "after") if strength else ("-",):
            results = [train(strength, way, seed) for seed in range(seeds)]
            accuracy = statistics.fmean(r[0] for r in results)
            zeros = statistics.fmean(r[1] for r in results)
            dead = sorted(
                {
                    name.replace("bert.encoder.", "").replace(".attention.self", "")
                    for r in results
                    for name in r[2]
                }
            )
            shown = (
                ", ".join(dead[:6]) + (f" (+{len(dead) - 6})" if len(dead) > 6 else "") if dead else "none"
            )
            print(f"{strength:>11g}  {way:<7} {accuracy:>12.3f} {zeros:>12.1%}  {shown}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
