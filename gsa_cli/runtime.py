"""Where and how a model runs: device, precision, seeding and device synchronisation."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import torch

from gsa_cli.choices import Precision as Precision  # re-exported: the enum lives in choices.py
from gsa_cli.errors import ConfigError

# The torch dtype each precision computes in (under autocast for bf16 and fp16).
DTYPES: dict[Precision, torch.dtype] = {
    Precision.FP32: torch.float32,
    Precision.BF16: torch.bfloat16,
    Precision.FP16: torch.float16,
}


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a device that exists here.

    Raises:
        ConfigError: for an unknown spelling, or CUDA asked for where there is none.
    """
    text = spec.strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ConfigError(f"--device {spec}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: CUDA is not available on this machine; use --device cpu")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ConfigError(f"--device {spec}: this machine has {count} CUDA device(s), 0 to {count - 1}")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ConfigError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")
    return device


def device_name(device: torch.device) -> str:
    """A human name for the device: the GPU's name, or the CPU's model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    threads = torch.get_num_threads()
    return f"{model or 'CPU'} ({threads} thread{'' if threads == 1 else 's'})"


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager[None]:
    """Autocast to ``precision`` on ``device``; a no-op context for fp32."""
    if precision is Precision.FP32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def too_small_for_batch_norm(err: BaseException) -> bool:
    """Whether ``err`` is batch norm refusing to train on one value per channel (a batch of one image
    reaching a 1x1 feature map)."""
    return isinstance(err, ValueError) and "more than 1 value per channel" in str(err)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer read afterwards is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    """Seed Python's, torch's (all devices) random number generators."""
    random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def module_mode(model: torch.nn.Module, *, training: bool) -> Iterator[torch.nn.Module]:
    """Put ``model`` in training or eval mode for the block and restore its previous mode after."""
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)
