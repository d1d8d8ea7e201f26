"""The module's fused training function against its branch-by-branch form, interleaved in one process.

Both sides run the same kernels in the same process: the fused side as shipped, the other with
``gsa_cli.models.gsa.fused_ready`` answering no (the module then runs its branches one by one, as
``gsa_cli/models/gsa_fused.py`` describes). Sides alternate round by round, starting side swapped each
round (so a drift of the machine's speed falls on both):

- ``module``: one module's forward+backward (train mode, a sum as the loss, input gradients included)
  at GSA-ResNet-50's four stage shapes (batch 8) and at the digits net's two largest (batch 64);
- ``step``: a whole training step (forward, cross-entropy, backward, an SGD update) of the digits preset's
  GSA net (batch 64, 16 px) and of GSA-ResNet-50 (batch 8, 224 px).

Each round times ``--iters`` steps after two untimed ones; a row gives each side's median over the
rounds, the median and range of the per-round ratios (fused over unfused) and ``cpu_wait_pct``, the share
of the wall time some task waited for a CPU (Linux PSI; near 0 on a quiet machine).

    python benchmarks/ab_fused.py --rounds 8 --out benchmarks/results/ab_fused_cpu.csv
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

import gsa_cli.models.gsa as gsa_module
from gsa_cli import load_preset
from gsa_cli.bench.timers import cpu_wait
from gsa_cli.models import build_model
from gsa_cli.models.gsa import GlobalSelfAttention2d
from gsa_cli.report.tables import write as write_table

FUSED = gsa_module.fused_ready
# (batch, channels, map side, heads, iterations per round)
MODULE_SHAPES = [(8, 64, 56, 8, 6), (8, 128, 28, 8, 12), (8, 256, 14, 8, 20), (8, 512, 7, 8, 25),
                 (64, 32, 16, 4, 20), (64, 64, 8, 4, 30)]  # fmt: skip
STEPS = [("digits", 64, 15), ("imagenet50", 8, 2)]  # preset, batch, iterations per round


def module_step(batch: int, channels: int, side: int, heads: int) -> Callable[[], None]:
    torch.manual_seed(0)
    module = GlobalSelfAttention2d(channels, channels, heads=heads, span=side).train()
    x = torch.randn(batch, channels, side, side, requires_grad=True)
    return lambda: module(x).sum().backward()


def training_step(preset: str, batch: int) -> Callable[[], None]:
    torch.manual_seed(0)
    config = load_preset(preset, model="gsa")
    model = build_model(config).train()
    size = config.data.img_size
    images = torch.randn(batch, config.data.channels, size, size)
    labels = torch.randint(0, config.data.num_classes, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def compare(name: str, step: Callable[[], None], iters: int, rounds: int) -> dict[str, object]:
    times: dict[str, list[float]] = {"unfused": [], "fused": []}
    waits: list[float] = []
    for r in range(rounds):
        for side in ("unfused", "fused") if r % 2 == 0 else ("fused", "unfused"):
            gsa_module.fused_ready = FUSED if side == "fused" else (lambda module, qkv: False)
            for _ in range(2):
                step()
            with cpu_wait() as wait:
                start = time.perf_counter()
                for _ in range(iters):
                    step()
                times[side].append((time.perf_counter() - start) / iters * 1000)
            waits.extend(wait)  # empty where Linux PSI is absent
    gsa_module.fused_ready = FUSED
    ratios = sorted(f / u for u, f in zip(times["unfused"], times["fused"], strict=True))
    return {
        "case": name,
        "unfused_ms": round(statistics.median(times["unfused"]), 2),
        "fused_ms": round(statistics.median(times["fused"]), 2),
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_min": round(ratios[0], 3),
        "ratio_max": round(ratios[-1], 3),
        "rounds": rounds,
        "cpu_wait_pct_max": round(max(waits), 2) if waits else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--only", choices=("module", "step"), help="one kind of case")
    parser.add_argument("--out", type=Path, help="file for the results: .csv, .json or .md")
    args = parser.parse_args()
    rows = []
    if args.only != "step":
        for batch, channels, side, heads, iters in MODULE_SHAPES:
            name = f"module {side}x{side}x{channels}, batch {batch}"
            rows.append(compare(name, module_step(batch, channels, side, heads), iters, args.rounds))
            print(rows[-1], flush=True)
    if args.only != "module":
        for preset, batch, iters in STEPS:
            name = f"step {preset}, batch {batch}"
            rows.append(compare(name, training_step(preset, batch), iters, max(2, args.rounds // 2)))
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    table["torch"] = torch.__version__
    table["threads"] = torch.get_num_threads()
    print(table.to_string(index=False))
    if args.out is not None:
        print(f"wrote {write_table(table, args.out)}")


if __name__ == "__main__":
    main()
