"""Helpers for the ONNX export / parity tests: realistic weights, checkpoints, fault injection.

Random-init networks are poor parity subjects: zero-initialised heads and residual
gammas give logits of 1e-8, so any two runtimes "agree". ``make_realistic`` gives a
model the statistics of a trained one without training: zero-initialised tensors get
small values, BatchNorm running statistics are measured on real inputs (what
BN recalibration does), and the classifier is scaled so that logits spread over a few
units, like a trained classifier's.

Fault injection edits real initializers of an exported ``.onnx`` file: the parity check
and the first-divergent-layer search must find them as they would a converter bug.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

# A MobileNetV3-style network in a file of its own, as a user would have it (hard-swish,
# squeeze-excite with hard-sigmoid gate, inverted residuals, a reused activation module).
EXTERNAL_MODEL_SOURCE = '''
import torch
import torch.nn as nn


class SE(nn.Module):
    def __init__(self, c, rd):
        super().__init__()
        self.fc1 = nn.Conv2d(c, rd, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class Block(nn.Module):
    def __init__(self, cin, cexp, cout, k, stride, se):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(cin, cexp, 1, bias=False), nn.BatchNorm2d(cexp), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(cexp, cexp, k, stride, k // 2, groups=cexp, bias=False),
                                nn.BatchNorm2d(cexp), nn.Hardswish())
        self.se = SE(cexp, max(8, cexp // 4)) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(cexp, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class TinyMobileNetV3(nn.Module):
    def __init__(self, num_classes=10, in_chans=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(
            Block(16, 32, 16, 3, 1, se=True),
            Block(16, 48, 24, 5, 2, se=False),
            Block(24, 72, 24, 3, 1, se=True),
        )
        self.head = nn.Sequential(nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.Hardswish())
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(x.mean((2, 3), keepdim=True), 1))


def build():
    return TinyMobileNetV3(num_classes=10, in_chans=3)
'''


def write_external_model(folder: Path) -> str:
    """Write the MobileNetV3-style file into ``folder``; returns the ``file.py:build`` spec."""
    path = Path(folder) / "tiny_mnv3.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(EXTERNAL_MODEL_SOURCE)
    return f"{path}:build"


class SmallNet(nn.Module):
    """A few layers of every kind the divergence search must map: folded BN, depthwise,
    SE, a module called twice (``act``), a residual add, a linear head."""

    def __init__(self, in_chans: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16))
        self.act = nn.ReLU()
        self.pw = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.act(self.dw(x))
        x = self.act(self.pw(x))
        return self.fc(x.mean((2, 3)))


def make_realistic(model: nn.Module, x: torch.Tensor, logit_std: float = 3.0, seed: int = 0,
                   var_floor: float = 1e-2) -> nn.Module:
    """Trained-like statistics without training (see the module docstring).

    BatchNorm statistics are measured on ``x`` (BN recalibration), so every layer sees
    normalised activations as in a trained net. Random weights on MNIST (mostly black
    pixels) leave near-dead channels with running variances of 1e-15 that multiply fp32
    rounding by 1/sqrt(eps) ~ 300; in a trained net such channels are exactly zero and
    have no rounding to amplify. ``var_floor`` keeps that artefact of random weights out
    of tests about the pipeline (``ILL_CONDITIONED_SOURCE`` below tests the case itself).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
            m.reset_running_stats()
            m.momentum = None                 # cumulative average over the calibration batch
        model.train()
        model(x)
        model.eval()
        for m in bns:
            m.running_var.clamp_(min=var_floor)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if linears:
            std = float(model(x).std())
            if std > 0:
                linears[-1].weight.mul_(logit_std / std)
                if linears[-1].bias is not None:
                    linears[-1].bias.mul_(logit_std / std)
    return model


def exported_small_net(folder: Path, samples: int, dynamic_batch: bool = False) -> tuple[nn.Module, Any, np.ndarray]:
    """A trained-like ``SmallNet`` (seed 0) exported to ``folder/model.onnx`` at 1x3x32x32, its
    ``Artifact`` and the ``samples`` random inputs its BatchNorm statistics were measured on."""
    from exporters.onnx import export_onnx
    torch.manual_seed(0)
    x = torch.randn(samples, 3, 32, 32)
    model = make_realistic(SmallNet(), x)
    art = export_onnx(model, Path(folder) / "model.onnx", (1, 3, 32, 32), dynamic_batch=dynamic_batch)
    return model, art, x.numpy()


