"""Interleaved A/B of the GSA module between two revisions of the package: the same harness, two trees.

Each side is a source tree: ``HEAD`` is this checkout, ``BASE`` a git worktree of ``--base`` made for
the run. Every measurement runs in a fresh process whose ``sys.path`` starts with one side's tree, so
``GlobalSelfAttention2d`` (default arguments: ``implementation="auto"`` where the side has the keyword)
comes from that side, while the timers are this checkout's ``gsa_cli/bench/timers.py`` loaded as a
file for both sides alike. Sides alternate ABBA pair by pair (so a drift of the machine's speed falls
on both), stages inside each process in turn; each process measures one stage:

- ``fwd_ms``: forward under ``torch.inference_mode`` in eval mode; ``fwd_bwd_ms``: forward+backward in
  train mode with a sum as the loss (input gradients included); medians over ``--iters`` steps after
  ``--warmup``, pooled over the pairs.
- ``peak_mib``: the rise of the process's peak resident set over the second forward+backward (the
  first pays one-time allocations), in a process of its own with glibc's mmap threshold fixed so that
  freed tensors leave the resident set (which slows large allocations: the timed processes keep
  glibc's defaults).
- ``cpu_wait_pct``: the share of the timed wall time during which some task waited for a CPU (Linux
  PSI): near 0 on a quiet machine.

    python benchmarks/ab_gsa.py --base 1301f13 --pairs 4 --out benchmarks/results/ab_gsa_layers.csv
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HEAD = Path(__file__).resolve().parent.parent
STAGES = {1: (56, 64), 2: (28, 128), 3: (14, 256), 4: (7, 512)}


def _timers() -> Any:
    """This checkout's timers module, loaded from its file (its own imports resolve on the side's tree)."""
    spec = importlib.util.spec_from_file_location("ab_timers", HEAD / "gsa_cli" / "bench" / "timers.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def worker(tree: Path, stage: int, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one stage of the module of ``tree`` in this process."""
    sys.path.insert(0, str(tree))
    import torch

    from gsa_cli.models.gsa import GlobalSelfAttention2d

    source = sys.modules[GlobalSelfAttention2d.__module__].__file__
    assert source is not None
    assert Path(source).resolve().is_relative_to(tree.resolve()), source
    timers = _timers()
    torch.manual_seed(0)
    size, channels = STAGES[stage]
    cpu = torch.device("cpu")
    module = GlobalSelfAttention2d(channels, channels, heads=args.heads, span=size)
    x = torch.randn(args.batch, channels, size, size)

    def forward() -> None:
        with torch.inference_mode():
            module(x)

    def train_step() -> None:
        module(x.requires_grad_()).sum().backward()
        module.zero_grad(set_to_none=True)
        x.grad = None

    module.train()
    if args.memory:  # a process of its own: the mmap threshold it needs slows the timed steps
        train_step()  # one-time allocations
        with timers.peak_memory(cpu) as peak:
            before = timers._read_status_kib("VmRSS") / 1024
            train_step()
        return {"peak_mib": peak[0].process_mib - before}  # the process's peak over its resident set then
    with timers.cpu_wait() as wait:
        fwd_bwd = timers.time_steps(train_step, device=cpu, warmup=args.warmup, iters=args.iters)
        module.eval()
        fwd = timers.time_steps(forward, device=cpu, warmup=args.warmup, iters=args.iters)
    return {"fwd_s": fwd, "fwd_bwd_s": fwd_bwd, "cpu_wait_pct": wait[0] if wait else None}


def _in_child(tree: Path, stage: int, args: argparse.Namespace, *, memory: bool) -> dict[str, Any]:
    command = [sys.executable, __file__, "--worker", f"{tree},{stage}"]
    command += ["--batch", str(args.batch), "--heads", str(args.heads)]
    command += ["--warmup", str(args.warmup), "--iters", str(args.iters)]
    env = dict(os.environ)
    if memory:
        command.append("--memory")
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # freed tensors leave the resident set
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    parsed: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


def _child(tree: Path, stage: int, args: argparse.Namespace) -> dict[str, Any]:
    """One stage of ``tree``'s module: timed in one fresh process, its memory measured in another."""
    return {**_in_child(tree, stage, args, memory=False), **_in_child(tree, stage, args, memory=True)}


def _rows(
    results: dict[tuple[str, int], list[dict[str, Any]]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    rows = []
    for (side, stage), runs in sorted(results.items()):
        size, channels = STAGES[stage]
        row: dict[str, Any] = {"side": side, "shape": f"{size}x{size}x{channels}", "batch": args.batch}
        for key in ("fwd", "fwd_bwd"):
            pooled = [s for run in runs for s in run[f"{key}_s"]]
            row[f"{key}_ms"] = 1e3 * statistics.median(pooled)
        row["peak_mib"] = statistics.median(float(run["peak_mib"]) for run in runs)
        waits = [float(run["cpu_wait_pct"]) for run in runs if run["cpu_wait_pct"] is not None]
        row["cpu_wait_pct_max"] = max(waits) if waits else None
        row["processes"] = len(runs)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="HEAD~1", help="the git revision to compare this checkout with")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--stages", default="1,2,3,4")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        tree, stage = args.worker.rsplit(",", 1)
        print(json.dumps(worker(Path(tree), int(stage), args)))
        return

    import pandas as pd

    stages = [int(s) for s in args.stages.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        git = ["git", "-C", str(HEAD), "worktree"]
        subprocess.run([*git, "add", "--detach", str(base), args.base], check=True)
        try:
            results: dict[tuple[str, int], list[dict[str, Any]]] = {}
            for pair in range(args.pairs):
                order = [("base", base), ("head", HEAD)]
                for side, tree in order if pair % 2 == 0 else order[::-1]:  # ABBA
                    for stage in stages:
                        results.setdefault((side, stage), []).append(_child(tree, stage, args))
        finally:
            subprocess.run([*git, "remove", "--force", str(base)], check=True)
    table = pd.DataFrame(_rows(results, args))
    base_rows = table[table["side"] == "base"].set_index("shape")
    for column in ("fwd_ms", "fwd_bwd_ms", "peak_mib"):
        table[f"{column}_vs_base"] = table[column] / table["shape"].map(base_rows[column])
    table["base"] = args.base
    table["host"] = platform.node()
    table["cpu"] = platform.processor() or platform.machine()
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
