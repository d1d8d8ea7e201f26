"""Time and memory of one GSA module at the shapes of GSA-ResNet-50's stages, against its rivals.

For each stage shape (56x56x64, 28x28x128, 14x14x256, 7x7x512 at 224 px) and each implementation:

- ``gsa``: ``gsa_cli.models.GlobalSelfAttention2d`` (the project's module);
- ``einsum``: the module's reference implementation, ``GlobalSelfAttention2d(implementation="reference")``:
  the obvious form of the same equations, the relative tables laid out per (query, key) pair by one
  gather, then one einsum for the logits and one for the sum, with autograd storing the logits (the
  baseline of the speed targets);
- ``onehot``: as the only public implementation does it: relative logits against all ``2L-1`` offsets,
  moved to absolute positions by an einsum with a one-hot ``(S, S, 2L-1)`` tensor built on every call
  (the content branch is the reference's);
- ``conv3x3``: the 3x3 convolution that GSA replaces;
- ``qkv1x1``: the 1x1 projection to queries, keys and values alone, which ``gsa``, ``einsum`` and
  ``onehot`` all run first: the floor under their times;
- ``dense``: global multi-head self-attention over all positions, the project's
  ``FullSelfAttention2d`` (``scaled_dot_product_attention`` with contiguous q, k, v, after a 1x1
  projection).

Every implementation gets the same input (random normal, not zeros), the same channels and heads.
Time: median and interquartile range over ``--iters`` timed iterations after ``--warmup``, device
synchronised, of the forward pass (``torch.inference_mode``, eval) and of forward+backward (train
mode, a sum of the outputs as the loss, input gradients included). Peak memory, of the second
forward+backward in a fresh process (the first one, whose gradients are then dropped, pays the
one-time allocations of kernel caches and thread pools), measured by ``gsa_cli.bench.timers.peak_memory``
(which also times ``gsa profile``): on CUDA ``torch.cuda.max_memory_allocated`` minus the memory held
before; on CPU the rise of the process's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs`` after a ``gc.collect`` and ``malloc_trim``) over its resident set before, with
glibc's mmap threshold fixed so that freed tensors leave the resident set. Timed with
``gsa_cli.bench.timers.time_steps``; ``cpu_wait_pct`` is the most any of an implementation's timing
processes competed for the CPUs (``gsa_cli.bench.timers.cpu_wait``, Linux PSI): near 0 on an idle machine.

With ``--precision bf16`` (or ``fp16``) every implementation runs under autocast with float32
weights, as ``gsa train --precision`` does; ``--channels-last`` gives the module and its input the
channels-last memory format; ``--compile`` times ``torch.compile`` of each module (the warm-up
iterations pay the compilation). Each row records the precision, layout and compilation it ran with.

    python benchmarks/bench_gsa.py --batch 8 --out benchmarks/results/bench_gsa_cpu.csv
    python benchmarks/bench_gsa.py --device cuda --precision bf16 --channels-last --batch 32 \
        --out benchmarks/results/bench_gsa_cuda_bf16_b32.csv
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gsa_cli.bench.timers import cpu_wait, peak_memory, time_steps  # noqa: E402
from gsa_cli.models.full import FullSelfAttention2d  # noqa: E402
from gsa_cli.models.gsa import GlobalSelfAttention2d, content_attention, relative_index  # noqa: E402
from gsa_cli.report.tables import write as write_table  # noqa: E402
from gsa_cli.runtime import Precision, autocast, device_name, synchronize  # noqa: E402

STAGES = [(56, 64), (28, 128), (14, 256), (7, 512)]
IMPLEMENTATIONS = ["gsa", "einsum", "onehot", "conv3x3", "qkv1x1", "dense"]


class OneHotGSA(nn.Module):
    """GSA with the positional branch as the only public implementation writes it: relative logits
    against every offset, moved to absolute positions by a one-hot tensor built on every call; the
    content branch is the module's reference. Autograd keeps the logits for backward."""

    def __init__(self, channels: int, heads: int, span: int) -> None:
        super().__init__()
        self.reference = GlobalSelfAttention2d(channels, channels, heads=heads, span=span)

    def _axial(self, q: Tensor, v: Tensor, table: Tensor) -> Tensor:
        """One pass along the third axis of ``q (B, h, d, A, O)`` and ``v (B, h, c, A, O)``."""
        module = self.reference
        size, span = q.shape[3], module.span
        per_head = table.unflatten(-1, (module.heads, -1))  # (2L-1, h, d)
        index = relative_index(size, span, device=q.device)  # (a, i)
        relative = torch.einsum("Bhdab,rhd->Bhabr", q, per_head)  # (B, h, a, O, 2L-1)
        onehot = F.one_hot(index, 2 * span).to(q.dtype)[..., : 2 * span - 1]  # (a, i, r)
        logits = torch.einsum("Bhabr,air->Bhabi", relative, onehot)  # (B, h, a, O, i)
        return torch.einsum("Bhabi,Bhcib->Bhcab", logits, v)  # (B, h, c, a, O)

    def forward(self, x: Tensor) -> Tensor:
        module = self.reference
        batch, _, height, width = x.shape
        dk, dv = module.key_channels, module.out_channels
        q, k, v = module.qkv(x).split((dk, dk, dv), dim=1)
        q, k, v = (t.unflatten(1, (module.heads, -1)) for t in (q, k, v))  # (B, h, d, H, W)
        content = content_attention(q.flatten(3), k.flatten(3), v.flatten(3), query_softmax=False)
        y = self._axial(q, v, module.rel_col)  # column pass
        y = module.bn(y.reshape(batch, dv, height, width)).unflatten(1, (module.heads, -1))
        positional = self._axial(q.transpose(-1, -2), y.transpose(-1, -2), module.rel_row).transpose(-1, -2)
        return (content.unflatten(-1, (height, width)) + positional).reshape(batch, dv, height, width)


