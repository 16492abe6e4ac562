"""Checks shared by the zoo test files: counts on the meta device, small forward, a short
training run, and the one trained-like weight recipe of the parity sweeps (ONNX, TFLite, Core ML).

MACs and parameter counts depend on shapes only, so ``meta_complexity`` builds
the model and runs the counting forward on the meta device: the same modules
and the same forward, without the arithmetic or the memory (DenseNet-161 at 224
is 7.7 GMACs).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from device_tests.accumulation import sequential_fp32
from device_tests.compare import FP64_MARGIN, error_metrics, fp64_distances, tolerance_for
from models import create_model, model_entry
from models.complexity import Complexity, count_complexity


def meta_complexity(name: str, size: int = 224, **kw) -> Complexity:
    """Params and MACs of ``create_model(name, **kw)`` at ``size``, counted on the meta device."""
    with torch.device("meta"):
        return count_complexity(create_model(name, **kw), size)


def trained_like(model: nn.Module, size: int, in_chans: int = 3, seed: int = 0,
                 logit_std: float = 3.0) -> nn.Module:
    """Trained-like random weights, the same for every zoo parity sweep; returns ``model`` in eval mode.

    Random init leaves heads and residual gammas at zero (logits of 1e-8, where any two
    runtimes "agree"), so every all-zero tensor gets small random values (std 0.05).
    BatchNorm affine terms are drawn in the range trained networks show (gamma 0.5..1.5,
    beta 0.5..1.0) and its running statistics are *measured* on random inputs of
    ``size``, as training leaves them: each BN then normalises what it really sees.
    The positive betas matter: with zero-mean pre-activations a random BN-ReLU network
    is chaotic (perturbations grow layer by layer, Yang et al. 2019, "A Mean Field
    Theory of Batch Normalization"), so rounding the weights of MobileNetV2 to fp16 in
    PyTorch itself cost 27 dB of logit SNR and fp32 drifted 2e-5 from float64; with
    betas of 0.5..1.0 (most units active, as in trained networks) it is 42-46 dB and
    3-5e-6, and the sweeps test the converters, not the chaos.
    Drawing the statistics at random instead (variance 0.5..2 for activations of 1e-3)
    shrinks the input-dependent signal layer by layer until the logits of a deep BN net
    (MobileNetV2, ShuffleNetV2) no longer depend on the input (1e-7 of their spread),
    and the sweeps compared constants. The classifier (the last Linear, or the last conv
    of an all-conv head such as SqueezeNet's: ReLU and average pooling after it are
    positively homogeneous, so scaling carries) is scaled to logits whose spread *across
    inputs* has standard deviation ``logit_std``, and a Linear head is centred.
    This tests the *conversion*; how a trained model's conditioning amplifies fp32
    rounding is what ``verify``'s float64 check reports.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        norms = [m for m in model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None]
        for m in norms:
            n = m.num_features
            if m.affine:
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.5 + 0.5 * torch.rand(n, generator=gen))
            m.reset_running_stats()
            m.momentum = None           # cumulative average over the calibration batches
        if norms:
            model.train()
            for _ in range(2):
                model(torch.randn(8, in_chans, size, size, generator=gen))
            for m in norms:
                m.momentum = 0.1
                # a channel (nearly) dead on the calibration inputs measures a variance of
                # 1e-16; 1/sqrt(var + eps) then multiplies fp32 rounding by ~316, which tests
                # the model's conditioning, not its conversion: floor it as weight decay would
                m.running_var.clamp_(min=0.01 * float(m.running_var.median()) + m.eps)
        model.eval()
        heads = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if not heads:
            return model
        head = heads[-1]
        x = torch.randn(8, in_chans, size, size, generator=gen)
        out = model(x)
        # Scale by the spread *across inputs*: a logit offset shared by every input (a
        # large mean activation times the head's weights) is no signal, and scaling by the
        # plain std let it dominate, leaving input-independent logits whose top-1 any
        # rounding flips (ShuffleNetV2: margin 0.0015 between the two leading classes).
        std = float((out - out.mean(0)).std())
        if std > 0:
            head.weight.mul_(logit_std / std)
            if head.bias is not None:
                head.bias.mul_(logit_std / std)
        if isinstance(head, nn.Linear) and head.bias is not None:
            # Centre the classifier so no class wins on every input (a Linear head is
            # affine in its input, so subtracting the mean logit is exact).
            head.bias.sub_(model(x).mean(0))
    return model


def random_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms (gammas of either sign), so that
    fusing them into convolutions is really tested; returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return model


