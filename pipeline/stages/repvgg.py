"""The ``repvgg`` stage of ``mdeploy run`` (issue 8): structural re-parameterization shown
end to end, and whether the quantization-friendly variant earns its name.

``repvgg_tiny`` and ``qarepvgg_tiny`` (Chu et al. 2022) are trained identically, so any
difference under int8 comes from the block design, not the training. Each is
re-parameterized (``models.reparam``) and held to what the deploy form promises: the same
logits as the training form (eval), fewer parameters, and an exported ONNX with exactly one
Conv per fusable block and no Add left (the branches are really gone, not hidden). Then the
deploy form goes through the pipeline's own verify (fp32 ONNX parity) and quantize (ONNX
Runtime QDQ, generic int8, calibrated on training images) stages, so the int8 figures are
the ones users would get.

Fusable blocks are found through the re-parameterize protocol (a module with
``reparameterize()``), never by class, so a new re-parameterizable block needs no change
here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from pydantic import Field

from exporters.fileio import check_writable_output
from models.errors import InputError
from pipeline.stages.demonstration import (Progress, StageOptions, Trained, export_deploy_form, finite, fp32_onnx,
                                           max_abs_difference, quiet, train_model, verify_export, write_summary)

REPARAM_TOLERANCE = 1e-5          # max |d logit|, training form (eval) vs deploy form (issue 8)


class RepVGGOptions(StageOptions):
    """What ``repvgg_stage`` trains and measures (defaults: well under a minute for both)."""

    models: list[str] = Field(default_factory=lambda: ["repvgg_tiny", "qarepvgg_tiny"])
    data: str = "mnist"
    epochs: int = Field(3, ge=1)
    train_samples: int | None = Field(None, ge=1, description="stratified subset; None: all")
    input_size: int = Field(32, gt=0, description="the tiny RepVGGs' own size (MNIST resized)")
    eval_samples: int = Field(1000, ge=1, description="held-out images for every comparison")
    calibration_samples: int = Field(200, ge=1, description="training images for int8 PTQ")
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    force: bool = False


@dataclass
class RepVGGVariant:
    model: str
    quant_friendly: bool
    trained: Trained
    blocks: int                        # re-parameterizable blocks (each should become one conv)
    params_train: int
    params_deploy: int
    reparam_max_abs: float             # max |d logit| training form (eval) vs deploy form
    reparam_samples: int
    onnx_ops: dict[str, int]           # op counts of the exported deploy ONNX
    fp32_parity: dict[str, Any]        # PyTorch deploy form vs ONNX Runtime (the verify stage)
    int8: dict[str, Any]               # generic int8 QDQ vs the float model (the quantize stage)
    export_dir: str
    int8_dir: str

    @property
    def convs(self) -> int:
        return self.onnx_ops.get("Conv", 0)

    @property
    def adds(self) -> int:
        return self.onnx_ops.get("Add", 0)

    @property
    def one_conv_per_block(self) -> bool:
        return self.convs == self.blocks and self.adds == 0

    @property
    def reparam_ok(self) -> bool:
        return self.reparam_max_abs <= REPARAM_TOLERANCE

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "quant_friendly": self.quant_friendly, "train": self.trained.to_dict(),
                "blocks": self.blocks, "params_train": self.params_train, "params_deploy": self.params_deploy,
                "params_removed": self.params_train - self.params_deploy,
                "reparam_max_abs": self.reparam_max_abs, "reparam_tolerance": REPARAM_TOLERANCE,
                "reparam_samples": self.reparam_samples, "reparam_ok": self.reparam_ok,
                "onnx_ops": self.onnx_ops, "convs": self.convs, "adds": self.adds,
                "one_conv_per_block": self.one_conv_per_block, "fp32_parity": self.fp32_parity,
                "int8": self.int8, "export_dir": self.export_dir, "int8_dir": self.int8_dir}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RepVGGVariant":
        """The inverse of ``to_dict`` (what it derives is derived again, not read)."""
        return cls(model=str(d["model"]), quant_friendly=bool(d["quant_friendly"]),
                   trained=Trained.from_dict(d["train"]), blocks=int(d["blocks"]),
                   params_train=int(d["params_train"]), params_deploy=int(d["params_deploy"]),
                   reparam_max_abs=float(d["reparam_max_abs"]), reparam_samples=int(d["reparam_samples"]),
                   onnx_ops={str(k): int(v) for k, v in d["onnx_ops"].items()},
                   fp32_parity=dict(d["fp32_parity"]), int8=dict(d["int8"]),
                   export_dir=str(d["export_dir"]), int8_dir=str(d["int8_dir"]))


@dataclass
class RepVGGResult:
    variants: list[RepVGGVariant]
    options: dict[str, Any]
    seconds: float
    folder: str

    @property
    def passed(self) -> bool:
        """Every invariant the deploy form promises (accuracy figures are reported, not judged)."""
        return all(v.reparam_ok and v.one_conv_per_block and v.fp32_parity["passed"] for v in self.variants)

    def variant(self, model: str) -> RepVGGVariant:
        return next(v for v in self.variants if v.model == model)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": "repvgg", "passed": self.passed, "seconds": round(self.seconds, 2),
                "folder": self.folder, "options": self.options,
                "variants": [v.to_dict() for v in self.variants]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RepVGGResult":
        """The inverse of ``to_dict``: ``mdeploy run --resume`` rebuilds a reused stage's result
        from its ``summary.json``."""
        return cls([RepVGGVariant.from_dict(v) for v in d["variants"]], dict(d["options"]), float(d["seconds"]),
                   str(d["folder"]))


def fusable_blocks(model: nn.Module) -> list[str]:
    """The outermost modules ``reparameterize_model`` would fuse: a block whose
    ``reparameterize()`` also rewrites fusable children counts once, as the one conv it
    becomes."""
    from models.reparam import reparameterizable_modules
    names = reparameterizable_modules(model)

    def inside(name: str, parent: str) -> bool:
        return name != parent and (parent == "" or name.startswith(f"{parent}."))
    return [n for n in names if not any(inside(n, p) for p in names)]


def _check_models(names: list[str]) -> None:
    from models import create_model
    if not names:
        raise InputError("repvgg models", "at least one RepVGG model", "none")
    for name in names:
        with torch.device("meta"):
            model = create_model(name, num_classes=10)
        if not fusable_blocks(model):
            raise InputError("repvgg models", "models with re-parameterizable blocks (e.g. repvgg_tiny, "
                             "qarepvgg_tiny)", name)


def _variant(name: str, opts: RepVGGOptions, out: Path, say: Progress) -> RepVGGVariant:
    from exporters.onnx import op_counts
    from models.checkpoint import build_model
    from models.complexity import count_params
    from pipeline.stages.quantize import QuantizeOptions, quantize_folder
    from pipeline.stages.train import TrainConfig
    from pipeline.stages.verify import load_inputs
    from quantize.report import worst_snr

    cfg = TrainConfig(model=name, data=opts.data, epochs=opts.epochs, train_samples=opts.train_samples,
                      input_size=opts.input_size, seed=opts.seed, threads=opts.threads)
    trained = train_model(cfg, out / "train", say, name)
    train_form, _ = build_model(None, trained.checkpoint)
    blocks = fusable_blocks(train_form)

    exp, deployed = export_deploy_form(trained.checkpoint, out / "export", ["onnx"], say, name)
    inputs = load_inputs(None, exp.manifest, opts.eval_samples, opts.seed)     # held-out split
    err = max_abs_difference(train_form, deployed, inputs.x)
    say(f"{name}: {len(blocks)} blocks re-parameterized, max |d logit| {err:.2g} on {len(inputs.x)} held-out images")
    ops = op_counts(fp32_onnx(exp).resolve(exp.folder))

    parity = verify_export(exp.folder, opts.eval_samples, opts.seed, say, name)
    pair = parity["pairs"][0]
    say(f"{name}: int8 post-training quantization (ONNX Runtime QDQ, generic int8)")
    quant = quantize_folder(exp.folder, out / "int8", QuantizeOptions(
        target="generic", tflite=False, sensitivity=False, samples=opts.calibration_samples,
        weight_rounding=("rtn",),   # the architecture is under test, not the rounding: plain PTQ
        eval_samples=opts.eval_samples, seed=opts.seed, force=True), progress=lambda m: say(f"{name}: {m}"))
    q = quant.report.variants[0]
    int8 = {"profile": "int8", "path": str(quant.folder / q.path), "samples": q.samples,
            "calibration_samples": int(quant.report.calibration.get("samples", 0)),
            "float_accuracy": finite(q.float_accuracy), "accuracy": finite(q.accuracy),
            "drop_points": finite(q.drop_points), "top1_agreement": finite(q.top1_agreement),
            "snr_db": finite(worst_snr(list(q.snr_db.values())), 3), "size_bytes": q.size_bytes,
            "size_ratio": finite(q.size_ratio, 3)}
    say(f"{name}: int8 accuracy {100 * (q.accuracy or 0):.2f}% (float {100 * (q.float_accuracy or 0):.2f}%), "
        f"agreement {100 * q.top1_agreement:.1f}%, SNR {int8['snr_db']} dB")
    return RepVGGVariant(
        model=name, quant_friendly=bool(getattr(train_form, "quant_friendly", False)), trained=trained,
        blocks=len(blocks), params_train=count_params(train_form), params_deploy=count_params(deployed),
        reparam_max_abs=err, reparam_samples=int(len(inputs.x)), onnx_ops=ops,
        fp32_parity={"passed": pair["passed"], "max_abs": pair["max_abs"], "top1_agreement": pair["top1_agreement"],
                     "samples": parity["samples"], "runner": pair["runner"], "failures": pair["failures"]},
        int8=int8, export_dir=str(exp.folder), int8_dir=str(quant.folder))


def repvgg_stage(opts: RepVGGOptions | None, out_dir: str | Path,
                 progress: Progress | None = None) -> RepVGGResult:
    """Train, re-parameterize, export, verify and int8-quantize each of ``opts.models``."""
    opts = opts or RepVGGOptions()
    say = quiet(progress)
    out = Path(out_dir)
    check_writable_output(out, opts.force)
    _check_models(opts.models)
    t0 = time.perf_counter()
    variants = [_variant(name, opts, out / name, say) for name in opts.models]
    result = RepVGGResult(variants, opts.model_dump(), time.perf_counter() - t0, str(out))
    write_summary(out, result)
    return result


__all__ = ["REPARAM_TOLERANCE", "RepVGGOptions", "RepVGGResult", "RepVGGVariant", "fusable_blocks", "repvgg_stage"]
