"""The architecture stages of ``mdeploy run`` (issue 8): RepVGG re-parameterization and
the sparse shift method, each trained on the bundled data and carried through deployment.

``repvgg_stage``: ``repvgg_tiny`` and its quantization-friendly variant ``qarepvgg_tiny``
(Chu et al. 2022) trained identically; each is re-parameterized (``models.reparam``) and
measured: training form (eval) against deploy form on held-out images, parameters
before and after, the exported deploy ONNX's Conv and Add counts (one Conv per block, no
Add), fp32 ONNX parity (the verify stage) and int8 post-training quantization (the
quantize stage: ONNX Runtime QDQ, generic int8 profile, calibration on training images):
held-out accuracy, drop, top-1 agreement and SNR against the float model.

``sparse_shift_stage``: ``fe_net_tiny`` trained with the L1 shift penalty (the project's
default lambda, ``quantize.shift.DEFAULT_SHIFT_L1``), its per-layer and overall fraction
of channels that do not move and the displacement histogram
(``quantize.shift.shift_statistics``), the deploy form exported (ONNX, TFLite, Core ML,
fp32), each shift layer's part of the ONNX graph read back and required to be data
movement only (``quantize.shift.check_shift_graph``), that part run in ONNX Runtime and
compared with the PyTorch layer on the same tensor (exact: a shift only moves values),
and the whole model verified on every runtime (``pipeline.stages.verify``). Optionally
lambda = 0 is trained too, for the "within 1 point of lambda = 0" comparison.

Both reuse the pipeline's own stages (train, export, verify, quantize), take a
``progress`` callback of strings and print nothing. ``out_dir`` gets one sub-folder per
trained model (its ``train/``, ``export/`` and, for RepVGG, ``int8/`` folders, each
written atomically by its stage) and ``summary.json`` (the result's ``to_dict()``).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, field_validator

from exporters.fileio import atomic_write_text, check_writable_output
from models.errors import InputError
from quantize.shift import DEFAULT_SHIFT_L1

Progress = Callable[[str], None]
SUMMARY_NAME = "summary.json"
REPARAM_TOLERANCE = 1e-5          # max |d logit|, training form (eval) vs deploy form (issue 8)


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RepVGGOptions(_Options):
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


class SparseShiftOptions(_Options):
    """What ``sparse_shift_stage`` trains and measures (defaults: README's
    ``mdeploy train fe_net_tiny --epochs 4 --shift-l1 2e-4 --freeze-shifts-after 3``)."""

    model: str = "fe_net_tiny"
    data: str = "mnist"
    epochs: int = Field(4, ge=1)
    train_samples: int | None = Field(None, ge=1, description="stratified subset; None: all")
    input_size: int | None = Field(None, gt=0, description="default: the data's own size")
    shift_l1: float = Field(DEFAULT_SHIFT_L1, ge=0)
    freeze_shifts_after: int | None = Field(3, ge=0, description="freeze after epoch N (None: never)")
    formats: list[str] = Field(default_factory=lambda: ["onnx", "tflite", "coreml"])
    eval_samples: int = Field(200, ge=1, description="held-out images for parity")
    compare_lambda0: bool = False
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    force: bool = False

    @field_validator("formats")
    @classmethod
    def _needs_onnx(cls, v: list[str]) -> list[str]:
        if "onnx" not in v:
            raise ValueError("the shift graph is read from the ONNX model: formats must include onnx")
        return v


# -- results ---------------------------------------------------------------------------------
def _finite(v: float | None, digits: int | None = None) -> float | None:
    """JSON has no inf/nan (an SNR of identical outputs is infinite): None instead."""
    if v is None or not math.isfinite(v):
        return None
    return round(float(v), digits) if digits is not None else float(v)


@dataclass
class Trained:
    """What training gave (the trainer's own held-out figure is on the whole test split)."""

    checkpoint: str
    test_acc: float
    val_acc: float
    best_epoch: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "test_acc": self.test_acc, "val_acc": self.val_acc,
                "best_epoch": self.best_epoch, "seconds": round(self.seconds, 2), "history": self.history}


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


