"""Counting a model's multiply-adds (MACs), with fvcore or with ``torch.utils.flop_counter``.

The unit is the multiply-add, counted once (fvcore's convention; ``FlopCounterMode`` counts two FLOPs
per multiply-add, so its totals are halved here). The model runs once, in eval mode, at batch 1.

With fvcore the handles below replace or add to fvcore's defaults, so that every operator of the GSA
and dense-attention modules is counted:

* **Products**, as multiply-adds: convolution, linear, ``mm``/``bmm``/``matmul`` (batch dimensions
  broadcast), ``einsum`` (exactly: fvcore's own einsum handle reads numpy's rounded ``einsum_path``
  report, off by up to 0.05%), ``scaled_dot_product_attention`` (``N * M * (d_k + d_v)`` per head:
  the ``q k^T`` and attention-times-values products), GSA's axial positional passes and its content
  branch, custom autograd functions that fvcore sees as one ``prim::PythonOp`` each
  (``N * L * (d_k + d_v)`` for a pass along an axis of length ``L``; ``2 N d_k d_v / h`` for the
  content branch, plus its softmaxes), keyed on the names :mod:`gsa_cli.models.gsa_kernels` exports,
  and the native kernel's custom operators (``gsa::axial_attention``, :mod:`gsa_cli.models.gsa_native`;
  ``gsa::content_attention``, :mod:`gsa_cli.models.gsa_native_content`) at the same counts
  (``FlopCounterMode`` counts them by the formulas those modules register).
  The module's reference implementation (plain einsums and softmaxes) counts the same totals, under
  ``einsum`` and ``softmax``.
* **Per-element costs** (fvcore's conventions where it has one), also in the MAC total:
  batch norm 2 per element in eval mode (fvcore), adaptive average pool 1 per input element (fvcore),
  average pool 1 per input element of each window, ``mean``/``sum`` 1 per input element, softmax 3
  per element (exponential, running sum, division), including the softmax inside SDPA.
* **Elementwise arithmetic** (``add``, ``sub``, ``mul``, ``div``, ...: the residual sum, GSA's branch
  sum) at 1 per floating-point output element, reported in its own total and **not** in the MACs, so
  that the MAC totals stay those torchvision and timm publish (ResNet-50: 4.11 G).
* **Not arithmetic**, counted as zero: ReLU, max pooling, comparisons, selection and data movement
  (views, permutes, padding, indexing; fvcore's ignore list plus :data:`NO_ARITHMETIC`).

Any other operator is reported in :attr:`MacCount.uncounted`; a product among them is an error.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gsa_cli.choices import MacCounter
from gsa_cli.errors import GsaError
from gsa_cli.models.gsa_kernels import AXIAL_FUNCTION, CONTENT_FUNCTION
from gsa_cli.models.gsa_native import AXIAL_OP
from gsa_cli.models.gsa_native_content import CONTENT_OP
from gsa_cli.runtime import module_mode

# Operator names as reported in MacCount.by_operator (fvcore's simplified names: "aten::" dropped).
PRODUCT_OPS = frozenset(
    {
        *("conv", "linear", "addmm", "mm", "bmm", "baddbmm", "matmul", "einsum"),
        *("scaled_dot_product_attention", "axial_relative_attention", "content_attention"),
    }
)
ELEMENTWISE_OPS = frozenset(
    {"add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "neg", "abs", "exp", "sqrt", "rsqrt"}
)
NO_ARITHMETIC = frozenset(
    {
        *("aten::unflatten", "aten::pad", "aten::where", "aten::lt", "aten::le", "aten::ne"),
        *("aten::max_pool2d", "aten::hardtanh_", "aten::hardtanh", "aten::clone", "aten::movedim"),
        *("aten::contiguous", "aten::flatten", "aten::mT", "aten::index_select"),
    }
)
# An uncounted operator whose name matches this does products: the count would be wrong. A custom
# autograd function (prim::PythonOp) may do anything, so an uncounted one counts as a product too.
_PRODUCT_LIKE = re.compile(
    r"mm|mv|matmul|einsum|conv|linear|attention|bilinear|tensordot|dot|inner|outer|ger|kron|cdist|lstm|gru|rnn"
    r"|PythonOp",
    re.IGNORECASE,
)
SOFTMAX_COST = 3  # per element: exponential, running sum, division


@dataclass(frozen=True)
class MacCount:
    """Multiply-adds of one forward pass at batch 1, and where they are.

    Attributes:
        counter: The tool that counted.
        total: MACs: products plus the per-element costs of norms, pools and softmax.
        products: The part of ``total`` done by products (convolutions, linear, matmul-like, attention).
        elementwise: Elementwise arithmetic operations, not part of ``total``; ``None`` when the counter
            does not count them (``torch``).
        by_operator: Count per operator name, elementwise operators included.
        by_module: MACs (``total``'s sense) per module name; ``""`` is the whole model.
        uncounted: Operators the counter met but did not count (other than those that do no
            arithmetic), with their number of calls. ``FlopCounterMode`` counts products only, so with
            ``torch`` the norms, pools, softmax and elementwise operators are here.
    """

    counter: MacCounter
    total: int
    products: int
    elementwise: int | None
    by_operator: dict[str, int]
    by_module: dict[str, int]
    uncounted: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# fvcore handles: each gets the traced node's inputs and outputs as torch._C.Value objects.

Handle = Callable[[list[Any], list[Any]], Any]
_FLOATING = {"Float", "Double", "Half", "BFloat16"}


def _shape(value: Any) -> list[int] | None:
    """The static shape of a traced value, or ``None`` when it is not a tensor of known shape."""
    if value.isCompleteTensor():
        return list(value.type().sizes())
    return None


def _known_shape(value: Any, op: str) -> list[int]:
    shape = _shape(value)
    if shape is None:
        raise GsaError(
            f"fvcore traced an {op} operand of unknown shape: cannot count it; use --counter torch"
        )
    return shape


def _broadcast_batch(*shapes: Sequence[int]) -> int:
    return math.prod(torch.broadcast_shapes(*(torch.Size(s) for s in shapes)))


def _matmul_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::matmul``/``mm``/``bmm``: ``batch * n * k * m``, batch dimensions broadcast."""
    a, b = _known_shape(inputs[0], "matmul"), _known_shape(inputs[1], "matmul")
    if len(a) == 1:
        a = [1, *a]
    if len(b) == 1:
        b = [*b, 1]
    return _broadcast_batch(a[:-2], b[:-2]) * a[-2] * a[-1] * b[-1]


def _addmm_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::addmm``/``baddbmm``(bias, a, b): the product; the bias add is not counted."""
    return _matmul_macs(inputs[1:3], outputs)


def _einsum_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::einsum``: each pairwise contraction costs the product of all its index sizes.

    Two operands: exactly ``prod(size of every letter)``. More: along numpy's optimal path.
    """
    equation = str(inputs[0].toIValue()).replace(" ", "")
    return einsum_macs(equation, [_known_shape(v, "einsum") for v in inputs[1].node().inputs()])


def einsum_macs(equation: str, shapes: Sequence[Sequence[int]]) -> int:
    """Multiply-adds of ``torch.einsum(equation, *operands)`` for operands of the given shapes."""
    left, arrow, output = equation.partition("->")
    terms = left.split(",")
    if "..." in equation:  # name the broadcast dimensions with unused capitals
        spare = [c for c in string.ascii_uppercase if c not in equation]
        rank = max(len(s) - len(t.replace("...", "")) for t, s in zip(terms, shapes, strict=True))
        dots = "".join(spare[:rank])
        terms = [
            t.replace("...", dots[rank - (len(s) - len(t.replace("...", ""))) :])
            for t, s in zip(terms, shapes, strict=True)
        ]
        output = output.replace("...", dots)
    if not arrow:  # implicit output: the letters that appear once, in alphabetical order
        letters = "".join(terms)
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes, strict=True):
        for letter, size in zip(term, shape, strict=True):
            sizes[letter] = max(sizes.get(letter, 1), size)

    def cost(letters: str) -> int:
        return math.prod(sizes[c] for c in set(letters))

    if len(terms) == 1:  # a permutation costs nothing; a reduction one add per input element
        return cost(terms[0]) if set(output) != set(terms[0]) else 0
    if len(terms) == 2:
        return cost(terms[0] + terms[1])
    import numpy as np

    views = [np.broadcast_to(np.zeros(()), tuple(s)) for s in shapes]
    path = np.einsum_path(f"{','.join(terms)}->{output}", *views, optimize="optimal")[0][1:]
    remaining, macs = list(terms), 0
    for pair in path:
        picked = [remaining.pop(i) for i in sorted(pair, reverse=True)]
        letters = "".join(picked)
        macs += cost(letters)
        rest = "".join(remaining) + output
        remaining.append("".join(sorted(c for c in set(letters) if c in rest)))
    return macs


