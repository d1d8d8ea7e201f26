"""Where a GSA-ResNet's training step goes beyond its convolutional twin's, block by block.

The twins differ only in each bottleneck's spatial operator (``conv2``: a 3x3 convolution, or a GSA
module). This benchmark takes each one out and times it alone, on the input it sees inside the net, and
times both whole training steps; all interleaved in one process, the order rotated each round (a drift
of the machine's speed falls on every variant alike):

- ``block`` rows: one spatial operator's forward+backward (train mode, the sum of its output as the loss,
  input gradients included; batch ``--batch``), conv and GSA, with the multiply-adds each counts for one
  image (``*_macs``: fvcore, forward, ``gsa_cli.bench.macs``). ``per_mac`` is GSA's time per
  multiply-add over the convolution's: 1.0 means GSA costs what its MACs say, at the convolution's speed.
- For a stride-2 block, ``pool_first``: the same GSA module run after the 2x2 average pool instead of
  before it, at the output resolution (span = the output size). **Not the spec's network** (GSA.md 2 pools
  after the module, SASA's convention): it measures what that order costs.
- ``sum`` rows: the blocks' totals by stride; ``step`` rows: a whole training step of each twin (forward,
  cross-entropy, backward, SGD update), and of the GSA net with every stride-2 module pooled first; the
  ``rest`` row: the step's GSA-minus-conv difference that the spatial operators do not account for.

Every time is the median over ``--rounds`` rounds of each round's median of ``--iters`` timed steps
(after one untimed step); ``cpu_wait_pct`` is the largest share of a timing's wall time during which
some task waited for a CPU (Linux PSI; near 0 on a quiet machine).

    python benchmarks/bench_blocks.py --preset imagenet50 --batch 8 --rounds 5 \
        --out benchmarks/results/bench_blocks_cpu_fp32_imagenet50_b8.csv
    python benchmarks/bench_blocks.py --preset digits --batch 64 --rounds 8 --iters 5 --step-iters 5 \
        --out benchmarks/results/bench_blocks_cpu_fp32_digits_b64.csv
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsa_cli import load_preset
from gsa_cli.bench.macs import count_macs
from gsa_cli.bench.profile import at_image_size
from gsa_cli.bench.timers import cpu_wait, time_steps
from gsa_cli.config import Config
from gsa_cli.models import build_model
from gsa_cli.models.gsa import GlobalSelfAttention2d
from gsa_cli.report.tables import write as write_table

CPU = torch.device("cpu")


def pooled_first(module: GlobalSelfAttention2d, size: int) -> nn.Module:
    """``module``'s stride-2 operator in the other order: the 2x2 average pool, then GSA at stride 1."""
    out_size = (size + 1) // 2  # the ceil-mode pool's output, as the module's own pool gives
    gsa = GlobalSelfAttention2d(
        module.in_channels,
        module.out_channels,
        heads=module.heads,
        key_channels=module.key_channels,
        span=min(module.span, out_size),
        content=module.content,
        positional=module.positional,
        query_softmax=module.query_softmax,
        implementation=module.implementation,
    )
    return nn.Sequential(nn.AvgPool2d(2, ceil_mode=True), gsa)


def spatial_operators(model: nn.Module) -> dict[str, nn.Module]:
    """Each bottleneck's spatial operator by name (``layer1.0.conv2``...)."""
    return {
        name: module
        for name, module in model.named_modules()
        if name.startswith("layer") and name.endswith(".conv2")
    }


def operator_inputs(model: nn.Module, images: Tensor) -> dict[str, Tensor]:
    """The input each spatial operator sees in one forward pass of ``model`` (train mode, no grad)."""
    seen: dict[str, Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, args[0].clone()))
        for name, module in spatial_operators(model).items()
    ]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return seen


def module_step(module: nn.Module, x: Tensor) -> Callable[[], None]:
    x = x.detach().requires_grad_(True)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).sum().backward()

    return step


