"""fit's overhead: epochs of ``fit`` against a minimal hand-written loop doing the same work.

Both train the same model (built-in ``cnn`` on ``digits``, regularization off) from the
same initial weights with AdamW and a per-step cosine learning rate, and evaluate the
train subset and the validation split in eval mode after every epoch, as ``fit`` does
for its learning curves. The runs alternate, and the script prints the median seconds
per epoch of each and fit's overhead: the median over repeats of its ratio to the minimal
loop of the same repeat. Target (issue 4): <= 5% with regularization off. fit's time
includes what it does once a run beyond the loop: scoring the final and the best weights
on the test split (and the final ones on validation), for summary.json.
It also prints what the clean train-set evaluation costs, which the overhead excludes.

Then the bookkeeping of a ``Regularization``, per training step of a mid-size model
(12 blocks of Linear(256, 1024), LayerNorm, Linear(1024, 256), LayerNorm and a 10-class
head: 6.3M parameters; batches of 256 and 1024): a minimal AdamW step against the same step with a
whole setting applied (weight decay, an L1 proximal step in Adam's metric with its
strength on a schedule, label smoothing, an EMA of the weights), the two alternating.
Target (issue 14): <= 3% of the step. The bookkeeping costs per parameter (the proximal
step and the EMA each pass over the weights), the step per sample: the share falls as
the batch grows.

Run: ``python benchmarks/trainer.py`` (about two minutes).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from regdial import Applied, Regularization, build_model, fit, load_task
from regdial.training.metrics import evaluate


def minimal_loop(
    data, epochs: int, batch_size: int, lr: float, seed: int, evaluate_train: bool = True
) -> None:
    model = build_model("cnn", data, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps = math.ceil(len(data.x_train) / batch_size)
    total, step = epochs * steps, 0
    subset = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))[:2048]
    x_eval, y_eval = data.x_train[subset], data.y_train[subset]
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(
            len(data.x_train), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        )
        for rows in order.split(batch_size):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(model(data.x_train[rows]), data.y_train[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        device = torch.device("cpu")
        if evaluate_train:
            evaluate(
                model,
                [(x_eval[i : i + 1024], y_eval[i : i + 1024]) for i in range(0, len(x_eval), 1024)],
                10,
                device,
            )
        evaluate(
            model,
            [(data.x_val[i : i + 1024], data.y_val[i : i + 1024]) for i in range(0, len(data.x_val), 1024)],
            10,
            device,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    data = load_task("digits")
    setting = Regularization.off()
    batch_size, lr, seed = 32, 1e-3, 0

    runs = {
        "minimal loop": lambda: minimal_loop(data, args.epochs, batch_size, lr, seed),
        "fit, in memory": lambda: fit(
            data, setting, epochs=args.epochs, batch_size=batch_size, lr=lr, seed=seed, progress=False
        ),
        "fit, run directory": lambda: _fit_to_disk(data, setting, args.epochs, batch_size, lr, seed),
        "minimal loop, no train eval": lambda: minimal_loop(
            data, args.epochs, batch_size, lr, seed, evaluate_train=False
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm up: imports, allocator
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / args.epochs)
    reference = times["minimal loop"]
    print(
        f"digits, cnn, {len(data.x_train)} training images, batch {batch_size}, {args.epochs} epochs x {args.repeats}"
    )
    print(f"{'':<30}{'s/epoch':>9}{'vs minimal loop':>18}")
    for name, values in times.items():
        # Each repeat's ratio to the minimal loop of the same repeat, so drift of the
        # machine's speed between repeats cancels; then the median over repeats.
        ratio = statistics.median(v / r for v, r in zip(values, reference, strict=True))
        print(f"{name:<30}{statistics.median(values):9.4f}{(ratio - 1) * 100:+17.1f}%")
    print("\nTarget: fit's overhead <= 5% with regularization off. The last row is the minimal loop without")
    print("the clean train-set evaluation that fit's learning curves use (its cost is not overhead).")
    for batch in (256, 1024):
        bookkeeping(args.repeats, batch=batch)
    fused_bookkeeping(args.repeats * 2)


def _mid_model():
    from torch import nn

    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(12):
        blocks += [nn.Linear(256, 1024), nn.LayerNorm(1024), nn.Linear(1024, 256), nn.LayerNorm(256)]
    return nn.Sequential(*blocks, nn.Linear(256, 10))


def _typical_setting() -> Regularization:
    from regdial import schedules

    return Regularization(weight_decay=0.01, l1=schedules.Linear(0.0, 1e-6), label_smoothing=0.1, ema=0.999)


def bookkeeping(repeats: int, steps: int = 20, batch: int = 256) -> None:
    """Per-step cost of a whole Regularization next to the step it regularizes."""
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 256, generator=generator), torch.randint(0, 10, (batch,), generator=generator)
    plain = _mid_model()
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=0.01)
    setting = _typical_setting()
    regularized = _mid_model()
    applied = Applied(
        setting, regularized, lambda groups: torch.optim.AdamW(groups, lr=1e-4), num_classes=10, fused=True
    )

    def minimal() -> None:
        for _ in range(steps):
            loss = F.cross_entropy(plain(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def with_setting() -> None:
        for step in range(steps):
            applied.set_progress(step / steps)
            inputs, targets = applied.batch(x, y)
            loss = applied.loss(regularized(inputs), targets) + applied.penalty()
            applied.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            applied.optimizer.step()

    for run in (minimal, with_setting):
        run()  # warm up: the optimizers' state, the EMA copy
    ratios, bare = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        minimal()
        middle = time.perf_counter()
        with_setting()
        end = time.perf_counter()
        ratios.append((end - middle) / (middle - start))
        bare.append((middle - start) / steps)
    direct = _bookkeeping_parts(applied, regularized, x, y, steps * repeats)
    step_ms = statistics.median(bare) * 1e3
    print(f"\nbookkeeping of {setting.active()} on 6.3M parameters, batch {batch}, {steps} steps x {repeats}")
    print(f"minimal AdamW step {step_ms:.1f} ms; with the setting "
          f"{(statistics.median(ratios) - 1) * 100:+.1f}% (target <= 3%)")  # fmt: skip
    total = sum(direct.values())
    parts = ", ".join(f"{name} {ms:.2f}" for name, ms in direct.items())
    print(
        f"timed directly: {total:.2f} ms a step = {100 * total / step_ms:.1f}% of the minimal step ({parts} ms)"
    )
    traffic = _traffic_floor(applied, steps * repeats)
    print(
        f"its memory traffic by bare foreach ops (the prox reads w and Adam's v and writes w; the EMA reads "
        f"its copy and w and writes its copy): {traffic:.2f} ms = {100 * traffic / step_ms:.1f}% of the step, "
        f"the bookkeeping {total / traffic:.2f}x that floor"
    )


def fused_bookkeeping(repeats: int, steps: int = 5, batch: int = 256) -> None:
    """The optimizer step of the typical setting timed in the loop (after each backward,
    its data out of cache as in training), like against like: torch's fastest CPU AdamW
    step (``fused=True``, one kernel a tensor) bare and with the setting's hooks (the prox,
    the EMA), and ``FusedAdamW(fused=True)``, which runs both in its own pass."""
    from regdial import FusedAdamW
    from regdial.blocks.fused import compile_seconds

    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 256, generator=generator), torch.randint(0, 10, (batch,), generator=generator)
    setting = _typical_setting()
    runs = {}
    plain = _mid_model()
    runs["AdamW(fused=True), bare"] = (
        plain,
        torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=0.01, fused=True),
    )
    for name, make in (
        ("AdamW(fused=True) + the hooks", lambda groups: torch.optim.AdamW(groups, lr=1e-4, fused=True)),
        ("FusedAdamW, all in its pass", lambda groups: FusedAdamW(groups, lr=1e-4, fused=True)),
    ):
        model = _mid_model()
        applied = Applied(setting, model, make, num_classes=10, fused=True)
        applied.set_progress(0.5)
        runs[name] = (model, applied.optimizer)
    before = sum(compile_seconds().values())
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in runs}
    for repeat in range(repeats + 2):  # two to warm up: state, the EMA copy, the compile
        for name, (model, optimizer) in runs.items():
            for _ in range(steps):
                start = time.perf_counter()
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                middle = time.perf_counter()
                optimizer.step()
                end = time.perf_counter()
                if repeat >= 2:
                    times[name][0].append(middle - start)
                    times[name][1].append(end - middle)
    compiled = sum(compile_seconds().values()) - before
    bare = statistics.median(times["AdamW(fused=True), bare"][1]) * 1e3
    whole = statistics.median(times["AdamW(fused=True), bare"][0]) * 1e3 + bare
    print(f"\nthe optimizer step in the loop, batch {batch}, {steps} steps x {repeats} (FusedAdamW compiled in "
          f"{compiled:.1f} s); a whole step (forward, backward, step) about {whole:.0f} ms")  # fmt: skip
    for name, (_, step_times) in times.items():
        ms = statistics.median(step_times) * 1e3
        print(
            f"  {name:<32} {ms:6.2f} ms   bookkeeping {ms - bare:+5.2f} ms = {100 * (ms - bare) / whole:+.1f}% of the step"
        )


def _bookkeeping_parts(applied, model, x, y, repeats: int) -> dict[str, float]:
    """Each piece of the bookkeeping timed on its own (medians, ms): the difference of two
    ~100 ms steps drifts by several percent on a shared machine, its parts do not. The
    optimizer's post-step hooks (the proximal step, the EMA) are called once more after a
    real step, which leaves the weights as good as they were."""
    from _timing import median_ms

    output = model(x).detach()
    optimizer = applied.optimizer
    loss = applied.loss(model(x), y) + applied.penalty()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    hooks = list(optimizer._optimizer_step_post_hooks.values())

    def run_hooks() -> None:
        for hook in hooks:
            hook(optimizer, (), {})

    return {
        "schedules": median_ms(lambda: applied.set_progress(0.5), repeats),
        "batch": median_ms(lambda: applied.batch(x, y), repeats),
        "loss": max(
            0.0,
            median_ms(lambda: applied.loss(output, y), repeats)
            - median_ms(lambda: F.cross_entropy(output, y), repeats),
        ),
        "penalty": median_ms(applied.penalty, repeats),
        "step hooks": median_ms(run_hooks, repeats),
    }


def _traffic_floor(applied, repeats: int) -> float:
    """What the step hooks' memory traffic costs at the least (ms): on copies of the
    weights, a ``maximum_`` with Adam's second moments (read two tensors, write one: the
    prox's traffic) and a ``lerp_`` of a third copy toward them (the EMA's)."""
    from _timing import median_ms

    optimizer = applied.optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    weights = [p.detach().clone() for p in params]
    moments = [optimizer.state[p]["exp_avg_sq"].clone() for p in params]
    average = [w.clone() for w in weights]
    prox = median_ms(lambda: torch._foreach_maximum_(weights, moments), repeats)
    ema = median_ms(lambda: torch._foreach_lerp_(average, weights, 1e-3), repeats)
    return prox + ema


def _fit_to_disk(data, setting, epochs: int, batch_size: int, lr: float, seed: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        fit(
            data,
            setting,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            run_dir=directory,
            progress=False,
        )


if __name__ == "__main__":
    main()
