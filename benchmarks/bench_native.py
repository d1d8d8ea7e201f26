"""The native GSA kernel against its rivals: one module, forward+backward, at GSA-ResNet-50's stage shapes.

Issue 14's acceptance benchmark. At each stage shape of GSA-ResNet-50 at 224 px (56x56x64, 28x28x128,
14x14x256, 7x7x512), batch 8, 8 heads, float32 on the CPU, the implementations are timed **interleaved
in one process** (a drift of the machine's speed falls on all of them alike):

- ``native``: ``GlobalSelfAttention2d(implementation="native")``: each axial pass and the content branch
  as the fused C++ kernels of ``gsa_cli/models/csrc/axial.cpp`` and ``content.cpp``;
- ``gemm``: the batched-GEMM implementation of ``gsa_cli/models/gsa_kernels.py`` (issue 6's module);
- ``einsum``: the reference, ``implementation="reference"``: plain einsums, autograd keeping the logits
  (the baseline of the targets);
- ``conv3x3``: the 3x3 convolution GSA replaces;
- ``qkv1x1``: the module's 1x1 projection to queries, keys and values alone: the floor under every
  implementation's time.

Each round runs every implementation in turn (the order rotated from round to round): one untimed
step, then ``--iters`` timed ones, each to its end (``gsa_cli.bench.timers.time_steps``). Reported: the
median and interquartile range over all rounds, of the forward pass (eval, ``torch.inference_mode``)
and of forward+backward (train mode, the sum of the output as the loss, input gradients included).
Before timing, the native module's output and gradients are checked against gemm's (same weights):
the benchmark never times a wrong kernel.

Peak memory of one forward+backward, each implementation and shape in a fresh process: the rise of the
process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) over its resident set
after one step whose gradients are dropped, glibc's mmap threshold fixed so that freed tensors leave the
resident set (the method of ``bench_gsa.py``).

Recorded beside the numbers: the machine (CPU model, cores, torch's threads), torch's version, the
kernel's instruction set and build time, and the CPU wait of each implementation's timing, read from
``/proc/pressure/cpu`` (Linux PSI; near 0 on a quiet machine: tens of % means the numbers are not to be
trusted).

    python benchmarks/bench_native.py --out benchmarks/results/bench_native_cpu_fp32_b8.csv
    python benchmarks/bench_native.py --stages 1 --rounds 1 --iters 1   # a smoke run
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gsa_cli.bench.timers import cpu_wait, time_steps  # noqa: E402
from gsa_cli.models import gsa_native  # noqa: E402
from gsa_cli.models.gsa import GlobalSelfAttention2d, Implementation  # noqa: E402

STAGES = [(56, 64), (28, 128), (14, 256), (7, 512)]
IMPLEMENTATIONS = ["native", "gemm", "einsum", "conv3x3", "qkv1x1"]
GSA_IMPLEMENTATION: dict[str, Implementation] = {"native": "native", "gemm": "gemm", "einsum": "reference"}


def build(name: str, channels: int, size: int, heads: int) -> nn.Module:
    """One implementation's module, seeded alike (the GSA ones share their weights)."""
    torch.manual_seed(0)
    if name in GSA_IMPLEMENTATION:
        return GlobalSelfAttention2d(
            channels, channels, heads=heads, span=size, implementation=GSA_IMPLEMENTATION[name]
        )
    if name == "conv3x3":
        return nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    if name == "qkv1x1":
        return GlobalSelfAttention2d(channels, channels, heads=heads, span=size).qkv
    raise ValueError(name)


def _summary(seconds: list[float]) -> tuple[float, float]:
    """Median and interquartile range, in ms."""
    if len(seconds) < 2:
        return seconds[0] * 1e3, 0.0
    quartiles = statistics.quantiles(seconds, n=4, method="inclusive")
    return statistics.median(seconds) * 1e3, (quartiles[2] - quartiles[0]) * 1e3


def _check_native(size: int, channels: int, heads: int, batch: int) -> float:
    """The largest relative difference between native and gemm (output, input and weight gradients)."""
    native, gemm = build("native", channels, size, heads), build("gemm", channels, size, heads)
    x = torch.randn(batch, channels, size, size)
    worst = 0.0
    results = []
    for module in (native, gemm):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        out.square().sum().backward()
        assert xi.grad is not None
        results.append([out.detach(), xi.grad, *(p.grad for p in module.parameters())])
    for mine, theirs in zip(*results, strict=True):
        scale = float(theirs.abs().max()) or 1.0
        worst = max(worst, float((mine - theirs).abs().max()) / scale)
    return worst


