"""Where one training step's time goes: wall time, device-busy time, kernel launches and the top operators.

A step is forward, cross-entropy, backward and an SGD update of a preset's model on random images, in
train mode. It is timed over ``--steps`` steps after three untimed ones (device synchronised), then run
``--steps`` more times under ``torch.profiler``:

- ``wall ms/step``: the timed steps, without the profiler;
- ``device-busy ms/step``: the sum of the kernels' own times (``self_device_time_total``) on a GPU, or
  of the operators' own CPU times on the CPU, per step;
- ``launches/step``: kernel launches (``cudaLaunchKernel`` and its driver-API siblings) per step.

A wall time well above the device-busy time means the host (Python, dispatch, launches) sets the pace.

    python benchmarks/gpu_step_profile.py --preset imagenet50 --model gsa --batch 64 --bf16 --channels-last
    python benchmarks/gpu_step_profile.py --preset digits --model conv --batch 64 --device cpu
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from gsa_cli import load_preset
from gsa_cli.models import build_model

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="imagenet50")
    parser.add_argument("--model", default="gsa", choices=("gsa", "conv", "full"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=20, help="operators listed")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = load_preset(args.preset, model=args.model)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    model = build_model(config).to(device).train()
    size, channels = config.data.img_size, config.data.channels
    images = torch.randn(args.batch, channels, size, size, device=device)
    labels = torch.randint(0, config.data.num_classes, (args.batch,), device=device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    def synchronise() -> None:
        if on_gpu:
            torch.cuda.synchronize(device)

    for _ in range(3):
        step()
    synchronise()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronise()
    wall_ms = (time.perf_counter() - start) / args.steps * 1000

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as profiler:
        for _ in range(args.steps):
            step()
        synchronise()
    events = profiler.key_averages()
    busy_key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    busy_type = "CUDA" if on_gpu else "CPU"
    busy_ms = sum(getattr(e, busy_key) for e in events if e.device_type.name == busy_type)
    busy_ms /= args.steps * 1000
    launches = sum(e.count for e in events if e.key in LAUNCHES) / args.steps

    name = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    print(
        f"{args.preset} {args.model}, batch {args.batch}, {name}, bf16 {args.bf16}, channels-last "
        f"{args.channels_last}: wall {wall_ms:.1f} ms/step, device-busy {busy_ms:.1f} ms/step, "
        f"{launches:.0f} launches/step"
    )
    orders = [(f"by own {busy_type} time", busy_key)]
    if on_gpu:  # the host's side as well; on the CPU it is the same list
        orders.append(("by own host time", "self_cpu_time_total"))
    for title, key in orders:
        print(f"  {title} (ms/step, calls/step):")
        for event in sorted(events, key=lambda e: -getattr(e, key))[: args.top]:
            own_ms = getattr(event, key) / args.steps / 1000
            print(f"    {event.key[:80]:80s} {own_ms:8.2f} {event.count // args.steps}")


if __name__ == "__main__":
    main()
