"""``gsa export``: a checkpoint's model exported with a dynamic batch (ONNX or torch.export), checked
against eager."""

from __future__ import annotations

from gsa_cli.cli import render
from gsa_cli.cli.options import (
    EmaOpt,
    EvalTargetArg,
    ExportFormatOpt,
    ExportImgSizeOpt,
    ExportOutOpt,
    ForceOpt,
    ToleranceOpt,
    at_least,
    check_writable,
)


def export_command(
    target: EvalTargetArg,
    fmt: ExportFormatOpt,
    out: ExportOutOpt = None,
    ema: EmaOpt = True,
    img_size: ExportImgSizeOpt = None,
    tolerance: ToleranceOpt = None,
    force: ForceOpt = False,
) -> None:
    """Export a checkpoint's model for any batch (ONNX or .pt2), checked against eager at batch 1 and 32."""
    at_least(img_size, "--img-size")
    check_writable(out, "--out", folder=False)
    from gsa_cli.train.export import ExportOptions, export_checkpoint

    options = ExportOptions(format=fmt, out=out, ema=ema, img_size=img_size, tolerance=tolerance, force=force)
    with render.status(f"exporting {target}") as progress:
        report = export_checkpoint(target, options, progress=progress)
    render.export_report(report)
