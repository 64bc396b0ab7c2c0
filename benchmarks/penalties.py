"""How fast are the penalties? Ratios to a floor measured in the same run.

Model: 12 blocks of Linear(256, 1024), LayerNorm(1024), Linear(1024, 256), LayerNorm(256):
6.3M parameters in 96 tensors. For each penalty it times ``value()`` (parameters
requiring grad, as in training) and ``prox_()``, and prints each as a ratio to

- the floor: one in-place multiply over the same parameters (``torch._foreach_mul_``).
  A proximal step must read and write every weight once, so it cannot beat this;
- a naive per-parameter loop of the kind tutorials write (``sign * clamp(abs - t)``,
  ``p.data = ...``).

Targets (issue 2): prox_ <= 2.0x the floor for L1, L2, ElasticNet, L2SP; value() <= 2.0x;
each >= 10x faster than the naive loop. Run: ``python benchmarks/penalties.py``.
"""

from __future__ import annotations

import argparse
import copy

import torch
from _timing import median_ms, paired_ms
from torch import nn

from regdial import L1, L2, L2SP, ElasticNet, GroupLasso, Penalty


def build_model(blocks_count: int = 12) -> nn.Module:
    blocks: list[nn.Module] = []
    for _ in range(blocks_count):
        blocks += [nn.Linear(256, 1024), nn.LayerNorm(1024), nn.Linear(1024, 256), nn.LayerNorm(256)]
    return nn.Sequential(*blocks)


def naive_value(kind: str, params: list[torch.Tensor], anchors: list[torch.Tensor], s: float) -> torch.Tensor:
    if kind == "L1":
        return s * sum(p.abs().sum() for p in params)
    if kind == "L2":
        return s / 2 * sum(p.pow(2).sum() for p in params)
    if kind == "ElasticNet":
        return s * (0.5 * sum(p.abs().sum() for p in params) + 0.25 * sum(p.pow(2).sum() for p in params))
    if kind == "GroupLasso":
        return s * sum(
            p.shape[-1] ** 0.5 * p.norm(dim=-1).sum() if p.dim() > 1 else p.abs().sum() for p in params
        )
    return s / 2 * sum((p - a).pow(2).sum() for p, a in zip(params, anchors, strict=True))


@torch.no_grad()
def naive_prox(kind: str, params: list[torch.Tensor], anchors: list[torch.Tensor], t: float) -> None:
    for p, a in zip(params, anchors, strict=True):
        if kind == "L1":
            p.data = torch.sign(p.data) * torch.clamp(torch.abs(p.data) - t, min=0)
        elif kind == "L2":
            p.data = p.data / (1 + t)
        elif kind == "ElasticNet":
            p.data = torch.sign(p.data) * torch.clamp(torch.abs(p.data) - t / 2, min=0) / (1 + t / 2)
        elif kind == "GroupLasso":
            norms = p.data.norm(dim=-1, keepdim=True) if p.dim() > 1 else p.data.abs()
            p.data = p.data * torch.clamp(1 - t / norms, min=0)
        else:
            p.data = a + (p.data - a) / (1 + t)


def adam_section(model: nn.Module, params: list[torch.Tensor], repeats: int, flag: bool | None) -> None:
    """The prox in Adam's own step sizes, as attach_prox does for Adam by default."""
    from regdial.blocks.proximal import optimizer_step_sizes

    optimizer = torch.optim.Adam(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()  # fills exp_avg_sq
    group, reader = optimizer.param_groups[0], optimizer_step_sizes(optimizer)
    assert reader is not None
    penalty = L1(1e-4, fused=flag)

    def adaptive_prox() -> None:
        penalty.prox_(params, reader(optimizer, group, params))

    prox_ms, adam_ms = paired_ms(adaptive_prox, optimizer.step, max(10, repeats // 3))
    floor_ms = paired_ms(
        adaptive_prox, lambda: torch._foreach_mul_([p.detach() for p in params], 0.9999999), 10
    )[1]
    print(
        f"\nL1 prox_ in Adam's step sizes (attach_prox's default for Adam): {prox_ms:.3f} ms, "
        f"{prox_ms / floor_ms:.2f}x the floor (target <= 3), "
        f"{prox_ms / adam_ms:.2f}x Adam.step() ({adam_ms:.3f} ms) on the same parameters"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--fused", choices=("auto", "on", "off"), default="on")
    parser.add_argument("--blocks", type=int, default=12, help="the model's blocks (12: 6.3M parameters)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.blocks)
    params = list(model.parameters())
    anchors = [p.detach().clone() for p in params]
    raw = [p.detach() for p in params]
    n = sum(p.numel() for p in params)
    print(
        f"{n / 1e6:.2f}M parameters in {len(params)} tensors, {args.threads} threads, torch {torch.__version__}"
    )

    strength, lr = 1e-4, 1e-3  # tiny steps: repeated calls leave the weights as they are

    def floor() -> None:
        torch._foreach_mul_(raw, 0.9999999)

    floor_ms = median_ms(floor, args.repeats)
    print(f"floor (foreach mul_ over all parameters): {floor_ms:.3f} ms\n")
    flag = {"auto": None, "on": True, "off": False}[args.fused]
    penalties: dict[str, Penalty] = {
        "L1": L1(strength, fused=flag),
        "L2": L2(strength, fused=flag),
        "ElasticNet": ElasticNet(strength, l1_ratio=0.5, fused=flag),
        "GroupLasso": GroupLasso(strength),
        "L2SP": L2SP(strength, copy.deepcopy(model), model=model, fused=flag),
    }
    targets = {"L1": 2.0, "L2": 2.0, "ElasticNet": 2.0, "L2SP": 2.0, "GroupLasso": None}
    header = (
        f"{'penalty':<11} {'op':<7} {'ms':>7} {'x floor':>8} {'target':>7} {'naive ms':>9} {'vs naive':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, penalty in penalties.items():
        rows = [
            (
                "value",
                lambda p=penalty: p.value(params),
                lambda k=name: naive_value(k, params, anchors, strength),
            ),
            (
                "prox_",
                lambda p=penalty: p.prox_(params, lr),
                lambda k=name: naive_prox(k, params, anchors, lr * strength),
            ),
        ]
        for op, fast, naive in rows:
            fast_ms, floor_now = paired_ms(fast, floor, args.repeats)
            naive_ms = median_ms(naive, max(10, args.repeats // 4))
            ratio = fast_ms / floor_now
            target = targets[name]
            mark = "-" if target is None else f"<={target:.1f}" + (" ok" if ratio <= target else " !!")
            print(
                f"{name:<11} {op:<7} {fast_ms:7.3f} {ratio:8.2f} {mark:>7} {naive_ms:9.3f} {naive_ms / fast_ms:8.1f}x"
            )
    adam_section(model, params, args.repeats, flag)
    from regdial.blocks.fused import compile_seconds

    spent = compile_seconds()
    print(f"\ncompiling (--fused {args.fused}): {sum(spent.values()):.1f} s: "
          + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in spent.items()))  # fmt: skip
    print(
        "\nx floor: against the floor timed alternately with each row. Times vary with the "
        "allocator's state (fresh 25 MB temporaries page-fault), so read ratios to one decimal."
    )


if __name__ == "__main__":
    main()