def build(name: str, channels: int, size: int, heads: int) -> nn.Module:
    if name == "gsa":
        return GlobalSelfAttention2d(channels, channels, heads=heads, span=size)
    if name == "einsum":
        return GlobalSelfAttention2d(channels, channels, heads=heads, span=size, implementation="reference")
    if name == "onehot":
        return OneHotGSA(channels, heads, size)
    if name == "conv3x3":
        return nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    if name == "qkv1x1":
        return GlobalSelfAttention2d(channels, channels, heads=heads, span=size).qkv
    if name == "dense":
        return FullSelfAttention2d(channels, channels, heads=heads)
    raise ValueError(name)


def _summary(times: list[float]) -> tuple[float, float]:
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times) * 1e3, (quartiles[2] - quartiles[0]) * 1e3


def _resident_kib() -> int:
    """The process's resident set size, in KiB."""
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("VmRSS not in /proc/self/status")


def measure(name: str, size: int, channels: int, args: argparse.Namespace) -> dict[str, object]:
    """One (implementation, shape) measurement in this process."""
    device = torch.device(args.device)
    precision = Precision(args.precision)
    torch.manual_seed(0)
    module = build(name, channels, size, args.heads).to(device)
    x = torch.randn(args.batch, channels, size, size, device=device)
    if args.channels_last:
        module, x = module.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    model: Callable[[Tensor], Tensor] = torch.compile(module) if args.compile else module
    row: dict[str, object] = {"impl": name, "shape": f"{size}x{size}x{channels}", "batch": args.batch}

    def forward() -> None:
        with autocast(device, precision):
            model(x)

    def train_step() -> None:
        module.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = model(x).float().sum()
        loss.backward()

    with torch.no_grad(), autocast(device, precision):
        row["out_dtype"] = str(model(x).dtype).removeprefix("torch.")  # what autocast made of it
    if args.memory:
        module.train()
        x.requires_grad_(True)
        # Steady state: one step first, so that one-time allocations (kernel caches, thread pools,
        # the autograd engine's) are not counted; its gradients are dropped, as a training loop does.
        train_step()
        module.zero_grad(set_to_none=True)
        x.grad = None
        synchronize(device)
        with peak_memory(device) as peak:  # the peak is reset to what is held now
            before = (
                torch.cuda.memory_allocated(device) / 2**20
                if device.type == "cuda"
                else _resident_kib() / 1024
            )
            train_step()
            synchronize(device)
        reading = peak[0]  # the rise over what was held before the step (on the CPU: the process's peak)
        process = reading.process_mib
        row["peak_mem_mib"] = reading.peak_mib if process is None else process - before
        return row

    with cpu_wait() as wait:
        module.eval()
        with torch.inference_mode():
            row["fwd_times"] = time_steps(forward, device=device, warmup=args.warmup, iters=args.iters)
        module.train()
        x.requires_grad_(True)
        row["fwd_bwd_times"] = time_steps(train_step, device=device, warmup=args.warmup, iters=args.iters)
    row["cpu_wait_pct"] = wait[0] if wait else None
    return row


