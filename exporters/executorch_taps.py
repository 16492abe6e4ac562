"""Tap programs: a ``.pte``'s per-layer tensors, for the first-divergent-layer search.

Why a second program: an ExecuTorch program exposes only its outputs. Inside an XNNPACK
delegate no intermediate tensor is ever materialised, and ETDump's intermediate outputs
stop at the delegate boundary ("every delegate call is a single operator", the
ExecuTorch debugging docs), so on a fully delegated model ETDump sees one op. What can be
compared is the same graph with every module's output made a *program output*, lowered
by the same partitioner: the *tap program*, ``<stem>_<precision>.taps.pte`` beside the
shipped file. It is built from the very graph the shipped file was built from (for int8,
the same converted PT2E graph: the same scales and zero points, no second calibration),
so each tap is the tensor the shipped program computes there, and its first output is
checked against the shipped program's output when it is written.

Which tensors are taps (the same keys every runtime gets, ``exporters.layer_map``):

* a node's module scope is its FX ``nn_module_stack``; a node output that leaves a module
  is that module's output (``layer_map.module_outputs``, the rule ONNX graphs use);
* a convolution whose only user is a BatchNorm is folded into it (XNNPACK fuses the pair
  in fp32, PT2E folds it before int8): the BatchNorm's module names the result, and the
  bare convolution has no tensor of its own (tapping it would stop the fusion);
* in an int8 graph a layer has a tensor only where the quantizer put a
  quantize/dequantize pair after it: the tap is that dequantized value (what the next
  layer reads); a layer fused into the next one (a conv before its ReLU) has none, as in
  the real int8 execution.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from exporters.layer_map import module_outputs

TAP_PREFIX = "tap_"
TAPS_SUFFIX = ".taps.pte"
_FOLDING_USERS = ("batch_norm", "_native_batch_norm_legit_no_training")
_QUANTIZE = ("quantize_per_tensor",)
_DEQUANTIZE = ("dequantize_per_tensor",)
# Activations XNNPACK fuses into the op before them (its output_min/max), also in int8.
_FUSED_ACTIVATIONS = ("relu", "relu_", "hardtanh", "hardtanh_", "clamp")
# Ops that compute nothing: their output is their input's values (compared already at the
# layer that made them), and XNNPACK refuses a delegate output that is a view of its input.
_NO_COMPUTE = ("view", "reshape", "flatten", "squeeze", "unsqueeze", "clone", "alias", "dropout",
               "contiguous", "expand", "_to_copy", "detach", "identity")


def _op_name(node: Any) -> str:
    """``aten.conv2d.default`` -> ``conv2d``; ``quantized_decomposed.quantize_per_tensor.default``
    -> ``quantize_per_tensor``."""
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _chain(node: Any) -> list[str]:
    """Module paths enclosing ``node``, outermost first, root excluded."""
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _type in stack.values() if path]


def folded_convolutions(graph: Any) -> dict[str, list[str]]:
    """Convolution node name -> the scope chain of the BatchNorm it feeds alone: the
    pair is one tensor, named by the BatchNorm. Read from the float graph, before PT2E
    folds the BatchNorm away (the node names survive ``prepare_pt2e``/``convert_pt2e``)."""
    out: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.op != "call_function" or "conv" not in _op_name(node):
            continue
        users = list(node.users)
        if len(users) == 1 and _op_name(users[0]) in _FOLDING_USERS:
            out[node.name] = _chain(users[0])
    return out


def tap_nodes(graph: Any, folded: dict[str, list[str]], *, quantized: bool) -> list[tuple[Any, str]]:
    """``(node to tap, module call key)`` in execution order (see the module docstring)."""
    nodes = [n for n in graph.nodes if n.op == "call_function"]
    chains: dict[str, list[str]] = {}
    order: list[str] = []
    consumers: dict[str, list[list[str]]] = defaultdict(list)
    by_name = {n.name: n for n in nodes}
    for node in nodes:
        chain = folded.get(node.name) or _chain(node)
        for arg in node.all_input_nodes:
            consumers[arg.name].append(chain)
        if chain:
            chains[node.name] = chain
            order.append(node.name)
    for arg in graph.output_node().all_input_nodes:
        consumers[arg.name].append([])             # the program's caller is outside every module
    taps: list[tuple[Any, str]] = []
    for name, key in module_outputs(order, chains, consumers).items():
        node = by_name[name]
        if _op_name(node) in _NO_COMPUTE:
            continue
        users = list(node.users)
        if len(users) == 1 and _op_name(users[0]) in _FOLDING_USERS and node.name in folded:
            continue                               # fp32: the BatchNorm after it is the tap
        if quantized:
            node = _dequantized(node)
            if node is None:
                continue                           # fused into the next layer: no int8 tensor
        taps.append((node, key))
    return taps


def _dequantized(node: Any) -> Any | None:
    """The dequantize that reads ``node``'s quantized value, if the quantizer put one."""
    users = list(node.users)
    if len(users) != 1 or _op_name(users[0]) not in _QUANTIZE:
        return None
    dq = [u for u in users[0].users if _op_name(u) in _DEQUANTIZE]
    if not dq:
        return None
    readers = [r for d in dq for r in d.users]
    if readers and all(_op_name(r) in _FUSED_ACTIVATIONS for r in readers):
        return None     # XNNPACK fuses the activation into this layer: its value is never unclamped
    return dq[0]