def _sdpa_macs(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    """``scaled_dot_product_attention(q, k, v)``: ``q k^T`` and ``attn v`` as products, and its softmax.

    With q ``(..., N, d_k)``, k ``(..., M, d_k)``, v ``(..., M, d_v)``: ``N M d_k + N M d_v`` per batch and
    head, and softmax on the ``N x M`` scores. The 1/sqrt(d) scaling is not counted.
    """
    q, k, v = (_known_shape(value, "attention") for value in inputs[:3])
    batch = _broadcast_batch(q[:-2], k[:-2], v[:-2])
    scores = batch * q[-2] * k[-2]
    return Counter(
        {"scaled_dot_product_attention": scores * (q[-1] + v[-1]), "softmax": SOFTMAX_COST * scores}
    )


def _axial_attention_macs(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    """GSA's axial positional pass (:class:`~gsa_cli.models.gsa_kernels.AxialRelativeAttention`).

    With queries ``(B, h, d, H, W)``, values ``(B, h, c, H, W)`` and pairs ``(h, A, d, A)`` for the
    attended axis of length ``A``: the logits ``B h H W A d`` and their product with the values
    ``B h H W A c``.
    """
    batch, heads, keys, height, width = _known_shape(inputs[0], "axial attention")
    values = _known_shape(inputs[1], "axial attention")[2]
    length = _known_shape(inputs[2], "axial attention")[1]
    return Counter({"axial_relative_attention": batch * heads * height * width * length * (keys + values)})


def _content_attention_macs(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    """GSA's content branch (:class:`~gsa_cli.models.gsa_kernels.ContentAttention`).

    With queries and keys ``(B, h, d, N)`` and values ``(B, h, c, N)``: the context ``B h d c N`` and
    its product with the queries ``B h c d N``; the softmax of the keys over positions (and of the
    queries over channels with ``query_softmax``) at :data:`SOFTMAX_COST` per element.
    """
    # The traced PythonOp keeps its non-tensor argument (query_softmax) as a scalar, not an input.
    return _content_counts(inputs, query_softmax=bool(outputs[0].node().scalar_args()[0]))


def _native_content_macs(inputs: list[Any], outputs: list[Any]) -> Counter[str]:
    """The native content operator: the same inputs, never a query softmax."""
    return _content_counts(inputs, query_softmax=False)


def _content_counts(inputs: list[Any], *, query_softmax: bool) -> Counter[str]:
    batch, heads, keys, positions = _known_shape(inputs[0], "content attention")
    values = _known_shape(inputs[2], "content attention")[2]
    softmaxes = 2 if query_softmax else 1
    return Counter(
        {
            "content_attention": 2 * batch * heads * keys * values * positions,
            "softmax": SOFTMAX_COST * softmaxes * batch * heads * keys * positions,
        }
    )


def _softmax_cost(inputs: list[Any], outputs: list[Any]) -> int:
    shape = _shape(inputs[0])
    return SOFTMAX_COST * math.prod(shape) if shape is not None else 0


def _per_input_element(inputs: list[Any], outputs: list[Any]) -> int:
    shape = _shape(inputs[0])
    return math.prod(shape) if shape is not None else 0


def _int_list(value: Any) -> list[int]:
    """A traced ``int[]`` argument: a constant list, or a list built from constants."""
    constant = value.toIValue()
    if constant is not None:
        return [int(i) for i in constant]
    return [int(item.toIValue()) for item in value.node().inputs()]


def _pooled_elements(length: int, kernel: int, stride: int, padding: int, out_length: int) -> int:
    """Input elements summed over all windows along one axis (windows clipped to the input)."""
    return sum(
        min(o * stride - padding + kernel, length) - max(o * stride - padding, 0) for o in range(out_length)
    )


def _avg_pool2d_cost(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::avg_pool2d``: one add per input element of each window (clipped at the borders)."""
    x, y = _known_shape(inputs[0], "avg_pool2d"), _known_shape(outputs[0], "avg_pool2d")
    kernel, stride, padding = (_int_list(value) for value in inputs[1:4])
    stride = stride or kernel

    def axis(i: int) -> int:
        def pick(values: list[int]) -> int:
            return values[i] if len(values) > 1 else values[0]

        return _pooled_elements(x[-2 + i], pick(kernel), pick(stride), pick(padding), y[-2 + i])

    return math.prod(x[:-2]) * axis(0) * axis(1)


def _elementwise_ops(inputs: list[Any], outputs: list[Any]) -> int:
    """One operation per floating-point output element (integer index arithmetic is not counted)."""
    shape = _shape(outputs[0])
    if shape is None or outputs[0].type().scalarType() not in _FLOATING:
        return 0
    return math.prod(shape)


FVCORE_HANDLES: dict[str, Handle] = {
    "aten::matmul": _matmul_macs,
    "aten::mm": _matmul_macs,
    "aten::bmm": _matmul_macs,
    "aten::addmm": _addmm_macs,
    "aten::baddbmm": _addmm_macs,
    "aten::einsum": _einsum_macs,
    "aten::scaled_dot_product_attention": _sdpa_macs,
    f"prim::PythonOp.{AXIAL_FUNCTION}": _axial_attention_macs,
    AXIAL_OP: _axial_attention_macs,  # the native kernel's operator: the same inputs
    f"prim::PythonOp.{CONTENT_FUNCTION}": _content_attention_macs,
    CONTENT_OP: _native_content_macs,
    "aten::softmax": _softmax_cost,
    "aten::log_softmax": _softmax_cost,
    "aten::avg_pool2d": _avg_pool2d_cost,
    "aten::mean": _per_input_element,
    "aten::sum": _per_input_element,
    **{f"aten::{name}": _elementwise_ops for name in ELEMENTWISE_OPS},
}


# ---------------------------------------------------------------------------------------------------
# The counters.


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence fvcore's tracer warnings and log lines: what they report is returned instead."""
    logger = logging.getLogger("fvcore")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _split_totals(by_operator: dict[str, int]) -> tuple[int, int, int]:
    """(MACs, products, elementwise) from a per-operator count."""
    elementwise = sum(n for op, n in by_operator.items() if op in ELEMENTWISE_OPS)
    products = sum(n for op, n in by_operator.items() if op in PRODUCT_OPS)
    total = sum(n for op, n in by_operator.items() if op not in ELEMENTWISE_OPS)
    return total, products, elementwise


def _count_fvcore(model: nn.Module, x: torch.Tensor) -> MacCount:
    with _quiet():
        from fvcore.nn import FlopCountAnalysis  # warns that torch.jit is deprecated: fvcore traces

        analysis = FlopCountAnalysis(model, x).set_op_handle(**FVCORE_HANDLES)
        analysis.set_op_handle(**dict.fromkeys(NO_ARITHMETIC))  # a None handle: counted as zero
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        by_operator = {op: int(n) for op, n in analysis.by_operator().items()}
        per_module = analysis.by_module_and_operator()
        uncounted = dict(analysis.unsupported_ops())
    products = sorted(op for op in uncounted if _PRODUCT_LIKE.search(op))
    if products:
        raise GsaError(
            f"fvcore found products it cannot count ({', '.join(products)}): the MAC count would be "
            "wrong; use --counter torch"
        )
    by_module = {
        name: int(sum(n for op, n in ops.items() if op not in ELEMENTWISE_OPS))
        for name, ops in per_module.items()
    }
    total, products_total, elementwise = _split_totals(by_operator)
    return MacCount(
        counter=MacCounter.FVCORE,
        total=total,
        products=products_total,
        elementwise=elementwise,
        by_operator=by_operator,
        by_module=by_module,
        uncounted=uncounted,
    )


def _torch_module_name(name: str) -> str:
    """FlopCounterMode's ``Global`` / ``ResNet.layer1.0`` to fvcore's ``""`` / ``layer1.0``."""
    if name == "Global":
        return ""
    return name.partition(".")[2]


def _cpu_sdpa_flops(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(query, key, value))


# Dispatched operators that only move or view data; not reported as uncounted.
_TORCH_NO_ARITHMETIC = frozenset(
    {
        *("clone", "copy_", "_to_copy", "_unsafe_view", "cat", "constant_pad_nd", "index", "index_select"),
        *("where", "empty", "zeros", "arange", "full", "full_like", "lt", "relu", "relu_"),
        "max_pool2d_with_indices",
    }
)


def _count_torch(model: nn.Module, x: torch.Tensor) -> MacCount:
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    seen: Counter[Any] = Counter()

    class Recorder(TorchDispatchMode):
        """Notes every operator dispatched, to report those FlopCounterMode has no formula for."""

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if not func.is_view:
                seen[func._overloadpacket] += 1
            return func(*args, **(kwargs or {}))

    # FlopCounterMode knows SDPA's CUDA kernels but not its CPU one (torch 2.14): add it.
    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as mode, Recorder():
        model(x)
    uncounted = {
        f"aten::{packet.__name__}": calls
        for packet, calls in seen.items()
        if packet not in mode.flop_registry and packet.__name__ not in _TORCH_NO_ARITHMETIC
    }
    products = sorted(op for op in uncounted if _PRODUCT_LIKE.search(op))
    if products:
        raise GsaError(
            f"FlopCounterMode has no formula for the products {', '.join(products)}: use --counter fvcore"
        )
    counts = mode.get_flop_counts()
    by_operator = {str(op).split(".")[1]: int(n) // 2 for op, n in counts.get("Global", {}).items()}
    by_module: dict[str, int] = {}
    for name, ops in counts.items():
        if name != "Global" and "." not in name:  # the root module: the same as Global
            continue
        by_module[_torch_module_name(name)] = int(sum(ops.values())) // 2
    total = mode.get_total_flops() // 2
    return MacCount(
        counter=MacCounter.TORCH,
        total=total,
        products=total,
        elementwise=None,
        by_operator=by_operator,
        by_module=by_module,
        uncounted=uncounted,
    )


def count_macs(
    model: nn.Module, *, img_size: int, channels: int = 3, counter: MacCounter = MacCounter.FVCORE
) -> MacCount:
    """Count the multiply-adds of one forward pass of ``model`` at batch 1, in eval mode.

    Args:
        model: The network; counted where its parameters are, left in its previous mode. Count an
            uncompiled model (neither counter sees through ``torch.compile``).
        img_size: Height and width of the input image.
        channels: Image channels.
        counter: ``fvcore`` (tracing, with the handles above) or ``torch`` (``FlopCounterMode``).

    Raises:
        GsaError: when the counter meets a product it cannot count.
    """
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, channels, img_size, img_size, generator=generator).to(device)
    with module_mode(model, training=False), torch.no_grad():
        if counter is MacCounter.FVCORE:
            return _count_fvcore(model, x)
        return _count_torch(model, x)


def count_gmacs(model: nn.Module, *, img_size: int, channels: int) -> float | None:
    """Multiply-adds of one image in G (fvcore, batch 1, eval mode), or None where it cannot count.

    What ``summary.json`` records for a run and ``gsa compare`` counts for a run that lacks it; the
    caller says "not counted" for None rather than print a wrong number.
    """
    try:
        count = count_macs(model, img_size=img_size, channels=channels)
    except GsaError:
        return None
    return count.total / 1e9