def mnist_checkpoint(path: Path, *, input_size: int = 28, width_mult: float = 0.35) -> Path:
    """An mdeploy checkpoint of a small MobileNetV2 for 1-channel MNIST, metadata as
    ``mdeploy train`` writes it (normalisation measured on MNIST, logits a few units
    wide on MNIST images). Untrained: accuracy is chance; parity is what is tested."""
    from exporters.fileio import atomic_write_bytes
    from models import create_model
    from models.checkpoint import checkpoint_bytes
    from models.datasets import dataset_stats, load_dataset, to_model_input
    torch.manual_seed(0)
    train = load_dataset("mnist", "train").subset(256)
    mean, std = dataset_stats(train.images)
    x = torch.from_numpy(to_model_input(train.images, input_size, tuple(mean), tuple(std)))
    kwargs = {"width_mult": width_mult}
    model = make_realistic(create_model("mobilenet_v2", num_classes=10, in_chans=1, **kwargs), x)
    meta = {"model": "mobilenet_v2", "model_kwargs": kwargs, "num_classes": 10, "in_chans": 1,
            "input_size": input_size, "mean": mean, "std": std, "channel_order": "GRAY",
            "labels": [str(i) for i in range(10)], "data": "mnist"}
    atomic_write_bytes(path, checkpoint_bytes(model, meta))
    return path


# -- fault injection -------------------------------------------------------------

def producer(model: Any, tensor: str) -> Any:
    return next(n for n in model.graph.node if tensor in n.output)


def initializer(model: Any, name: str) -> Any:
    return next(t for t in model.graph.initializer if t.name == name)


def edit_initializer(onnx_path: Path, name: str, fn) -> None:
    """Replace initializer ``name`` of the file by ``fn(array)``, in place."""
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(onnx_path))
    init = initializer(model, name)
    init.CopyFrom(numpy_helper.from_array(np.asarray(fn(numpy_helper.to_array(init).copy()),
                                                     dtype=np.float32), name))
    onnx.save(model, str(onnx_path))


def tensor_of(layer_map: dict[str, str], module: str) -> str:
    return next(t for t, m in layer_map.items() if m == module)


def corrupt_layer(onnx_path: Path, layer_map: dict[str, str], module: str, seed: int = 0) -> str:
    """Overwrite the weights behind ``module``'s tensor with noise of the same scale (a
    weight mix-up in a converter); returns the edited tensor's name."""
    import onnx
    tensor = tensor_of(layer_map, module)
    weight = producer(onnx.load(str(onnx_path)), tensor).input[1]
    rng = np.random.default_rng(seed)
    edit_initializer(onnx_path, weight, lambda w: rng.standard_normal(w.shape) * w.std())
    return tensor


def change_bn_epsilon(onnx_path: Path, layer_map: dict[str, str], module: str, bn: nn.BatchNorm2d,
                      new_eps: float = 1e-3) -> str:
    """Re-fold ``bn`` into its convolution with ``new_eps`` instead of its own epsilon: what
    a port with the TF/Keras default epsilon (1e-3) instead of PyTorch's (1e-5) ships."""
    import onnx
    tensor = tensor_of(layer_map, module)
    node = producer(onnx.load(str(onnx_path)), tensor)
    var = bn.running_var.detach().double().numpy()
    factor = np.sqrt((var + bn.eps) / (var + new_eps))      # new scale / old scale, per channel
    beta = bn.bias.detach().double().numpy()
    edit_initializer(onnx_path, node.input[1], lambda w: w * factor.reshape(-1, *([1] * (w.ndim - 1))))
    edit_initializer(onnx_path, node.input[2], lambda b: beta + (b - beta) * factor)
    return tensor


# A model that is ill-conditioned in fp32: channel 0 of the convolution sits at ~1000 with
# a signal of ~1e-3 riding on it, and its BatchNorm (running mean 1000, variance 1e-6)
# subtracts the 1000 and multiplies by ~300. Eager PyTorch rounds 1000 + signal to fp32
# (ulp 6e-5, i.e. 6% of the signal) before the subtraction; the exported graph folds the
# BatchNorm into the convolution, which removes the cancellation. So ONNX Runtime is
# *closer* to float64 than PyTorch fp32 is, and the fp32 bound still fails.
ILL_CONDITIONED_SOURCE = '''
import torch
import torch.nn as nn


class IllConditioned(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 5)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(4, 3, 1, 1, generator=g))
            self.conv.weight[0] *= 1e-3
            self.conv.bias.zero_()
            self.conv.bias[0] = 1000.0
            self.bn.running_mean.zero_()
            self.bn.running_mean[0] = 1000.0
            self.bn.running_var.fill_(1.0)
            self.bn.running_var[0] = 1e-6
            self.fc.weight.copy_(torch.randn(5, 4, generator=g))

    def forward(self, x):
        return self.fc(self.act(self.bn(self.conv(x))).mean((2, 3)))


def build():
    return IllConditioned().eval()
'''
