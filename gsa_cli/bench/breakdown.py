"""A MAC count broken down by module and by operator, for ``gsa profile --detail``.

Plain rows (dataclasses); :func:`gsa_cli.report.profile.module_frame` and
:func:`gsa_cli.report.profile.operator_frame` make the tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from gsa_cli.bench.macs import ELEMENTWISE_OPS, PRODUCT_OPS, MacCount
from gsa_cli.choices import MacCounter


@dataclass(frozen=True)
class ModuleShare:
    """A module's parameters and MACs (``module`` is ``(model)`` for the whole network)."""

    module: str
    params: int
    gmacs: float
    share_pct: float


@dataclass(frozen=True)
class OperatorShare:
    """An operator's count in G, what kind of count it is, and its share of the MAC total."""

    operator: str
    kind: str
    g: float
    share_pct: float | None  # None for elementwise operators, which are not in the total


def module_shares(count: MacCount, params: dict[str, int], *, depth: int = 2) -> list[ModuleShare]:
    """Per-module parameters and MACs down to ``depth`` levels of module names (``layer1.0`` is 2).

    In the model's order (that of ``params``, from ``named_modules``), whatever order the counter kept.
    """
    total = count.total or 1
    order = {name: position for position, name in enumerate(params)}
    shares = []
    for name, macs in sorted(count.by_module.items(), key=lambda item: order.get(item[0], len(order))):
        if name and name.count(".") >= depth:
            continue
        if name and macs == 0 and params.get(name, 0) == 0:
            continue  # ReLU, max pool: no parameters, nothing counted
        shares.append(ModuleShare(name or "(model)", params.get(name, 0), macs / 1e9, 100 * macs / total))
    return shares


def _operator_kind(op: str, counter: MacCounter) -> str:
    if op in ELEMENTWISE_OPS:
        return "elementwise (not in GMACs)"
    if op in PRODUCT_OPS or counter is MacCounter.TORCH:
        return "product"
    return "per-element cost"


def operator_shares(count: MacCount) -> list[OperatorShare]:
    """Per-operator counts, largest first; elementwise operators marked as not part of the MAC total."""
    total = count.total or 1
    shares = []
    for op, n in sorted(count.by_operator.items(), key=lambda item: -item[1]):
        kind = _operator_kind(op, count.counter)
        share = None if kind.startswith("elementwise") else 100 * n / total
        shares.append(OperatorShare(op, kind, n / 1e9, share))
    return shares