class Turn:
    """One implementation at one shape: its module, its input, and the steps it times."""

    def __init__(self, name: str, size: int, channels: int, args: argparse.Namespace) -> None:
        self.name = name
        self.module = build(name, channels, size, args.heads)
        self.x = torch.randn(args.batch, channels, size, size)
        self.x_grad = self.x.clone().requires_grad_(True)
        self.fwd: list[float] = []
        self.fwd_bwd: list[float] = []
        self.waits: list[float] = []

    def forward(self) -> None:
        with torch.inference_mode():
            self.module(self.x)

    def train_step(self) -> None:
        self.module.zero_grad(set_to_none=True)
        self.x_grad.grad = None
        self.module(self.x_grad).sum().backward()

    def run(self, iters: int) -> None:
        device = torch.device("cpu")
        with cpu_wait() as wait:
            self.module.eval()
            self.fwd += time_steps(self.forward, device=device, warmup=1, iters=iters)
            self.module.train()
            self.fwd_bwd += time_steps(self.train_step, device=device, warmup=1, iters=iters)
        self.waits += wait


def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_worker(name: str, size: int, channels: int, args: argparse.Namespace) -> float:
    """Peak memory (MiB) of one forward+backward in this (fresh) process, above the steady state."""
    turn = Turn(name, size, channels, args)
    turn.module.train()
    turn.train_step()  # one-time allocations (thread pools, kernel caches) are not the step's
    turn.module.zero_grad(set_to_none=True)
    turn.x_grad.grad = None
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5", encoding="ascii")  # VmHWM := VmRSS
    turn.train_step()
    return (_status_kib("VmHWM") - before) / 1024