@dataclass
class SparseShiftResult:
    model: str
    shift_l1: float
    freeze_shifts_after: int | None
    trained: Trained
    statistics: dict[str, Any]         # quantize.shift.ShiftStats.to_dict(): per layer and overall
    axis_histogram: dict[int, int]     # displacement value along either axis -> count
    graph: dict[str, Any]              # quantize.shift.ShiftGraphCheck.to_dict()
    shift_exact: dict[str, float]      # layer -> max |ONNX Runtime - PyTorch| on that layer's input
    shift_samples: int
    verify: dict[str, Any]             # passed + one row per artifact (the verify stage)
    artifacts: list[dict[str, Any]]    # what the export stage wrote
    export_dir: str
    seconds: float
    folder: str
    options: dict[str, Any]
    lambda0: dict[str, Any] | None = None

    @property
    def zero_fraction(self) -> float:
        return float(self.statistics["zero_fraction"])

    @property
    def data_movement_only(self) -> bool:
        return bool(self.graph["data_movement_only"])

    @property
    def shift_parts_exact(self) -> bool:
        return all(e == 0.0 for e in self.shift_exact.values())

    @property
    def passed(self) -> bool:
        return self.data_movement_only and self.shift_parts_exact and bool(self.verify["passed"])

    def to_dict(self) -> dict[str, Any]:
        return {"stage": "sparse_shift", "passed": self.passed, "seconds": round(self.seconds, 2),
                "folder": self.folder, "options": self.options, "model": self.model,
                "shift_l1": self.shift_l1, "freeze_shifts_after": self.freeze_shifts_after,
                "train": self.trained.to_dict(), "zero_fraction": self.zero_fraction,
                "statistics": self.statistics,
                "axis_histogram": {str(k): v for k, v in self.axis_histogram.items()},
                "graph": self.graph, "data_movement_only": self.data_movement_only,
                "shift_exact": self.shift_exact, "shift_parts_exact": self.shift_parts_exact,
                "shift_samples": self.shift_samples, "verify": self.verify,
                "artifacts": self.artifacts, "export_dir": self.export_dir, "lambda0": self.lambda0}


# -- shared steps ----------------------------------------------------------------------------
def _say(progress: Progress | None) -> Progress:
    return progress or (lambda msg: None)


def _train(cfg: Any, out: Path, say: Progress, label: str) -> Trained:
    """The train stage, its epoch ends reported as lines."""
    from pipeline.stages.train import train

    def on_progress(phase: str, step: int, total: int, info: dict[str, Any]) -> None:
        if phase == "epoch":
            say(f"{label}: epoch {step}/{total}, train loss {info['train_loss']:.3f}, "
                f"validation accuracy {100 * info['val_acc']:.1f}%")

    say(f"{label}: training {cfg.epochs} epoch(s) on {cfg.data}")
    t0 = time.perf_counter()
    res = train(cfg, out, force=True, progress=on_progress)
    history = [{"epoch": h.epoch, "train_loss": h.train_loss, "train_acc": h.train_acc, "val_loss": h.val_loss,
                "val_acc": h.val_acc, "seconds": round(h.seconds, 2), **h.extra} for h in res.history]
    return Trained(str(res.checkpoint), float(res.test_acc), float(res.best_val_acc), res.best_epoch,
                   time.perf_counter() - t0, history)


def _export(checkpoint: str, out: Path, formats: list[str], say: Progress, label: str) -> Any:
    """The export stage (deploy form, fp32) and the deployed reference it wrote."""
    from models.checkpoint import build_model
    from pipeline.stages.export import PT_NAME, ExportOptions, export_model
    exp = export_model(None, out, checkpoint=checkpoint, progress=lambda m: say(f"{label}: {m}"),
                       options=ExportOptions(formats=tuple(formats), precisions=("fp32",), force=True))
    deployed, _ = build_model(None, out / PT_NAME)
    return exp, deployed


def _onnx(exp: Any) -> Any:
    arts = [a for a in exp.manifest.find("onnx", "fp32") if not a.variant]
    if not arts:
        raise InputError(exp.folder / "manifest.json", "an fp32 ONNX artifact", "none")
    return arts[0]


def _verify(folder: Path, samples: int, seed: int, say: Progress, label: str) -> dict[str, Any]:
    from pipeline.stages.verify import VerifyOptions, verify_folder
    ver = verify_folder(folder, VerifyOptions(samples=samples, seed=seed), progress=lambda m: say(f"{label}: {m}"))
    rows = [{"target": p.target, "runner": p.target_runner, "precision": p.precision, "passed": p.passed,
             "max_abs": _finite(p.max_abs), "max_rel": _finite(p.max_rel), "cosine": _finite(p.cosine),
             "top1_agreement": _finite(p.top1_agreement), "accuracy_reference": _finite(p.accuracy_reference),
             "accuracy_target": _finite(p.accuracy_target), "failures": list(p.failures),
             "first_divergent": p.first_divergent, "diagnosis": p.diagnosis}
            for p in ver.report.pairs]
    return {"passed": ver.passed, "samples": int(ver.report.inputs.get("samples", 0)),
            "source": ver.report.inputs.get("source"), "pairs": rows, "notes": list(ver.notes)}


