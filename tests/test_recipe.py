"""The recipe's parts, checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gsa_cli import build_model, load_preset
from gsa_cli.train.recipe import (
    ModelEma,
    batch_mixing,
    build_optimizer,
    build_schedule,
    param_groups,
    warmup_cosine,
)


def test_warmup_is_linear_and_the_cosine_ends_at_zero() -> None:
    factor = warmup_cosine(total_steps=110, warmup_steps=10)
    assert [factor(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert factor(10) == pytest.approx(1.0)  # the cosine starts where the warm-up ends
    assert factor(60) == pytest.approx(0.5)  # half-way through the cosine
    assert factor(35) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert factor(110) == pytest.approx(0.0)
    assert factor(200) == pytest.approx(0.0)
    assert warmup_cosine(10, 0)(0) == pytest.approx(1.0)


def test_no_weight_decay_on_norms_biases_and_gsa_tables() -> None:
    model = build_model(load_preset("smoke", model="gsa"))
    skip = model.no_weight_decay()
    assert skip
    assert all(name.endswith(("rel_col", "rel_row")) for name in skip)
    decay, plain = param_groups(model, weight_decay=0.1, no_decay=skip)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in plain["params"]}
    assert decayed | undecayed == set(names.values())
    assert not decayed & undecayed
    assert skip <= undecayed
    assert "fc.bias" in undecayed
    assert "bn1.weight" in undecayed
    assert "layer1.0.conv2.bn.weight" in undecayed
    assert "fc.weight" in decayed
    assert "layer1.0.conv2.qkv.weight" in decayed
    assert (decay["weight_decay"], plain["weight_decay"]) == (0.1, 0.0)


def test_sgd_is_nesterov_and_adamw_is_available() -> None:
    model = nn.Linear(2, 2)
    recipe = load_preset("smoke").recipe
    sgd = build_optimizer(param_groups(model, weight_decay=0.0), recipe)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["nesterov"]
    assert sgd.defaults["momentum"] == 0.9
    adamw = build_optimizer(param_groups(model, weight_decay=0.0), load_preset(
        "smoke", overrides=["recipe.optimizer=adamw"]).recipe)  # fmt: skip
    assert isinstance(adamw, torch.optim.AdamW)


def test_ema_follows_the_warmed_up_decay() -> None:
    model = nn.Linear(1, 1, bias=False)
    nn.init.constant_(model.weight, 1.0)
    ema = ModelEma(model, decay=0.99)
    nn.init.constant_(model.weight, 3.0)
    ema.update(model, step=1)  # decay min(0.99, 2/11)
    expected = 1.0 + (3.0 - 1.0) * (1 - 2 / 11)
    assert ema.module.weight.item() == pytest.approx(expected)
    ema.update(model, step=10_000)  # decay 0.99
    assert ema.module.weight.item() == pytest.approx(expected + (3.0 - expected) * 0.01)


def test_the_schedule_warms_up_over_the_recipes_epochs_and_ends_at_zero() -> None:
    recipe = load_preset("smoke", overrides=["recipe.epochs=4", "recipe.warmup_epochs=1"]).recipe
    optimizer = build_optimizer(param_groups(nn.Linear(2, 2), weight_decay=0.0), recipe)
    schedule = build_schedule(optimizer, recipe, steps_per_epoch=5)
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(20):
        optimizer.step()
        schedule.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[0] == pytest.approx(recipe.lr / 5)  # the first of 5 warm-up steps
    assert rates[4] == pytest.approx(recipe.lr)  # the warm-up's last step
    assert rates[5] == pytest.approx(recipe.lr)  # the cosine's first
    assert rates[20] == pytest.approx(0.0)


def test_batch_mixing_is_none_without_alphas_and_mixes_to_class_probabilities() -> None:
    plain = load_preset("smoke", overrides=["recipe.mixup_alpha=0", "recipe.cutmix_alpha=0"]).recipe
    assert batch_mixing(plain, num_classes=10) is None
    recipe = load_preset("smoke", overrides=["recipe.mixup_alpha=0.2", "recipe.cutmix_alpha=1.0"]).recipe
    mixing = batch_mixing(recipe, num_classes=10)
    assert mixing is not None
    images, labels = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    mixed, targets = mixing(images, labels)
    assert mixed.shape == images.shape
    assert targets.shape == (4, 10)
    assert torch.allclose(targets.sum(dim=1), torch.ones(4))