def shift_by_index(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[..., i, j] = x[..., i - dy, j - dx], zero outside: the reference shift, written
    out element by element."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[..., i, j] = x[..., i - dy, j - dx]
    return out


def check_forward(name: str, num_classes: int = 10, batch: int = 2,
                  size: int | None = None) -> None:
    """Eval forward at the registered small size, 1 and 3 input channels: shape, finite, deterministic."""
    size = size or model_entry(name).small_input_size
    for in_chans in (1, 3):
        torch.manual_seed(0)
        model = create_model(name, num_classes=num_classes, in_chans=in_chans).eval()
        x = torch.randn(batch, in_chans, size, size)
        with torch.no_grad():
            y1, y2 = model(x), model(x)
        assert y1.shape == (batch, num_classes), f"{name}: output {tuple(y1.shape)}"
        assert torch.isfinite(y1).all(), f"{name}: non-finite output"
        assert torch.equal(y1, y2), f"{name}: eval forward is not deterministic"


def train_losses(model: nn.Module, size: int, steps: int = 3, batch: int = 4,
                 lr: float = 0.05, in_chans: int = 3, seed: int = 0) -> list[float]:
    """SGD steps on one fixed random batch; returns the loss before each step and after the last.

    The last entry is measured after the final update, so ``losses[-1] < losses[0]``
    means the updates lowered the loss on that batch.
    """
    torch.manual_seed(seed)
    x = torch.randn(batch, in_chans, size, size)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses: list[float] = []
    y = None
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        if y is None:
            y = torch.arange(batch) % out.shape[1]
        loss = F.cross_entropy(out, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(F.cross_entropy(model(x), y).item())
    return losses


def _float64_forward(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return copy.deepcopy(model).double()(torch.from_numpy(x).double()).numpy()


def _fp32_reference(model: nn.Module, x: np.ndarray) -> tuple[np.ndarray, float]:
    """PyTorch's fp32 logits (as float64) and verify's fp32 bound on them."""
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy().astype(np.float64)
    tol = tolerance_for("fp32")
    return ref, tol.max_abs + tol.rtol * float(np.abs(ref).max())


def _snr(metrics: dict) -> float:
    return metrics["snr_db"] if metrics["snr_db"] is not None else float("inf")


def fp32_parity_failure(model: nn.Module, x: np.ndarray, out: np.ndarray, what: str) -> str | None:
    """None when ``out`` (a runtime's fp32 logits for ``x``) holds the fp32 tolerance against
    ``model``, else why not, judged as ``mdeploy verify`` judges it.

    The bound itself does not move: ``max_abs <= 1e-5 + 1e-5 * max|ref|``. A deep network
    with a real input-dependent signal (50+ layers, BatchNorm folded) can round further
    than that in fp32 on *either* side; then, by verify's float64 rule
    (``device_tests.compare.fp64_distances``), the runtime passes only if it is within
    ``FP64_MARGIN`` of PyTorch's own fp32 distance from a float64 forward, i.e. no worse
    than PyTorch itself, with its sums either blocked (its own kernels) or in order
    (``device_tests.accumulation``, XNNPACK's order). Both distances go in the message.
    """
    ref, bound = _fp32_reference(model, x)
    err = float(np.abs(out.astype(np.float64) - ref).max())
    if err <= bound:
        return None
    with torch.no_grad(), sequential_fp32(model):
        in_order = model(torch.from_numpy(x)).numpy()
    own, tgt, rounding = fp64_distances(ref, out, _float64_forward(model, x), in_order)
    if rounding:
        return None
    return (f"{what} fp32: max abs {err:.3g} > {bound:.3g} (logits up to {np.abs(ref).max():.3g}), and {tgt:.3g} "
            f"from float64 where PyTorch fp32 (blocked or in-order sums) is {own:.3g}: beyond fp32 rounding")


def fp16_parity_failure(model: nn.Module, x: np.ndarray, out: np.ndarray, what: str) -> str | None:
    """None when ``out`` (a runtime's fp16 logits: Core ML computes in fp16, TFLite's fp16
    file stores fp16 weights) holds verify's fp16 row against ``model`` (SNR >= 40 dB, top-1
    agreement >= 0.99), else why not.

    As for fp32, the bound does not move, and a miss is judged against PyTorch itself: a
    model whose own fp16 forward (``model.half()``) is under 40 dB cannot be held to 40 dB
    by any fp16 runtime (MobileNetV2 at these weights: 39.2 dB), so the runtime then passes
    when its error is within ``FP64_MARGIN`` of PyTorch's fp16 error (rms) and its top-1
    agreement is no lower. Both figures go in the message.
    """
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    tol = tolerance_for("fp16")
    snr = _snr(error_metrics(ref, out))
    top1 = float((out.argmax(1) == ref.argmax(1)).mean())
    if snr >= tol.min_snr_db and top1 >= tol.min_top1:
        return None
    with torch.no_grad():
        half = copy.deepcopy(model).half()(torch.from_numpy(x).half()).float().numpy()
    own_snr = _snr(error_metrics(ref, half))
    own_top1 = float((half.argmax(1) == ref.argmax(1)).mean())
    margin_db = 20 * np.log10(FP64_MARGIN)
    if snr >= own_snr - margin_db and top1 >= min(tol.min_top1, own_top1):
        return None
    return (f"{what} fp16: SNR {snr:.1f} dB, top-1 {top1:.2f} (bound {tol.min_snr_db} dB / {tol.min_top1}); "
            f"PyTorch's own fp16 forward: {own_snr:.1f} dB, top-1 {own_top1:.2f}")


def fp32_rounding_allowance(model: nn.Module, x: np.ndarray) -> float:
    """The factor by which the per-layer bound of the divergence map is scaled for a model
    that rounds beyond the fp32 bound in PyTorch itself: ``FP64_MARGIN`` x PyTorch's own
    fp32 distance from a float64 forward on the logits, over the logits bound (1.0 when
    that is within it). The float64 rule of ``fp32_parity_failure`` carried to the layers;
    a wrong padding or weight is orders of magnitude beyond it."""
    ref, bound = _fp32_reference(model, x)
    own = float(np.abs(ref - _float64_forward(model, x)).max())
    return max(1.0, FP64_MARGIN * own / bound)
