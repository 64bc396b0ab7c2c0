"""On a GPU: the proximal steps against a bandwidth floor, and fit's overhead under AMP.

1. Prox on about a billion parameters (``--params``, in 64 tensors), each ``prox_`` and the
   L1 prox in Adam's step sizes, as a ratio to the floor: one in-place multiply over the
   same parameters (one read-write pass, the least any proximal step can do).
   Target (issue 14): <= 1.3x.
2. fit's overhead: epochs of ``fit`` (bf16 autocast, regularization off) against a minimal
   hand-written AMP loop doing the same work (the same model, optimizer, cosine schedule
   and per-epoch evaluation). Target: <= 5%.

Run: ``python benchmarks/gpu.py`` on a machine with CUDA (``--device cuda:1`` to pick one).
``--params 1e6 --device cpu`` is a smoke test of the script itself.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from regdial import L1, L2, L2SP, ElasticNet, GroupLasso, Regularization, fit, load_task
from regdial.blocks.proximal import optimizer_step_sizes
from regdial.training.metrics import evaluate


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def prox_section(device: torch.device, total: float, repeats: int) -> None:
    per = int(total // 64)
    rows = max(1, int(math.sqrt(per)))
    params = [nn.Parameter(torch.randn(rows, per // rows, device=device) * 0.02) for _ in range(64)]
    raw = [p.detach() for p in params]
    count = sum(p.numel() for p in params)
    print(f"{count / 1e6:,.1f}M parameters in {len(params)} tensors on {device}")
    floor = timed_ms(lambda: torch._foreach_mul_(raw, 0.9999999), device, repeats)
    gigabytes = 2 * 4 * count / 1e9
    print(f"floor (foreach mul_): {floor:.2f} ms, {gigabytes / (floor / 1e3):.0f} GB/s read+write\n")
    print(f"{'penalty':<12}{'prox_ ms':>10}{'x floor':>9}  target <= 1.3")
    anchor = {f"{i}": p.detach().clone() for i, p in enumerate(params)}
    module = nn.ParameterDict({f"{i}": p for i, p in enumerate(params)})
    for name, penalty in (("L1", L1(1e-4)), ("L2", L2(1e-4)), ("ElasticNet", ElasticNet(1e-4)),
                          ("GroupLasso", GroupLasso(1e-4)), ("L2SP", L2SP(1e-4, anchor, model=module))):  # fmt: skip
        ms = timed_ms(lambda p=penalty: p.prox_(params, 1e-3), device, repeats)
        print(f"{name:<12}{ms:10.2f}{ms / floor:9.2f}")
    optimizer = torch.optim.Adam(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    group, reader = optimizer.param_groups[0], optimizer_step_sizes(optimizer)
    assert reader is not None
    penalty = L1(1e-4)
    prox = timed_ms(lambda: penalty.prox_(params, reader(optimizer, group, params)), device, repeats)
    adam = timed_ms(optimizer.step, device, repeats)
    print(f"L1 in Adam's step sizes {prox:.2f} ms: {prox / floor:.2f}x floor, {prox / adam:.2f}x Adam.step()")


def minimal_amp_loop(
    data, model: nn.Module, device: torch.device, epochs: int, batch_size: int, lr: float
) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    x, y = data.x_train.to(device), data.y_train.to(device)
    steps = math.ceil(len(x) / batch_size)
    total, step = epochs * steps, 0
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for rows in order.split(batch_size):
            for g in optimizer.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x[rows.to(device)]).float(), y[rows.to(device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        for split_x, split_y in ((x[:2048], y[:2048]), (data.x_val, data.y_val)):
            evaluate(model, [(split_x, split_y)], data.num_classes, device)
    synchronize(device)


def fit_section(device: torch.device, epochs: int, repeats: int) -> None:
    from regdial import build_model

    data = load_task("digits")
    batch_size, lr = 32, 1e-3
    runs = {
        "minimal AMP loop": lambda: minimal_amp_loop(
            data, build_model("cnn", data, seed=0).to(device), device, epochs, batch_size, lr
        ),
        "fit (bf16)": lambda: fit(
            data,
            Regularization.off(),
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            device=str(device),
            precision="bf16",
            progress=False,
        ),
    }
    for run in runs.values():
        run()
    ratios = []
    for _ in range(repeats):
        seconds = {}
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            synchronize(device)
            seconds[name] = time.perf_counter() - start
        ratios.append(seconds["fit (bf16)"] / seconds["minimal AMP loop"])
    print(f"\nfit's overhead against a minimal AMP loop (digits, cnn, {epochs} epochs x {repeats}): "
          f"{(statistics.median(ratios) - 1) * 100:+.1f}% (target <= 5%)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--params", type=float, default=1e9)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu.py: no CUDA device here (--device cpu --params 1e6 smoke-tests the script)")
    prox_section(device, args.params, args.repeats)
    fit_section(device, args.epochs, max(3, args.repeats // 5))


if __name__ == "__main__":
    main()
