"""The built wheel ships the presets, and an installed (non-editable) package finds them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a clean copy: setuptools reuses a checkout's build/ folder, which would hide a
    # subpackage missing from pyproject.toml behind its stale copy.
    source = tmp_path_factory.mktemp("source") / "gsa-cli"
    ignore = shutil.ignore_patterns("build", "dist", "*.egg-info", ".git", "__pycache__", "runs", ".*_cache")
    shutil.copytree(ROOT, source, ignore=ignore)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("gsa_cli-*.whl")
    return built


def test_wheel_contains_every_preset(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.name for p in (ROOT / "presets").glob("*.yaml")}
    assert shipped
    assert {f"gsa_cli/_presets/{name}" for name in shipped} <= names
    assert "gsa_cli/models/gsa.py" in names


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv with the wheel installed (not editable)."""
    env_dir = tmp_path_factory.mktemp("venv")
    # System site-packages provide the dependencies; the wheel's package in the venv comes first.
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
    )
    return python


def test_installed_wheel_loads_presets_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    python = installed
    env_dir = python.parent.parent
    script = (
        "import gsa_cli, gsa_cli.presets as p;"
        "print(gsa_cli.__file__); print(p.preset_dir()); print(p.load_preset('imagenet50').data.img_size)"
    )
    result = subprocess.run(
        [str(python), "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    module_file, presets, img_size = result.stdout.split()
    assert str(env_dir) in module_file
    assert presets.endswith("gsa_cli/_presets")
    assert img_size == "224"


def test_installed_wheel_imports_every_module_of_the_checkout(installed: Path, tmp_path: Path) -> None:
    """Every subpackage is listed in pyproject.toml: each module of the checkout imports from the wheel."""
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in (ROOT / "gsa_cli").rglob("*.py")
        if path.name != "__main__.py"
    )
    assert "gsa_cli.train.run" in modules
    script = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    module = importlib.import_module(name)\n"
        "    assert module.__file__ is not None and 'site-packages' in module.__file__, module.__file__\n"
        "print(len(sys.argv) - 1)\n"
    )
    result = subprocess.run(
        [str(installed), "-c", script, *modules], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(len(modules))]
