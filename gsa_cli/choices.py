"""Every choice the command line offers, as an enum; torch-free, so that ``gsa --help`` starts fast.

The library takes these same enums (``gsa_cli.runtime`` re-exports :class:`Precision` beside its torch
dtypes, ``gsa_cli.data`` re-exports :class:`OnCorrupt`): the CLI keeps no mirrors of them.
"""

from __future__ import annotations

from enum import Enum


class Precision(str, Enum):
    """Compute precision; ``bf16`` and ``fp16`` run under autocast with float32 weights."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class OnCorrupt(str, Enum):
    """What to do with an image file that cannot be read."""

    FAIL = "fail"
    SKIP = "skip"


class MacCounter(str, Enum):
    """Which tool counts the multiply-adds."""

    FVCORE = "fvcore"  # fvcore's FlopCountAnalysis (tracing), with gsa_cli.bench.macs' handles
    TORCH = "torch"  # torch.utils.flop_counter.FlopCounterMode (dispatch), products only


class Mode(str, Enum):
    """What to time: inference, a training step, or both."""

    INFER = "infer"
    TRAIN = "train"
    BOTH = "both"

    @property
    def infer(self) -> bool:
        return self is not Mode.TRAIN

    @property
    def train(self) -> bool:
        return self is not Mode.INFER


class OutputFormat(str, Enum):
    """How a table is printed: a rich table, or the text of a CSV, JSON or Markdown file."""

    TABLE = "table"
    CSV = "csv"
    JSON = "json"
    MD = "md"


class Accuracy(str, Enum):
    """Which top-1 of a run a comparison plots: the best epoch's, the last epoch's, or ``gsa eval``'s."""

    BEST = "best"
    FINAL = "final"
    EVAL = "eval"


class ExportFormat(str, Enum):
    """What ``gsa export`` writes: an ONNX model (the dynamo exporter) or a ``torch.export`` program."""

    ONNX = "onnx"
    PT2 = "pt2"