@torch.no_grad()
def _max_abs_difference(a: nn.Module, b: nn.Module, x: np.ndarray, batch: int = 256) -> float:
    worst = 0.0
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i:i + batch])
        worst = max(worst, (a(xb) - b(xb)).abs().max().item())
    return worst


def _write_summary(out: Path, result: Any) -> None:
    atomic_write_text(out / SUMMARY_NAME, json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")


# -- RepVGG / QARepVGG ---------------------------------------------------------------------------
def _check_repvgg_models(names: list[str]) -> None:
    from models import create_model
    from models.repvgg import RepVGGBlock
    if not names:
        raise InputError("repvgg models", "at least one RepVGG model", "none")
    for name in names:
        with torch.device("meta"):
            model = create_model(name, num_classes=10)
        if not any(isinstance(m, RepVGGBlock) for m in model.modules()):
            raise InputError("repvgg models", "RepVGG models (e.g. repvgg_tiny, qarepvgg_tiny)", name)


def _repvgg_variant(name: str, opts: RepVGGOptions, out: Path, say: Progress) -> RepVGGVariant:
    from exporters.onnx import op_counts
    from models.checkpoint import build_model
    from models.complexity import count_params
    from models.repvgg import RepVGGBlock
    from pipeline.stages.quantize import QuantizeOptions, quantize_folder
    from pipeline.stages.train import TrainConfig
    from pipeline.stages.verify import load_inputs
    from quantize.report import worst_snr

    cfg = TrainConfig(model=name, data=opts.data, epochs=opts.epochs, train_samples=opts.train_samples,
                      input_size=opts.input_size, seed=opts.seed, threads=opts.threads)
    trained = _train(cfg, out / "train", say, name)
    train_form, _ = build_model(None, trained.checkpoint)
    blocks = [m for m in train_form.modules() if isinstance(m, RepVGGBlock)]

    exp, deployed = _export(trained.checkpoint, out / "export", ["onnx"], say, name)
    inputs = load_inputs(None, exp.manifest, opts.eval_samples, opts.seed)     # held-out split
    err = _max_abs_difference(train_form, deployed, inputs.x)
    say(f"{name}: {len(blocks)} blocks re-parameterized, max |d logit| {err:.2g} on {len(inputs.x)} held-out images")
    ops = op_counts(_onnx(exp).resolve(exp.folder))

    parity = _verify(exp.folder, opts.eval_samples, opts.seed, say, name)
    pair = parity["pairs"][0]
    say(f"{name}: int8 post-training quantization (ONNX Runtime QDQ, generic int8)")
    quant = quantize_folder(exp.folder, out / "int8", QuantizeOptions(
        target="generic", tflite=False, sensitivity=False, samples=opts.calibration_samples,
        eval_samples=opts.eval_samples, seed=opts.seed, force=True), progress=lambda m: say(f"{name}: {m}"))
    q = quant.report.variants[0]
    int8 = {"profile": "int8", "path": str(quant.folder / q.path), "samples": q.samples,
            "calibration_samples": int(quant.report.calibration.get("samples", 0)),
            "float_accuracy": _finite(q.float_accuracy), "accuracy": _finite(q.accuracy),
            "drop_points": _finite(q.drop_points), "top1_agreement": _finite(q.top1_agreement),
            "snr_db": _finite(worst_snr(list(q.snr_db.values())), 3), "size_bytes": q.size_bytes,
            "size_ratio": _finite(q.size_ratio, 3)}
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
    say = _say(progress)
    out = Path(out_dir)
    check_writable_output(out, opts.force)
    _check_repvgg_models(opts.models)
    t0 = time.perf_counter()
    variants = [_repvgg_variant(name, opts, out / name, say) for name in opts.models]
    result = RepVGGResult(variants, opts.model_dump(), time.perf_counter() - t0, str(out))
    _write_summary(out, result)
    return result


# -- sparse shift ------------------------------------------------------------------------------
def _shift_parts_exact(art: Any, root: Path, deployed: nn.Module, graph: Any, x: np.ndarray
                       ) -> dict[str, float]:
    """Run ONNX Runtime on ``x``, read each shift layer's input and output tensors, and
    compare its output with the PyTorch layer applied to the same input: 0.0 when the
    exported part moves values exactly as the layer does."""
    from device_tests.compare import run_batched
    from device_tests.runners.base import runner_for
    from quantize.shift import shift_layers
    layers = dict(shift_layers(deployed))
    parts = [(s.name, s.inputs[0], s.output) for s in graph.layers if s.output and len(s.inputs) == 1]
    if not parts:
        return {}
    names = [t for _, i, o in parts for t in (i, o)]
    with runner_for(art)() as runner:
        runner.load(art, root)
        values = run_batched(runner, {art.inputs[0].name: x},
                             lambda feed: runner.infer_intermediates(feed, names))
    errors = {}
    with torch.no_grad():
        for name, i, o in parts:
            moved = layers[name](torch.from_numpy(values[i])).numpy()
            errors[name] = float(np.abs(moved - values[o]).max())
    return errors


def sparse_shift_stage(opts: SparseShiftOptions | None, out_dir: str | Path,
                       progress: Progress | None = None) -> SparseShiftResult:
    """Train with the L1 shift penalty, report the sparsity, export the deploy form and
    check that every shift became data movement that reproduces the layer exactly."""
    from models.checkpoint import build_model
    from pipeline.stages.train import TrainConfig
    from pipeline.stages.verify import load_inputs
    from quantize.shift import check_shift_graph, shift_statistics

    opts = opts or SparseShiftOptions()
    say = _say(progress)
    out = Path(out_dir)
    check_writable_output(out, opts.force)
    t0 = time.perf_counter()
    freeze = opts.freeze_shifts_after if opts.freeze_shifts_after is not None and \
        opts.freeze_shifts_after < opts.epochs else None
    cfg = TrainConfig(model=opts.model, data=opts.data, epochs=opts.epochs, train_samples=opts.train_samples,
                      input_size=opts.input_size, shift_l1=opts.shift_l1, freeze_shifts_after=freeze,
                      seed=opts.seed, threads=opts.threads)
    label = f"{opts.model} (lambda {opts.shift_l1:g})"
    trained = _train(cfg, out / "train", say, label)
    model, _ = build_model(None, trained.checkpoint)
    stats = shift_statistics(model)
    say(f"{label}: {100 * stats.zero_fraction:.1f}% of {stats.channels} shift channels do not move")

    exp, deployed = _export(trained.checkpoint, out / "export", opts.formats, say, opts.model)
    art = _onnx(exp)
    graph = check_shift_graph(art.resolve(exp.folder), art.extra.get("layer_map", {}), deployed)
    inputs = load_inputs(None, exp.manifest, opts.eval_samples, opts.seed)
    say(f"{opts.model}: running each shift layer's ONNX part on {len(inputs.x)} held-out images")
    exact = _shift_parts_exact(art, exp.folder, deployed, graph, inputs.x)
    verify = _verify(exp.folder, opts.eval_samples, opts.seed, say, opts.model)

    lambda0 = None
    if opts.compare_lambda0:
        base = _train(cfg.model_copy(update={"shift_l1": 0.0}), out / "train_lambda0", say,
                      f"{opts.model} (lambda 0)")
        base_model, _ = build_model(None, base.checkpoint)
        delta = 100 * (trained.test_acc - base.test_acc)
        lambda0 = {"train": base.to_dict(), "test_acc": base.test_acc,
                   "zero_fraction": round(shift_statistics(base_model).zero_fraction, 6),
                   "accuracy_delta_points": round(delta, 3), "within_1_point": delta >= -1.0}
    result = SparseShiftResult(
        model=opts.model, shift_l1=opts.shift_l1, freeze_shifts_after=freeze, trained=trained,
        statistics=stats.to_dict(), axis_histogram=stats.axis_histogram(), graph=graph.to_dict(),
        shift_exact=exact, shift_samples=int(len(inputs.x)), verify=verify,
        artifacts=[{"key": a.key, "path": a.path, "format": a.format, "precision": a.precision,
                    "size_bytes": a.size_bytes} for a in exp.manifest.artifacts], export_dir=str(exp.folder),
        seconds=time.perf_counter() - t0, folder=str(out), options=opts.model_dump(), lambda0=lambda0)
    _write_summary(out, result)
    return result


__all__ = ["RepVGGOptions", "RepVGGResult", "RepVGGVariant", "SparseShiftOptions", "SparseShiftResult",
           "repvgg_stage", "sparse_shift_stage"]