def with_taps(graph_module: torch.fx.GraphModule, taps: list[tuple[Any, str]]) -> torch.fx.GraphModule:
    """``graph_module`` (an unlifted ``ExportedProgram.module()`` or a converted PT2E graph)
    returning ``(*its outputs, *taps)`` as one flat tuple. Its pytree calling convention is
    replaced by the plain one (positional inputs, a flat tuple out), which is what
    ``torch.export`` sees of a one-input image model anyway."""
    graph = graph_module.graph
    output = graph.output_node()
    flat = list(torch.utils._pytree.tree_leaves(output.args[0]))
    tapped = []
    for node, _key in taps:
        if _op_name(node) in _DEQUANTIZE:
            # a dequantize of its own for the output: XNNPACK lowers a dequantize with one
            # user (DuplicateDequantNodePass gives each user its own, and the copies of an
            # output lose their shape metadata)
            with graph.inserting_after(node):
                copy = graph.call_function(node.target, node.args, node.kwargs)
            copy.meta = dict(node.meta)
            node = copy
        elif any(_op_name(u).endswith("_") for u in node.users):
            # an in-place user (``ReLU6(inplace=True)`` is ``hardtanh_`` in this graph) would
            # clamp the tapped tensor itself: the tap is a copy taken before it
            with graph.inserting_after(node):
                copy = graph.call_function(torch.ops.aten.clone.default, (node,))
            copy.meta = dict(node.meta)
            node = copy
        tapped.append(node)
    graph._codegen = torch.fx.graph.CodeGen()
    output.args = (tuple(flat) + tuple(tapped),)
    graph.lint()
    graph_module.recompile()
    return graph_module


def tap_names(count: int) -> list[str]:
    return [f"{TAP_PREFIX}{i}" for i in range(count)]


def tap_program(graph_module: torch.fx.GraphModule, folded: dict[str, list[str]], example: torch.Tensor,
                lower: Any, *, quantized: bool) -> tuple[bytes, dict[str, str]]:
    """The tap program's bytes and its layer map (``tap_<i>`` -> module call key, in
    execution order; program output ``len(outputs) + i`` is ``tap_<i>``).

    ``graph_module`` is changed in place: pass the graph the shipped program was lowered
    from only after that. ``lower`` is the shipped program's own lowering (the same
    partitioner), so both run the same kernels."""
    taps = tap_nodes(graph_module.graph, folded, quantized=quantized)
    tapped = with_taps(graph_module, taps)
    buffer = lower(torch.export.export(tapped, (example,))).to_executorch().buffer
    return bytes(buffer), dict(zip(tap_names(len(taps)), (key for _node, key in taps)))


def taps_path(pte: Path) -> Path:
    """``model_fp32.pte`` -> ``model_fp32.taps.pte`` (derived, never read from a manifest)."""
    name = pte.name[: -len(".pte")] if pte.name.endswith(".pte") else pte.name
    return pte.with_name(name + TAPS_SUFFIX)
