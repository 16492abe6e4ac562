"""The XNNPACK PT2E quantizer, with conv + ReLU6 (``hardtanh``) fused like conv + ReLU.

Why: ``XNNPACKQuantizer`` annotates conv + ReLU as one pattern (the ReLU's output is
observed, the conv's is not), but has no such pattern for ``hardtanh`` (``nn.ReLU6``,
what every MobileNetV2 / EfficientNet-Lite block ends with): the conv is annotated alone
and the ``hardtanh`` *shares* the conv's observer. Each ReLU6 output is then quantized over
the conv's whole pre-activation range and keeps only the levels that fall in [0, 6]; on a
real ImageNet network that int8 program lost most of its agreement with float (README,
ExecuTorch section, measured on photos). XNNPACK itself fuses any clamp after a conv (its
lowering's ``FuseActivationPass`` takes ``hardtanh`` as it takes ``relu``), so annotating
the pair as one pattern, observed at the clamp's output, is what the delegate runs anyway:
one int8 conv whose output range is the clamped one. The same pattern for ``linear`` is
left out: no zoo model has a ReLU6 after a linear layer.
"""
from __future__ import annotations

from typing import Any

import torch

HARDTANH = (torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default)


def annotate_conv_hardtanh(graph_module: torch.fx.GraphModule, config: Any) -> int:
    """Annotate every conv whose only user is a ``hardtanh`` as XNNPACK's conv + ReLU
    annotator does (input, weight and bias quantized at the conv; output observed after the
    clamp). Returns how many pairs it annotated."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import (_is_annotated,
                                                                               _mark_nodes_as_annotated)
    from torchao.quantization.pt2e.quantizer import (QuantizationAnnotation, get_bias_qspec, get_input_act_qspec,
                                                     get_output_act_qspec, get_weight_qspec)
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY
    from torchao.quantization.pt2e.utils import _is_conv_node

    pairs = 0
    for clamp in graph_module.graph.nodes:
        if clamp.op != "call_function" or clamp.target not in HARDTANH:
            continue
        conv = clamp.args[0]
        if not isinstance(conv, torch.fx.Node) or not _is_conv_node(conv) or len(conv.users) > 1:
            continue
        weight = conv.args[1]
        bias = conv.args[2] if len(conv.args) > 2 else None
        qspecs = {conv.args[0]: get_input_act_qspec(config), weight: get_weight_qspec(config)}
        partition = [clamp, conv, weight]
        if isinstance(bias, torch.fx.Node):
            qspecs[bias] = get_bias_qspec(config)
            partition.append(bias)
        if _is_annotated(partition):
            continue
        conv.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(input_qspec_map=qspecs, _annotated=True)
        clamp.meta[Q_ANNOTATION_KEY] = QuantizationAnnotation(output_qspec=get_output_act_qspec(config),
                                                              _annotated=True)
        _mark_nodes_as_annotated(partition)
        pairs += 1
    return pairs


def xnnpack_quantizer() -> Any:
    """``XNNPACKQuantizer`` with the global symmetric per-channel config (the ExecuTorch
    XNNPACK docs' recipe), plus the conv + ``hardtanh`` pattern, annotated first so that the
    default annotators leave those pairs alone."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)

    class ClampFusingXNNPACKQuantizer(XNNPACKQuantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            if self.global_config is not None:
                annotate_conv_hardtanh(model, self.global_config)
            return super().annotate(model)

    return ClampFusingXNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))


__all__ = ["annotate_conv_hardtanh", "xnnpack_quantizer"]