def _in_child(
    name: str, size: int, channels: int, args: argparse.Namespace, memory: bool
) -> dict[str, object]:
    command = [
        sys.executable,
        __file__,
        "--worker",
        f"{name},{size},{channels}",
        "--batch",
        str(args.batch),
        "--heads",
        str(args.heads),
        "--device",
        args.device,
        "--warmup",
        str(args.warmup),
        "--iters",
        str(args.iters),
        "--precision",
        args.precision,
        *(["--channels-last"] if args.channels_last else []),
        *(["--compile"] if args.compile else []),
    ]
    env = dict(os.environ)
    if memory:
        command.append("--memory")
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed tensors leave the resident set
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"impl": name, "shape": f"{size}x{size}x{channels}", "error": tail[0]}
    parsed: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    precisions = [p.value for p in Precision]
    parser.add_argument("--precision", choices=precisions, default="fp32", help="fp32, or bf16/fp16 autocast")
    parser.add_argument("--channels-last", action="store_true", help="channels-last module and input")
    parser.add_argument("--compile", action="store_true", help="time torch.compile of each module")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per implementation and shape")
    parser.add_argument("--impl", default=",".join(IMPLEMENTATIONS), help="comma list of implementations")
    parser.add_argument("--stages", default="1,2,3,4", help="comma list of ResNet-50 stages (1-4)")
    parser.add_argument("--out", type=Path, default=None, help="file for the results: .csv, .json or .md")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        name, size, channels = args.worker.split(",")
        print(json.dumps(measure(name, int(size), int(channels), args)))
        return

    import pandas as pd

    device = torch.device(args.device)
    rows = []
    names = args.impl.split(",")
    for stage in (int(s) for s in args.stages.split(",")):
        size, channels = STAGES[stage - 1]
        # Each implementation is timed in --repeats fresh processes, taken in turn, so that a drift in
        # the machine's speed over the minutes of a run falls on all of them alike; the iterations of
        # all its processes are pooled for the median and IQR.
        timings: dict[str, list[dict[str, object]]] = {name: [] for name in names}
        for _ in range(args.repeats):
            for name in names:
                timings[name].append(_in_child(name, size, channels, args, memory=False))
        for name in names:
            row: dict[str, object] = {"impl": name, "shape": f"{size}x{size}x{channels}", "batch": args.batch}
            errors = [str(t["error"]) for t in timings[name] if "error" in t]
            if errors:
                row["error"] = errors[0]
            else:
                for key in ("fwd", "fwd_bwd"):
                    pooled = [sec for t in timings[name] for sec in t[f"{key}_times"]]  # type: ignore[attr-defined]
                    row[f"{key}_ms"], row[f"{key}_iqr_ms"] = _summary(pooled)
                waits = [float(t["cpu_wait_pct"]) for t in timings[name] if t.get("cpu_wait_pct") is not None]  # type: ignore[arg-type]
                row["cpu_wait_pct"] = max(waits) if waits else None
            memory = _in_child(name, size, channels, args, memory=True)
            row.update({k: v for k, v in memory.items() if k not in row})
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = pd.DataFrame(rows)
    table["device"] = device_name(device)
    table["torch"] = torch.__version__
    table["precision"] = args.precision
    table["channels_last"] = args.channels_last
    table["compile"] = args.compile
    table["host"] = platform.node()
    baseline = table[table["impl"] == "einsum"].set_index("shape")
    for column in ("fwd_bwd_ms", "peak_mem_mib"):
        if column in table and not baseline.empty:
            table[f"{column}_vs_einsum"] = table[column] / table["shape"].map(baseline[column])
    conv = table[table["impl"] == "conv3x3"].set_index("shape")
    if "fwd_bwd_ms" in table and not conv.empty:
        table["fwd_bwd_vs_conv3x3"] = table["fwd_bwd_ms"] / table["shape"].map(conv["fwd_bwd_ms"])
    setting = ("device", "torch", "precision", "channels_last", "compile", "host")
    shown = [c for c in table.columns if c not in setting]
    layout = ", channels-last" if args.channels_last else ""
    compiled = ", torch.compile" if args.compile else ""
    print(
        f"\n{device_name(device)}, torch {torch.__version__}, {args.precision}{layout}{compiled}, "
        f"batch {args.batch}, heads {args.heads}"
    )
    print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    gsa = table[table["impl"] == "gsa"]
    for column in ("fwd_bwd_ms_vs_einsum", "peak_mem_mib_vs_einsum"):
        if column in gsa and gsa[column].notna().all() and len(gsa):
            geomean = float(gsa[column].prod() ** (1 / len(gsa)))
            print(f"gsa {column}: geometric mean over stages {geomean:.3f}")
    if args.out is not None:
        print(f"wrote {write_table(table, args.out)}")


if __name__ == "__main__":
    main()
