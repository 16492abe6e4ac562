"""Which tensor of an artifact is the output of which PyTorch module: the layer map.

The first-divergent-layer search (``device_tests/divergence.py``) compares a target
runtime's intermediate tensors with PyTorch forward-hook outputs. It needs, for each
artifact, ``artifact.extra["layer_map"]``: a dict *artifact tensor name -> module
call key*. Every exporter records one in this format.

A **module call key** is the module's path in ``model.named_modules()`` (``"features.3.conv.1"``)
for its first call in a forward pass, and ``"<path>#<k>"`` for its k-th later call (a
module applied twice, e.g. one ``self.relu`` reused, has two outputs to compare). The
root module (path ``""``) is never a key: the graph outputs are compared already.

For ONNX from ``torch.onnx.export(dynamo=True)``, each node carries the module scope it
came from in ``metadata_props["pkg.torch.onnx.name_scopes"]`` (e.g. ``['', 'stem',
'stem.1', 'conv2d']``). A tensor is the output of module M when a node inside M's scope
produces it and a node outside M's scope (or the graph output) consumes it; if it leaves
several nested modules at once (a ``Sequential`` and its last child), the innermost one
names it, since that is the module a user would edit. Fused nodes keep the scope of the
last op they replace (Conv+BatchNorm folded -> the BatchNorm), so a folded BatchNorm's
output is compared, the bare convolution before it has no tensor to compare, and is
simply absent from the map.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from typing import Any, NamedTuple

NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def call_key(path: str, index: int) -> str:
    """The key of the ``index``-th call (0-based) of the module at ``path``."""
    return path if index == 0 else f"{path}#{index}"


def split_call_key(key: str) -> tuple[str, int]:
    path, sep, idx = key.rpartition("#")
    if sep and idx.isdigit():
        return path, int(idx)
    return key, 0


def _scope_chain(node: Any) -> list[str] | None:
    """Module paths enclosing ``node``, outermost first, root excluded; None if unknown."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            # The last element is the op itself, the first the root module ("").
            return [s for s in scopes[:-1] if s]
    return None


def layer_map_from_onnx(model: Any) -> dict[str, str]:
    """Tensor name -> module call key for an ONNX ``ModelProto`` exported by dynamo.

    Returns an empty dict for a model without scope metadata (e.g. from the TorchScript
    exporter or a third-party file); divergence search then reports nothing to match.
    """
    graph = model.graph
    chains: dict[str, list[str]] = {}          # tensor -> scope chain of its producer
    order: list[str] = []                      # produced tensors, in node (topological) order
    consumers: dict[str, list[list[str]]] = defaultdict(list)
    for node in graph.node:
        chain = _scope_chain(node)
        for name in node.input:
            if name:
                consumers[name].append(chain if chain is not None else [])
        if chain is None:
            continue
        for name in node.output:
            if name:
                chains[name] = chain
                order.append(name)
    for out in graph.output:
        consumers[out.name].append([])         # the graph's caller is outside every module

    return module_outputs(order, chains, consumers)


def module_outputs(order: list[str], chains: dict[str, list[str]],
                   consumers: dict[str, list[list[str]]]) -> dict[str, str]:
    """Tensor -> module call key, for each tensor (in ``order``, topological) that leaves
    a module: its producer's scope chain (``chains``, outermost first, root excluded) has
    a module that one of its consumers' chains (``consumers``; ``[]`` for the graph's
    caller, or a node of no module) does not. The innermost such module names it. One
    rule for every graph that records module scopes (ONNX name scopes, FX
    ``nn_module_stack``), so every runtime's layers get the same keys."""
    counts: dict[str, int] = defaultdict(int)
    result: dict[str, str] = {}
    for tensor in order:
        chain = chains[tensor]
        users = consumers.get(tensor, [])
        if not chain or not users:
            continue
        # Innermost module that this tensor leaves: some consumer is not inside it.
        owner = next((m for m in reversed(chain) if any(m not in u for u in users)), None)
        if owner is None:
            continue
        result[tensor] = call_key(owner, counts[owner])
        counts[owner] += 1
    return result


def _inside(key: str, module: str, call: int) -> bool:
    path, index = split_call_key(key)
    return (path, index) == (module, call) or path.startswith(module + ".")


class ModuleGraph(NamedTuple):
    nodes: list[Any]            # NodeProtos, in graph order
    inputs: list[str]           # activation tensors read from outside the module
    output: str                 # the tensor the layer map names as the module's output


def module_nodes(model: Any, layer_map: dict[str, str], module: str, call: int = 0) -> ModuleGraph | None:
    """The nodes of an ONNX graph that compute one call of ``module`` (a module path), and
    the activation tensors they read from outside it.

    Walks back from the tensor the layer map names as the module's output (its ``call``-th)
    and stops at tensors that other modules produce (by the layer map), at graph inputs
    and at constants (initializers, ``Constant`` nodes), so the result is the module's own
    part of the graph. ``None`` when the layer map has no output for that call (a module
    that computes nothing, e.g. an identity, leaves no tensor of its own).
    """
    want = call_key(module, call)
    out = next((t for t, k in layer_map.items() if k == want), None)
    if out is None:
        return None
    graph = model.graph
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    constants = {t.name for t in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output}
    graph_inputs = {i.name for i in graph.input}
    seen: set[int] = set()
    inputs: list[str] = []
    stack = [out]
    while stack:
        tensor = stack.pop()
        i = producer.get(tensor)
        if i is None or i in seen:
            continue
        seen.add(i)
        for name in graph.node[i].input:
            if not name or name in constants:
                continue
            key = layer_map.get(name)
            if name in graph_inputs or (key is not None and not _inside(key, module, call)):
                if name not in inputs:
                    inputs.append(name)
            else:
                stack.append(name)
    return ModuleGraph([graph.node[i] for i in sorted(seen)], inputs, out)