def training_step(model: nn.Module, images: Tensor, labels: Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay as they are

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def macs_per_image(module: nn.Module, x: Tensor) -> int:
    """Forward multiply-adds of ``module`` for one image of ``x``'s (square) shape."""
    return count_macs(module, img_size=x.shape[-1], channels=x.shape[1]).total


def interleaved(steps: dict[str, Callable[[], None]], rounds: int, iters: int) -> dict[str, float]:
    """Each step's median ms over ``rounds`` rounds, the order rotated each round; and the worst CPU wait."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    waits: list[float] = []
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            with cpu_wait() as wait:
                seconds = time_steps(steps[name], device=CPU, warmup=1, iters=iters)
            times[name].append(statistics.median(seconds) * 1000)
            waits.extend(wait)
    result = {name: statistics.median(values) for name, values in times.items()}
    result["cpu_wait_pct"] = max(waits) if waits else float("nan")
    return result


def configs(preset: str, img_size: int | None) -> dict[str, Config]:
    """The preset's two twins, at ``img_size`` where given (GSA stays global)."""
    result = {}
    for kind in ("conv", "gsa"):
        config = load_preset(preset, model=kind)
        result[kind] = config if img_size is None else at_image_size(config, img_size)
    return result


def built(config: Config) -> nn.Module:
    torch.manual_seed(0)
    return build_model(config).train()


def block_rows(
    nets: dict[str, nn.Module], inputs: dict[str, dict[str, Tensor]], args: argparse.Namespace
) -> list[dict[str, object]]:
    operators = {kind: spatial_operators(net) for kind, net in nets.items()}
    rows: list[dict[str, object]] = []
    for name, gsa in operators["gsa"].items():
        assert isinstance(gsa, GlobalSelfAttention2d), f"{name} is not a GSA module"
        conv, x = operators["conv"][name], inputs["gsa"][name]
        variants: dict[str, tuple[nn.Module, Tensor]] = {"conv": (conv, inputs["conv"][name])}
        variants["gsa"] = (gsa, x)
        if gsa.stride == 2 and not args.no_pool_first:
            variants["pool_first"] = (pooled_first(gsa, x.shape[-1]).train(), x)
        timed = interleaved({k: module_step(m, t) for k, (m, t) in variants.items()}, args.rounds, args.iters)
        row: dict[str, object] = {"kind": "block", "name": name, "stride": gsa.stride}
        row["input"] = "x".join(str(n) for n in x.shape[1:])
        for key, (module, tensor) in variants.items():
            row[f"{key}_macs"] = macs_per_image(module, tensor)
            row[f"{key}_ms"] = round(timed[key], 2)
        row["cpu_wait_pct"] = round(timed["cpu_wait_pct"], 2)
        rows.append(row)
        print(row, flush=True)
    return rows


def step_rows(
    nets: dict[str, nn.Module],
    gsa_config: Config,
    gsa_inputs: dict[str, Tensor],
    batch: tuple[Tensor, Tensor],
    args: argparse.Namespace,
) -> list[dict[str, object]]:
    models = dict(nets)
    if not args.no_pool_first:
        variant = built(gsa_config)
        for name, module in spatial_operators(variant).items():
            if isinstance(module, GlobalSelfAttention2d) and module.stride == 2:
                variant.set_submodule(name, pooled_first(module, gsa_inputs[name].shape[-1]).train())
        models["pool_first"] = variant
    steps = {kind: training_step(model, *batch) for kind, model in models.items()}
    timed = interleaved(steps, args.rounds, args.step_iters)
    row: dict[str, object] = {"kind": "step", "name": "training step"}
    for kind in models:
        row[f"{kind}_ms"] = round(timed[kind], 2)
    row["cpu_wait_pct"] = round(timed["cpu_wait_pct"], 2)
    print(row, flush=True)
    return [row]


def summary_rows(blocks: list[dict[str, object]], step: dict[str, object]) -> list[dict[str, object]]:
    table = pd.DataFrame(blocks)
    rows: list[dict[str, object]] = []
    for stride, group in table.groupby("stride"):
        rows.append({
            "kind": "sum", "name": f"stride-{stride} blocks", "stride": stride,
            "conv_macs": group["conv_macs"].sum(), "gsa_macs": group["gsa_macs"].sum(),
            "conv_ms": round(group["conv_ms"].sum(), 2), "gsa_ms": round(group["gsa_ms"].sum(), 2),
        })  # fmt: skip
        if "pool_first_ms" in group and group["pool_first_ms"].notna().any():
            rows[-1]["pool_first_macs"] = group["pool_first_macs"].sum()
            rows[-1]["pool_first_ms"] = round(group["pool_first_ms"].sum(), 2)
    blocks_delta = float(table["gsa_ms"].sum() - table["conv_ms"].sum())
    step_delta = float(step["gsa_ms"]) - float(step["conv_ms"])  # type: ignore[arg-type]
    rows.append({"kind": "rest", "name": "step difference outside the spatial operators",
                 "gsa_ms": round(step_delta - blocks_delta, 2)})  # fmt: skip
    return rows


def ratios(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    table["time_ratio"] = (table["gsa_ms"] / table["conv_ms"]).round(3)
    if "conv_macs" in table:
        table["mac_ratio"] = (table["gsa_macs"] / table["conv_macs"]).round(3)
        table["per_mac"] = (table["time_ratio"] / table["mac_ratio"]).round(3)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="imagenet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, help="the preset's by default")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every variant in turn")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per block variant and round")
    parser.add_argument("--step-iters", type=int, default=2, help="timed training steps per round")
    parser.add_argument("--no-pool-first", action="store_true", help="skip the pool-first variant")
    parser.add_argument("--out", type=Path, help="file for the table: .csv, .json or .md")
    args = parser.parse_args()
    twin_configs = configs(args.preset, args.img_size)
    nets = {kind: built(config) for kind, config in twin_configs.items()}
    data = twin_configs["gsa"].data
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, data.channels, data.img_size, data.img_size, generator=generator)
    labels = torch.randint(0, data.num_classes, (args.batch,), generator=generator)
    inputs = {kind: operator_inputs(net, images) for kind, net in nets.items()}
    blocks = block_rows(nets, inputs, args)
    step = step_rows(nets, twin_configs["gsa"], inputs["gsa"], (images, labels), args)[0]
    table = ratios(pd.DataFrame([*blocks, *summary_rows(blocks, step), step]))
    table["stride"] = table["stride"].astype("Int64")
    for column in [c for c in table.columns if c.endswith("_macs")]:
        table[column] = table[column].astype("Int64")
    table.insert(2, "preset", args.preset)
    table.insert(3, "batch", args.batch)
    table["img_size"] = data.img_size
    table["torch"] = torch.__version__
    table["threads"] = torch.get_num_threads()
    table = table[[c for c in table.columns if c != "cpu_wait_pct"] + ["cpu_wait_pct"]]
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.drop(columns=["torch", "threads", "preset"]).to_string(index=False))
    if args.out is not None:
        print(f"wrote {write_table(table, args.out)}")


if __name__ == "__main__":
    main()
