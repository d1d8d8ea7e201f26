"""The recipe's parts: parameter groups, optimizer, learning-rate schedule, EMA and batch mixing.

Each is built from a :class:`~gsa_cli.config.RecipeConfig` and a plain module: nothing here knows
about GSA. A model keeps parameters out of weight decay by naming them in its
``no_weight_decay()`` (timm's and Swin's convention); norms and biases never decay.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import Tensor, nn

from gsa_cli.config import Optimizer, RecipeConfig
from gsa_cli.errors import ScheduleWarning

BatchTransform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def param_groups(
    model: nn.Module, *, weight_decay: float, no_decay: Collection[str] = ()
) -> list[dict[str, Any]]:
    """Two groups: weights with decay, and without it the 1-D parameters (norm scales and shifts,
    biases) plus the parameters named in ``no_decay`` (a model's ``no_weight_decay()``)."""
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (plain if param.ndim <= 1 or name in no_decay else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]


def build_optimizer(groups: list[dict[str, Any]], recipe: RecipeConfig) -> torch.optim.Optimizer:
    """SGD (with the recipe's momentum, Nesterov or not) or AdamW (decoupled decay), at ``recipe.lr``."""
    if recipe.optimizer is Optimizer.SGD:
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov)
    return torch.optim.AdamW(groups, lr=recipe.lr)


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of update ``step`` (0-based): linear from ``1/warmup`` to 1 over the
    warm-up, then a cosine from 1 to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_schedule(
    optimizer: torch.optim.Optimizer, recipe: RecipeConfig, *, steps_per_epoch: int, warn: bool = False
) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's warm-up and cosine, stepped once per update over ``recipe.epochs`` epochs; ``warn``:
    say so (a :class:`~gsa_cli.errors.ScheduleWarning`) when it cannot complete (see
    :func:`schedule_problem`)."""
    total_steps = recipe.epochs * steps_per_epoch
    warmup = round(recipe.warmup_epochs * steps_per_epoch)
    problem = schedule_problem(recipe, steps_per_epoch=steps_per_epoch) if warn else None
    if problem is not None:
        warnings.warn(problem, ScheduleWarning, stacklevel=2)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup))


def schedule_problem(recipe: RecipeConfig, *, steps_per_epoch: int) -> str | None:
    """Why the recipe's schedule cannot complete, or None when it can: a warm-up that does not end
    before training does never starts the cosine, and the run ends at (or below) the peak learning rate
    instead of near zero. Allowed, as a warm-up-only probe may want it, but never unsaid."""
    total_steps = recipe.epochs * steps_per_epoch
    warmup = round(recipe.warmup_epochs * steps_per_epoch)
    if warmup < total_steps:
        return None
    last = warmup_cosine(total_steps, warmup)(total_steps - 1) * recipe.lr
    where = "at the peak" if warmup == total_steps else f"at {last:.3g}, below the peak"
    return (
        f"recipe.warmup_epochs ({recipe.warmup_epochs:g}) is not below recipe.epochs ({recipe.epochs}): the "
        f"learning rate never decays and the run ends {where} ({recipe.lr:g}); lower "
        "recipe.warmup_epochs or raise recipe.epochs"
    )


class ModelEma:
    """An exponential moving average of a model's weights (buffers are copied, not averaged).

    The decay ramps up as ``min(decay, (1 + step) / (10 + step))``, so that the average follows the
    fast early changes of a short run instead of sitting on the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for average, current in zip(self.module.parameters(), model.parameters(), strict=True):
            average.lerp_(current.detach(), 1.0 - decay)
        for buffer, source in zip(self.module.buffers(), model.buffers(), strict=True):
            buffer.copy_(source)


def batch_mixing(recipe: RecipeConfig, *, num_classes: int) -> BatchTransform | None:
    """MixUp, CutMix, or one of the two at random per batch, as the recipe asks; None for neither.

    The transform takes ``(images, labels)`` and returns the mixed images with class probabilities.
    """
    from torchvision.transforms import v2

    choices: list[Any] = []
    if recipe.mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=recipe.mixup_alpha, num_classes=num_classes))
    if recipe.cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=recipe.cutmix_alpha, num_classes=num_classes))
    if not choices:
        return None
    mixing: BatchTransform = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
    return mixing