def _memory_in_child(name: str, size: int, channels: int, args: argparse.Namespace) -> float | None:
    command = [sys.executable, __file__, "--memory-worker", f"{name},{size},{channels}"]
    command += ["--batch", str(args.batch), "--heads", str(args.heads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors leave the resident set
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        print(f"memory of {name} at {size}x{size}x{channels} failed: {result.stderr.strip()[-300:]}")
        return None
    return float(result.stdout.strip().splitlines()[-1])


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    state = gsa_native.kernel_state()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "host": platform.node(),
        "kernel_variant": state.variant,
        "kernel_build_s": state.build_seconds,
        "compiler": state.compiler,
    }


def measure_stage(
    size: int, channels: int, args: argparse.Namespace, names: list[str]
) -> list[dict[str, object]]:
    """Every implementation at one shape, interleaved; then each one's memory in a fresh process."""
    if "native" in names:
        error = _check_native(size, channels, args.heads, min(args.batch, 2))
        assert error < 1e-4, f"native differs from gemm by {error:.2e} at {size}x{size}x{channels}"
    turns = [Turn(name, size, channels, args) for name in names]
    for turn in turns:  # warm-up: first calls (kernel build and load, thread pools, allocator)
        turn.run(1)
        turn.fwd.clear(), turn.fwd_bwd.clear(), turn.waits.clear()
    for round_ in range(args.rounds):
        shift = round_ % len(turns)
        for turn in turns[shift:] + turns[:shift]:
            turn.run(args.iters)
    rows = []
    for turn in turns:
        fwd, fwd_iqr = _summary(turn.fwd)
        fwd_bwd, fwd_bwd_iqr = _summary(turn.fwd_bwd)
        row: dict[str, object] = {
            "shape": f"{size}x{size}x{channels}",
            "impl": turn.name,
            "batch": args.batch,
            "fwd_ms": fwd,
            "fwd_iqr_ms": fwd_iqr,
            "fwd_bwd_ms": fwd_bwd,
            "fwd_bwd_iqr_ms": fwd_bwd_iqr,
            "steps": len(turn.fwd_bwd),
            "cpu_wait_pct": max(turn.waits) if turn.waits else None,
        }
        if args.memory:
            row["peak_mib"] = _memory_in_child(turn.name, size, channels, args)
        rows.append(row)
    return rows


def _ratios(rows: list[dict[str, object]]) -> None:
    """Each row's time and memory as a fraction of the einsum baseline's and the 3x3 conv's, in place."""
    by = {(row["shape"], row["impl"]): row for row in rows}
    for row in rows:
        for base, column, key in (
            ("einsum", "fwd_bwd_ms", "time_vs_einsum"),
            ("einsum", "peak_mib", "memory_vs_einsum"),
            ("conv3x3", "fwd_bwd_ms", "time_vs_conv3x3"),
        ):
            other = by.get((row["shape"], base))
            mine = row.get(column)
            theirs = other.get(column) if other else None
            row[key] = (
                mine / theirs if isinstance(mine, float) and isinstance(theirs, float) and theirs else None
            )


def _geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def report(rows: list[dict[str, object]], facts: dict[str, object]) -> None:
    """The table, the geometric means and the issue's targets."""
    print(
        f"\n{facts['cpu']}, {facts['cores']} cores, {facts['threads']} threads, torch {facts['torch']}, "
        f"fp32; native kernel {facts['kernel_variant']}, built in {facts['kernel_build_s']} s"
    )
    header = (
        "shape",
        "impl",
        "fwd ms",
        "fwd+bwd ms (IQR)",
        "peak MiB",
        "t/einsum",
        "mem/einsum",
        "t/conv3x3",
        "cpu wait %",
    )
    print(" | ".join(header))

    def text(value: object, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    for row in rows:
        print(
            " | ".join(
                [
                    str(row["shape"]),
                    str(row["impl"]),
                    text(row["fwd_ms"], 1),
                    f"{text(row['fwd_bwd_ms'], 1)} ({text(row['fwd_bwd_iqr_ms'], 1)})",
                    text(row.get("peak_mib"), 1),
                    text(row["time_vs_einsum"]),
                    text(row["memory_vs_einsum"]),
                    text(row["time_vs_conv3x3"]),
                    text(row["cpu_wait_pct"], 1),
                ]
            )
        )
    for impl in ("native", "gemm"):
        mine = [row for row in rows if row["impl"] == impl]
        for key, target in (("time_vs_einsum", 0.4), ("memory_vs_einsum", 0.5)):
            values = [float(row[key]) for row in mine if isinstance(row[key], float)]  # type: ignore[arg-type]
            if values and len(values) == len(mine):
                mean = _geometric_mean(values)
                met = "met" if impl == "native" and mean <= target else "not met" if impl == "native" else ""
                shapes = f"geometric mean over {len(values)} shapes"
                print(f"{impl} {key}: {shapes} {mean:.3f} (target <= {target}) {met}")
    for row in rows:
        if row["impl"] == "native" and row["shape"] in ("56x56x64", "28x28x128") and row["time_vs_conv3x3"]:
            target = 2.0 if row["shape"] == "56x56x64" else 1.2
            ratio = float(row["time_vs_conv3x3"])  # type: ignore[arg-type]
            print(
                f"native vs conv3x3 at {row['shape']}: {ratio:.2f}x (target <= {target}) "
                f"{'met' if ratio <= target else 'not met'}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every implementation in turn")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per implementation and round")
    parser.add_argument("--stages", default="1,2,3,4", help="comma list of ResNet-50 stages (1-4)")
    parser.add_argument("--impl", default=",".join(IMPLEMENTATIONS), help="comma list of implementations")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory processes")
    parser.add_argument("--out", type=Path, default=None, help="CSV file for the rows (a .json beside it)")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_worker:
        name, size, channels = args.memory_worker.split(",")
        print(memory_worker(name, int(size), int(channels), args))
        return

    state = gsa_native.build()
    if state.error is not None:
        raise SystemExit(f"the native kernel did not build: {state.error}")
    names = args.impl.split(",")
    rows: list[dict[str, object]] = []
    for stage in (int(s) for s in args.stages.split(",")):
        size, channels = STAGES[stage - 1]
        for row in measure_stage(size, channels, args, names):
            rows.append(row)
            print(json.dumps(row), flush=True)
    for row in rows:
        row.setdefault("peak_mib", None)
    _ratios(rows)
    facts = machine()
    report(rows, facts)
    if args.out is not None:
        import csv

        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=[*rows[0].keys(), *facts.keys()])
            writer.writeheader()
            writer.writerows({**row, **facts} for row in rows)
        args.out.with_suffix(".json").write_text(
            json.dumps({"machine": facts, "rows": rows}, indent=2) + "\n"
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
