"""timm: the registered GSA nets and twins, timm's model API, feature extraction, the optimizer factory,
the state dicts of earlier versions, and the error when timm is absent."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from gsa_cli import build_model, load_preset
from gsa_cli.errors import ConfigError
from gsa_cli.models import GlobalSelfAttention2d, ResNet

REPO = Path(__file__).resolve().parent.parent
NAMES = [
    *(f"gsa_resnet{depth}" for depth in (26, 38, 50, 101)),
    *(f"gsa_twin_resnet{depth}" for depth in (26, 38, 50, 101)),
]
SMALL = {"img_size": 32, "width": 16}  # a ResNet-26 layout at a quarter width, 32 px: fast on a CPU


@pytest.fixture(scope="module")
def timm() -> ModuleType:
    module = pytest.importorskip("timm", reason="timm is an optional extra: pip install 'gsa-cli[timm]'")
    import gsa_cli.timm  # noqa: F401  (registers the models)

    return module


def _since_1_0_31(timm: ModuleType, helper: str) -> None:
    """Skip where timm lacks ``timm.models.<helper>``: the model-argument helpers came with timm 1.0.31
    (the rest of this file passes with timm 1.0.3 and 1.0.15 too; CI installs the newest)."""
    if not hasattr(timm.models, helper):
        pytest.skip(f"timm {timm.__version__} has no timm.models.{helper} (new in timm 1.0.31)")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _create(timm: ModuleType, name: str = "gsa_resnet26", **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **{**SMALL, **kwargs})


# ---------------------------------------------------------------------------------------------------
# The registry and the pretrained configs.


def test_every_variant_is_registered_with_a_config_for_its_preset(timm: ModuleType) -> None:
    assert timm.list_models("gsa_*") == NAMES  # in timm's natural order
    assert timm.list_pretrained("gsa_*") == []  # no weights exist
    for name in NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.input_size == (3, 224, 224)
        assert cfg.num_classes == 1000
        assert cfg.pool_size == (7, 7)  # 224 / 32
        assert cfg.fixed_input_size is name.startswith("gsa_resnet")  # the spans are built for it
        assert (cfg.crop_pct, cfg.interpolation) == (0.875, "bilinear")  # as gsa eval
        assert (cfg.first_conv, cfg.classifier) == ("conv1", "fc")


@pytest.mark.parametrize(
    ("name", "preset", "kind"),
    [("gsa_resnet50", "imagenet50", "gsa"), ("gsa_twin_resnet101", "imagenet101", "conv")],
)
def test_a_variant_is_its_presets_network(timm: ModuleType, name: str, preset: str, kind: str) -> None:
    with torch.device("meta"):
        ours = timm.create_model(name)
        reference = build_model(load_preset(preset, model=kind))
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, v.shape) for k, v in reference.state_dict().items()
    ]
    assert ours.pretrained_cfg["input_size"] == (3, 224, 224)


@pytest.mark.parametrize("depth", [50, 101])
def test_the_deep_twins_are_torchvisions_resnets_key_for_key(timm: ModuleType, depth: int) -> None:
    import torchvision

    with torch.device("meta"):
        ours = timm.create_model(f"gsa_twin_resnet{depth}").state_dict()
        reference = getattr(torchvision.models, f"resnet{depth}")().state_dict()
    assert [(k, v.shape) for k, v in ours.items()] == [(k, v.shape) for k, v in reference.items()]


def test_create_model_at_a_small_size_is_global_at_that_size(timm: ModuleType) -> None:
    model = _create(timm, num_classes=7).eval()
    assert isinstance(model, ResNet)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32)
    assert cfg["num_classes"] == model.num_classes == 7
    assert model.feature_sizes == [8, 8, 4, 2]  # the ImageNet stem divides by 4, stages 2-4 by 2
    for stage, size in zip(range(1, 5), model.feature_sizes, strict=True):
        first = model.stage(stage)[0].conv2
        assert isinstance(first, GlobalSelfAttention2d)
        assert first.span == size
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert model(x).shape == (2, 7)
    assert tuple(features.shape[-2:]) == cfg["pool_size"] == (1, 1)
    assert features.shape[1] == model.num_features == 16 * 8 * 4
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 32, 32)


def test_in_chans_dtype_and_model_keys_reach_the_network(timm: ModuleType) -> None:
    model = _create(
        timm, in_chans=1, num_classes=3, heads=4, gsa_impl="reference", dtype=torch.float64
    ).eval()
    assert model.conv1.in_channels == 1
    assert model.pretrained_cfg["input_size"] == (1, 32, 32)
    assert model.conv1.weight.dtype == torch.float64
    modules = [m for m in model.modules() if isinstance(m, GlobalSelfAttention2d)]
    assert len(modules) == 8
    assert {(m.heads, m.implementation) for m in modules} == {(4, "reference")}
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32, dtype=torch.float64)).shape == (1, 3)


def test_timm_scripts_size_request_builds_the_net_for_that_size(timm: ModuleType) -> None:
    # What train.py/validate.py do with --img-size (timm 1.0.31 on): the config says fixed_input_size,
    # so the size is passed to the entry point.
    _since_1_0_31(timm, "resolve_model_input_args")
    arguments = timm.models.resolve_model_input_args("gsa_resnet26", args={"img_size": 64}, in_chans=3)
    model = timm.create_model(**arguments, num_classes=4, width=16)
    assert model.feature_sizes == [16, 16, 8, 4]
    assert model.pretrained_cfg["input_size"] == (3, 64, 64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pretrained": True}, r"no pretrained weights exist .*\(pretrained_cfg_overlay=dict\(file=PATH\)"),
        ({"drop_path_rate": 0.1}, r"gsa_resnet26 takes no argument 'drop_path_rate' \(it takes: .*heads"),
        ({"img_size": (32, 48)}, r"img_size must be one side or a square \(height, width\), got \(32, 48\)"),
        ({"num_classes": -1}, r"num_classes must be an integer of at least 0, got -1"),
        ({"heads": 5}, r"timm\.create_model\('gsa_resnet26'\): model\.heads: 5 heads do not divide"),
        ({"global_pool": "avgmax"}, r"global_pool must be one of 'avg', 'max', '', got 'avgmax'"),
        ({"global_pool": "", "num_classes": 3}, r"global_pool '' \(no pooling\) needs num_classes=0"),
        ({"depth": 50}, r"takes no argument 'depth'"),
    ],
)
def test_arguments_it_cannot_take_are_one_line(
    timm: ModuleType, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _create(timm, **kwargs)


def test_weights_of_ones_own_load_through_pretrained_and_checkpoint_path(
    timm: ModuleType, tmp_path: Path
) -> None:
    source = _create(timm, num_classes=5)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    via_pretrained = timm.create_model(
        "gsa_resnet26", pretrained=True, pretrained_cfg_overlay={"file": str(path), "num_classes": 5}, **SMALL
    )
    torch.manual_seed(2)
    via_checkpoint = timm.create_model("gsa_resnet26", num_classes=5, checkpoint_path=str(path), **SMALL)
    for model in (via_pretrained, via_checkpoint):
        for key, value in source.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key


def test_a_gsa_train_checkpoint_loads_through_checkpoint_path(timm: ModuleType, tmp_path: Path) -> None:
    from gsa_cli.cli.app import app

    out = tmp_path / "run"
    settings = ["data.train_samples=8", "data.val_samples=4", "data.dataset=synthetic", "data.img_size=32",
                "data.num_classes=10", "model.width=16"]  # fmt: skip
    result = CliRunner().invoke(
        app,
        ["train", "--preset", "imagenet26", *(f"--set={s}" for s in settings), "--epochs", "1",
         "--batch-size", "4", "--device", "cpu", "--threads", "1", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    model = timm.create_model("gsa_resnet26", num_classes=10, checkpoint_path=str(out / "last.pt"), **SMALL)
    saved = torch.load(out / "last.pt", weights_only=True)["model"]
    assert list(saved) == list(model.state_dict())
    assert all(torch.equal(saved[key], value) for key, value in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------
# Training with timm's optimizer factory.


def test_a_training_step_with_timms_optimizer_keeps_tables_norms_and_biases_undecayed(
    timm: ModuleType,
) -> None:
    from timm.optim import create_optimizer_v2

    # zero_init_residual off: with each block's last BN at zero, nothing before it gets a gradient.
    model = _create(timm, num_classes=5, zero_init_residual=False).train()
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    names = {id(p): name for name, p in model.named_parameters()}
    groups = {
        group["weight_decay"]: {names[id(p)] for p in group["params"]} for group in optimizer.param_groups
    }
    assert set(groups) == {0.0, 0.05}
    tables = {name for name in names.values() if name.endswith((".rel_col", ".rel_row"))}
    assert len(tables) == 2 * 8  # two relative tables in each of the 8 GSA modules
    assert model.no_weight_decay() == tables
    norms_and_biases = {n for n, p in model.named_parameters() if p.ndim == 1}
    assert groups[0.0] == tables | norms_and_biases
    assert all(name.endswith("weight") and "bn" not in name for name in groups[0.05])
    assert {"fc.weight", "layer3.3.conv2.qkv.weight"} <= groups[0.05]

    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    optimizer.step()
    assert torch.isfinite(loss)
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert set(moved) == set(names.values())


def test_layer_decay_groups_the_stem_before_the_blocks(timm: ModuleType) -> None:
    from timm.optim import create_optimizer_v2

    model = _create(timm, "gsa_twin_resnet26", num_classes=5)
    optimizer = create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=1e-4, layer_decay=0.5)
    scale = {}
    names = {id(p): name for name, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            scale[names[id(p)]] = group["lr_scale"]
    assert scale["conv1.weight"] < scale["layer1.0.conv1.weight"] < scale["layer4.0.conv1.weight"]
    assert scale["fc.weight"] == 1.0


def test_grad_checkpointing_gives_the_same_gradients(timm: ModuleType) -> None:
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        model = _create(timm, num_classes=3).eval()  # eval: BN statistics are not updated twice
        model.set_grad_checkpointing(checkpointing)
        model(x).pow(2).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain)


# ---------------------------------------------------------------------------------------------------
# The head.


def test_forward_head_pre_logits_and_reset_classifier(timm: ModuleType) -> None:
    model = _create(timm, num_classes=6).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        torch.testing.assert_close(pooled, features.mean((2, 3)))
        torch.testing.assert_close(model.get_classifier()(pooled), model(x))
        assert model.get_classifier() is model.fc
        assert model.get_classifier().out_features == 6

        model.reset_classifier(3)
        assert model.num_classes == 3
        assert model.pretrained_cfg["classifier"] == "fc"
        assert model(x).shape == (2, 3)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pooled)  # pooled features, no classifier
        model.reset_classifier(4, "max")
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), features.amax((2, 3)))
        model.reset_classifier(0, "")
        torch.testing.assert_close(model(x), features)  # the map itself
        with pytest.raises(ValueError, match="needs num_classes 0"):
            model.reset_classifier(3)  # a classifier on an unpooled map


def test_timm_reads_the_pool_reset_classifier_set(timm: ModuleType) -> None:
    _since_1_0_31(timm, "get_model_args")
    model = _create(timm, num_classes=6)
    model.reset_classifier(0, "")
    assert timm.models.get_model_args(model)["global_pool"] == ""
    model.reset_classifier(4, "max")
    assert timm.models.get_model_args(model)["global_pool"] == "max"


def test_num_classes_zero_and_drop_rate(timm: ModuleType) -> None:
    model = _create(timm, num_classes=0, drop_rate=0.5).eval()
    assert isinstance(model.get_classifier(), nn.Identity)
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, 32, 32))
        pooled = model.forward_head(features)
        assert pooled.shape == (2, model.num_features)
        model.train()
        dropped = model.forward_head(features)
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], 2 * pooled[kept])  # inverted dropout at p = 0.5
    assert (pooled[~kept] != 0).any()  # some were dropped


# ---------------------------------------------------------------------------------------------------
# Feature extraction.


@pytest.mark.parametrize("name", ["gsa_resnet26", "gsa_twin_resnet26"])
def test_features_only_returns_the_plain_forwards_maps(timm: ModuleType, name: str) -> None:
    plain = _create(timm, name).eval()
    features = _create(timm, name, features_only=True).eval()
    result = features.load_state_dict(plain.state_dict(), strict=False)
    assert result.missing_keys == []
    assert set(result.unexpected_keys) == {"fc.weight", "fc.bias"}
    info = plain.feature_info
    assert [d["module"] for d in info] == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert features.feature_info.channels() == [d["num_chs"] for d in info] == [16, 64, 128, 256, 512]
    assert features.feature_info.reduction() == [d["reduction"] for d in info] == [2, 4, 8, 16, 32]

    seen: dict[str, torch.Tensor] = {}
    for entry in info:
        module = plain.get_submodule(entry["module"])
        module.register_forward_hook(lambda _m, _i, out, key=entry["module"]: seen.update({key: out.clone()}))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = features(x)
        plain(x)
    assert len(maps) == len(info)
    for entry, got in zip(info, maps, strict=True):
        side = -(-32 // entry["reduction"])
        assert got.shape == (2, entry["num_chs"], side, side)
        assert torch.equal(got, seen[entry["module"]]), entry["module"]


def test_features_only_takes_out_indices(timm: ModuleType) -> None:
    features = _create(timm, features_only=True, out_indices=(2, 4)).eval()
    with torch.no_grad():
        maps = features(torch.randn(2, 3, 32, 32))
    assert [m.shape[1] for m in maps] == features.feature_info.channels() == [128, 512]


# ---------------------------------------------------------------------------------------------------
# The module order (timm's feature extractor replays it) and the state dicts of earlier versions.


def _entry_order(model: nn.Module, x: torch.Tensor) -> tuple[list[str], list[str]]:
    """Modules in the order the forward enters them, and in ``named_modules`` order; each spatial
    operator counted as one module (its insides are models/gsa.py's)."""
    names = {id(module): name for name, module in model.named_modules()}
    entered: list[str] = []
    hooks = [
        module.register_forward_pre_hook(lambda m, _i: entered.append(names[id(m)]))
        for module in model.modules()
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()

    def outside_spatial(name: str) -> bool:
        return ".conv2." not in name

    return [n for n in entered if outside_spatial(n)], [n for n in names.values() if outside_spatial(n)]


@pytest.mark.parametrize("kind", ["gsa", "conv"])
def test_modules_are_registered_in_the_order_forward_calls_them(kind: str) -> None:
    model = build_model(load_preset("cifar26", model=kind, overrides=["model.width=8", "data.img_size=16"]))
    entered, registered = _entry_order(model.eval(), torch.randn(1, 3, 16, 16))
    assert entered == registered
    assert registered[:6] == ["", "conv1", "bn1", "relu", "maxpool", "layer1"]
    assert registered[-4:] == ["layer4.0.relu3", "global_pool", "global_pool.pool", "fc"]


def test_state_dicts_of_earlier_versions_load_key_for_key() -> None:
    """The keys, shapes and order a ResNet-26 of each kind saved before the modules were reordered
    (tests/fixtures/resnet26_state_keys.json): old checkpoints load, and the parameters keep their order,
    which an optimizer's saved state is matched by."""
    recorded = json.loads((REPO / "tests" / "fixtures" / "resnet26_state_keys.json").read_text())
    for kind in ("gsa", "conv"):
        torch.manual_seed(0)
        model = build_model(load_preset("imagenet26", model=kind))
        saved = [(key, list(shape)) for key, shape in recorded[kind]]
        assert [(key, list(value.shape)) for key, value in model.state_dict().items()] == saved
        old = {key: torch.full(shape, 0.5) if shape else torch.tensor(3) for key, shape in saved}
        model.load_state_dict(old, strict=True)
        assert all(torch.all(value == old[key]) for key, value in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------
# Without timm, and the launcher for timm's scripts.


def test_without_timm_the_import_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in sys.modules if name.partition(".")[0] == "timm"] + ["timm"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if timm were not installed
    monkeypatch.delitem(sys.modules, "gsa_cli.timm", raising=False)
    with pytest.raises(ImportError) as error:
        importlib.import_module("gsa_cli.timm")
    assert str(error.value) == 'gsa_cli.timm needs timm, an optional extra: pip install "gsa-cli[timm]"'
    assert error.value.__suppress_context__  # one line, not the chained ModuleNotFoundError


def _eager_imports(tree: ast.Module) -> set[str]:
    """Modules imported when the file is imported (not inside a function)."""
    found: set[str] = set()
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        stack.extend(ast.iter_child_nodes(node))
    return found


def test_no_other_module_imports_timm_when_it_is_imported() -> None:
    eager = {
        str(path.relative_to(REPO))
        for path in sorted((REPO / "gsa_cli").rglob("*.py"))
        if any(name.partition(".")[0] == "timm" for name in _eager_imports(ast.parse(path.read_text())))
    }
    assert eager == {"gsa_cli/timm.py"}


def test_the_launcher_runs_a_script_with_the_models_registered(timm: ModuleType, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(
        "import sys\nimport timm\n"
        "model = timm.create_model('gsa_resnet26', num_classes=3, img_size=32, width=16)\n"
        "cfg = timm.models.get_pretrained_cfg('gsa_resnet26')\n"
        "print(__name__, type(model).__name__, sys.argv, cfg.architecture)\n"
    )
    # One child: the tool's modules load without timm, then `python -m gsa_cli.timm SCRIPT ARGS`
    # (runpy.run_module as -m runs it: a __main__ module, sys.argv[0] the file).
    code = (
        "import runpy, sys\n"
        "import gsa_cli, gsa_cli.models, gsa_cli.cli.app, gsa_cli.train.run, gsa_cli.bench.profile\n"
        "assert 'timm' not in sys.modules, 'timm was imported'\n"
        f"sys.argv = ['-m', {str(script)!r}, '--model', 'gsa_resnet26', '-b', '4']\n"
        "runpy.run_module('gsa_cli.timm', run_name='__main__', alter_sys=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    expected = f"__main__ ResNet [{str(script)!r}, '--model', 'gsa_resnet26', '-b', '4'] gsa_resnet26"
    assert result.stdout.splitlines()[0] == expected
    assert "Overwriting" not in result.stderr  # registered once, under gsa_cli.timm


def test_the_launcher_names_a_missing_script(timm: ModuleType, tmp_path: Path) -> None:
    from gsa_cli.timm import run_script

    with pytest.raises(ConfigError, match=r"nope\.py: no such script \(give the path to timm's train\.py"):
        run_script([str(tmp_path / "nope.py")])
    with pytest.raises(ConfigError, match=r"usage: python -m gsa_cli\.timm SCRIPT \[ARGS\.\.\.\]"):
        run_script([])
