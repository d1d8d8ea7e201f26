"""The loop's parts, checked against values worked out by hand."""

from __future__ import annotations

import torch

from gsa_cli.train.loop import batch_sums


def test_batch_sums_count_top1_and_top5_by_hand() -> None:
    logits = torch.tensor(
        [[9.0, 8, 7, 6, 5, 4], [0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]]
    )  # top-5 of row 0: classes 0-4; of row 1: 5-1; of row 2: 0-4
    labels = torch.tensor([0, 0, 5])  # row 0 top-1 hit; row 1 miss; row 2 miss
    sums = batch_sums(logits, labels, torch.tensor(2.0))
    assert sums.tolist() == [6.0, 1.0, 1.0, 3.0]
    soft = torch.nn.functional.one_hot(labels, 6).float() * 0.7 + 0.05  # mixup-style targets
    assert batch_sums(logits, soft, torch.tensor(2.0)).tolist() == [6.0, 1.0, 1.0, 3.0]
