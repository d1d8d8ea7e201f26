"""What a compiled module's graphs call: the operators of its forward and backward graphs, as captured by
an AOT-autograd backend that compiles nothing."""

from __future__ import annotations

import torch


def compiled_call_targets(
    module: torch.nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, list[str], list[str]]:
    """Run ``module`` compiled (full graph) on ``x`` and backward through ``out.square().sum()``; return the
    output and the call targets of the forward and the backward graph."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[torch.fx.GraphModule] = []

    def keep(gm: torch.fx.GraphModule, inputs: object) -> object:
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    compiled = torch.compile(module, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    forward, backward = (
        [str(node.target) for node in graph.graph.nodes if node.op == "call_function"] for graph in graphs
    )
    return out, forward, backward
