"""``gsa eval``: a checkpoint evaluated on its validation split."""

from __future__ import annotations

from gsa_cli.choices import OnCorrupt
from gsa_cli.cli import render
from gsa_cli.cli.options import (
    CorruptOpt,
    DataOpt,
    DeviceOpt,
    EmaOpt,
    EvalBatchSizeOpt,
    EvalTargetArg,
    WorkersOpt,
    at_least,
)


def eval_command(
    target: EvalTargetArg,
    ema: EmaOpt = True,
    data: DataOpt = None,
    device: DeviceOpt = "auto",
    batch_size: EvalBatchSizeOpt = None,
    workers: WorkersOpt = None,
    on_corrupt: CorruptOpt = OnCorrupt.FAIL,
) -> None:
    """Evaluate a checkpoint on its validation split: top-1, top-5, loss, images/s; writes eval.json."""
    from gsa_cli.cli.progress import reporter_for
    from gsa_cli.train.evaluate import EvalNotSavedError, EvalOptions, evaluate_checkpoint

    at_least(batch_size, "--batch-size")
    options = EvalOptions(
        data=data, device=device, ema=ema, batch_size=batch_size, workers=workers, on_corrupt=on_corrupt
    )
    try:
        report = evaluate_checkpoint(target, options, reporter=reporter_for(render.console))
    except EvalNotSavedError as err:
        render.eval_report(err.report)  # the numbers first: the one line that follows says why unsaved
        raise
    render.eval_report(report)
