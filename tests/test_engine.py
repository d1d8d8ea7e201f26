"""The engine's parts, checked against values worked out by hand."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from gsa_cli import build_model, load_preset
from gsa_cli.errors import GsaError
from gsa_cli.train.loop import (
    ModelEma,
    batch_sums,
    build_optimizer,
    load_checkpoint,
    param_groups,
    save_checkpoint,
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


def test_batch_sums_count_top1_and_top5_by_hand() -> None:
    logits = torch.tensor(
        [[9.0, 8, 7, 6, 5, 4], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]]
    )  # top-5 of row 0: classes 0-4; of row 1: 5-1; of row 2: 0-4
    labels = torch.tensor([0, 0, 5])  # row 0 top-1 hit; row 1 miss; row 2 miss
    sums = batch_sums(logits, labels, torch.tensor(2.0))
    assert sums.tolist() == [6.0, 1.0, 1.0, 3.0]
    soft = torch.nn.functional.one_hot(labels, 6).float() * 0.7 + 0.05  # mixup-style targets
    assert batch_sums(logits, soft, torch.tensor(2.0)).tolist() == [6.0, 1.0, 1.0, 3.0]


class _Payload:
    """A class a weights-only load must refuse to construct."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("this ran",))


def test_checkpoint_round_trip_and_refusals(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "epoch": 3})
    assert load_checkpoint(path)["epoch"] == 3
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file is gone

    code = tmp_path / "code.pt"
    torch.save({"format": "gsa-checkpoint/1", "x": _Payload()}, code)
    with pytest.raises(GsaError, match=r"code.pt: refused: the file carries Python objects or code"):
        load_checkpoint(code)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(GsaError, match=r"truncated.pt: not a readable checkpoint"):
        load_checkpoint(truncated)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(pickle.dumps([1, 2]) + b"junk")
    with pytest.raises(GsaError, match=r"garbage.pt: not a (readable|gsa) checkpoint"):
        load_checkpoint(garbage)

    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(GsaError, match=r"other.pt: not a gsa checkpoint"):
        load_checkpoint(other)

    with pytest.raises(GsaError, match=r"missing.pt: no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
