"""The ResNet family: torchvision parity, GSA placement, spans, gradients of every preset's model."""

from __future__ import annotations

import pytest
import torch
import torchvision

from gsa_cli import build_model, load_preset
from gsa_cli.config import GsaImplementation
from gsa_cli.errors import ConfigError
from gsa_cli.models import GlobalSelfAttention2d, count_parameters
from gsa_cli.models.gsa import IMPLEMENTATIONS
from gsa_cli.presets import preset_names


def test_conv_resnet50_has_torchvision_parameter_count() -> None:
    config = load_preset("imagenet50", model="conv")
    assert count_parameters(config) == 25_557_032


def test_conv_resnet50_loads_torchvision_weights_key_for_key() -> None:
    torch.manual_seed(0)
    ours = build_model(load_preset("imagenet50", model="conv")).eval()
    reference = torchvision.models.resnet50().eval()
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))


def test_gsa_resnet50_is_smaller_than_its_conv_twin() -> None:
    gsa = count_parameters(load_preset("imagenet50", model="gsa"))
    conv = count_parameters(load_preset("imagenet50", model="conv"))
    assert gsa < conv
    # Spec section 1: d_k = C_out gives about 18.2M parameters.
    assert 18.0e6 < gsa < 18.5e6


def test_gsa_modules_are_global_at_each_stage() -> None:
    model = build_model(load_preset("imagenet50"))
    assert model.feature_sizes == [56, 56, 28, 14]
    for stage, size in zip(range(1, 5), model.feature_sizes, strict=True):
        blocks = list(model.stage(stage))
        first = blocks[0].conv2
        assert isinstance(first, GlobalSelfAttention2d)
        assert first.span == size  # the first block sees the stage's input map
        assert first.stride == (1 if stage == 1 else 2)
        for block in blocks[1:]:
            assert isinstance(block.conv2, GlobalSelfAttention2d)
            assert block.conv2.span == (size if stage == 1 else size // 2)
            assert block.conv2.stride == 1


def test_gsa_only_in_the_chosen_stages() -> None:
    model = build_model(load_preset("cifar26", overrides=["model.attention_stages=[3, 4]"]))
    kinds = [type(model.stage(s)[0].conv2) for s in range(1, 5)]
    assert kinds == [torch.nn.Conv2d, torch.nn.Conv2d, GlobalSelfAttention2d, GlobalSelfAttention2d]


def test_fixed_span_and_module_switches_reach_every_module() -> None:
    config = load_preset(
        "cifar26", overrides=["model.span=3", "model.heads=4", "model.content=false", "model.key_ratio=0.5"]
    )
    modules = [m for m in build_model(config).modules() if isinstance(m, GlobalSelfAttention2d)]
    assert len(modules) == 8
    for module in modules:
        assert (module.span, module.heads, module.content) == (3, 4, False)
        assert module.key_channels == module.out_channels // 2


@pytest.mark.parametrize("implementation", ["auto", "reference", "gemm"])
def test_gsa_implementation_reaches_every_module(implementation: str) -> None:
    config = load_preset("cifar26", overrides=[f"model.gsa_impl={implementation}"])
    modules = [m for m in build_model(config).modules() if isinstance(m, GlobalSelfAttention2d)]
    assert len(modules) == 8
    assert {module.implementation for module in modules} == {implementation}


def test_gsa_implementation_is_auto_by_default_and_checked() -> None:
    assert load_preset("cifar26").model.gsa_impl is GsaImplementation.AUTO
    assert [choice.value for choice in GsaImplementation] == list(IMPLEMENTATIONS)  # the module's keyword
    with pytest.raises(ConfigError, match=r"model\.gsa_impl"):
        load_preset("cifar26", overrides=["model.gsa_impl=fast"])


def test_implementations_of_a_whole_net_agree() -> None:
    nets = {}
    for implementation in ("reference", "gemm"):
        torch.manual_seed(0)
        config = load_preset("smoke", overrides=[f"model.gsa_impl={implementation}"])
        nets[implementation] = build_model(config).double().train()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    outputs = {name: net(x) for name, net in nets.items()}
    torch.testing.assert_close(outputs["gemm"], outputs["reference"], rtol=1e-10, atol=1e-10)
    grads = {
        name: torch.autograd.grad(out.pow(2).sum(), list(nets[name].parameters()))
        for name, out in outputs.items()
    }
    for got, want in zip(grads["gemm"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_cifar_stem_keeps_resolution_and_imagenet_stem_divides_by_four() -> None:
    cifar = build_model(load_preset("cifar26", model="conv"))
    assert isinstance(cifar.maxpool, torch.nn.Identity)
    assert cifar.feature_sizes == [32, 32, 16, 8]
    assert build_model(load_preset("imagenet26", model="conv")).feature_sizes == [56, 56, 28, 14]


@pytest.mark.parametrize("kind", ["conv", "gsa"])
@pytest.mark.parametrize("size", [28, 27])
def test_stride2_stem_halves_once_and_each_gsa_module_is_global_at_its_map(kind: str, size: int) -> None:
    config = load_preset("fashion", model=kind, overrides=["model.stem=stride2", f"data.img_size={size}"])
    model = build_model(config).eval()
    half = (size + 1) // 2
    assert model.feature_sizes == [half, half, (half + 1) // 2, ((half + 1) // 2 + 1) // 2]
    assert [info["reduction"] for info in model.feature_info] == [2, 2, 4, 8, 16]
    with torch.no_grad():
        stem = model.relu(model.bn1(model.conv1(torch.randn(2, 1, size, size))))
        assert stem.shape[-2:] == (half, half)
        assert model(torch.randn(2, 1, size, size)).shape == (2, 10)
    spans = [m.span for m in model.modules() if isinstance(m, GlobalSelfAttention2d)]
    assert (spans[0] == half) if kind == "gsa" else not spans


@pytest.mark.parametrize("kind", ["conv", "gsa"])
def test_odd_input_sizes_keep_the_shortcut_in_step(kind: str) -> None:
    model = build_model(load_preset("smoke", model=kind, overrides=["data.img_size=15"])).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 15, 15)).shape == (2, 10)


def test_zero_init_residual_zeroes_each_last_block_norm() -> None:
    model = build_model(load_preset("smoke", overrides=["model.zero_init_residual=true"]))
    weights = [model.stage(s)[0].bn3.weight for s in range(1, 5)]
    assert all(torch.count_nonzero(w) == 0 for w in weights)
    model = build_model(load_preset("smoke", overrides=["model.zero_init_residual=false"]))
    assert all(torch.all(model.stage(s)[0].bn3.weight == 1) for s in range(1, 5))


@pytest.mark.parametrize("kind", ["conv", "gsa"])
@pytest.mark.parametrize("name", preset_names())
def test_every_preset_model_trains_a_step_with_a_gradient_everywhere(name: str, kind: str) -> None:
    # zero_init_residual is switched off: a zero last BN would (correctly) zero the branch's gradients.
    config = load_preset(name, model=kind, overrides=["model.zero_init_residual=false"])
    torch.manual_seed(0)
    model = build_model(config).train()
    size, channels = config.data.img_size, config.data.channels
    x = torch.randn(2, channels, size, size)
    logits = model(x)
    assert logits.shape == (2, config.data.num_classes)
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for parameter_name, parameter in model.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert torch.isfinite(parameter.grad).all(), parameter_name
        assert parameter.grad.abs().sum() > 0, parameter_name
