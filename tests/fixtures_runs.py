"""Run directories in the real format, written with gsa_cli.results' own writers, for compare's tests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from gsa_cli.config import config_to_yaml
from gsa_cli.presets import load_preset
from gsa_cli.results import EpochMetrics, EvalReport, RunDir, RunSummary, now_iso


def write_run(
    path: Path,
    *,
    kind: str,
    val_top1: Sequence[float],
    params: int,
    gmacs: float | None = None,
    wall_time_s: float = 100.0,
    preset: str = "smoke",
    overrides: Sequence[str] = (),
    eval_top1: float | None = None,
) -> Path:
    """A finished run of ``len(val_top1)`` epochs; ``gmacs`` None leaves it out of summary.json, as
    runs written before summary.json had the field."""
    config = load_preset(preset, model=kind, overrides=overrides)
    run = RunDir(path)
    run.create()
    run.write_config(config_to_yaml(config))
    rows = [
        EpochMetrics(
            epoch=i + 1,
            lr=0.1,
            train_loss=1.0,
            train_top1=50.0,
            val_loss=1.0,
            val_top1=top1,
            val_top5=min(100.0, top1 + 10),
            images_per_s=200.0,
            epoch_time_s=wall_time_s / len(val_top1),
        )
        for i, top1 in enumerate(val_top1)
    ]
    run.write_metrics(rows)
    best = max(rows, key=lambda row: row.val_top1)
    values = {
        "status": "finished",
        "run_dir": str(path),
        "preset": config.name,
        "model_kind": kind,
        "dataset": config.data.dataset.value,
        "epochs": len(rows),
        "epochs_done": len(rows),
        "best_top1": best.val_top1,
        "best_top5": best.val_top5,
        "best_epoch": best.epoch,
        "final_top1": rows[-1].val_top1,
        "final_top5": rows[-1].val_top5,
        "final_val_loss": rows[-1].val_loss,
        "parameters": params,
        "gmacs": gmacs,
        "wall_time_s": wall_time_s,
        "images_per_s": 200.0,
        "device": "cpu (test)",
        "world_size": 1,
        "precision": "fp32",
        "batch_size": config.recipe.batch_size,
        "channels_last": False,
        "compiled": False,
        "torch_version": "2.14.1",
        "torchvision_version": "0.29.1",
        "git_revision": None,
        "started": now_iso(),
        "updated": now_iso(),
    }
    run.write_summary(RunSummary(**values))  # type: ignore[arg-type]
    if gmacs is None:
        summary = json.loads(run.summary.read_text())
        del summary["gmacs"]
        run.summary.write_text(json.dumps(summary, indent=2))
    if eval_top1 is not None:
        report = EvalReport(
            checkpoint=str(run.best),
            weights="model",
            epoch=best.epoch,
            top1=eval_top1,
            top5=100.0,
            loss=1.0,
            images=32,
            images_per_s=500.0,
            recorded_top1=best.val_top1,
            device="cpu (test)",
            precision="fp32",
            batch_size=16,
            torch_version="2.14.1",
            created=now_iso(),
        )
        run.write_eval(report)
    return path
