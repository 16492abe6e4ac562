"""The ``sparse_shift`` stage of ``mdeploy run`` (issue 8): the sparse shift method (Chen et
al. 2019) from training to a deployed graph that moves data and computes nothing.

``fe_net_tiny`` is trained with the L1 shift penalty (the project's default lambda,
``quantize.shift.DEFAULT_SHIFT_L1``). What the method claims is checked rather than
assumed: how many channels stopped moving (per layer, overall, and the displacement
histogram, ``quantize.shift.shift_statistics``); that each shift layer's part of the
exported ONNX graph is data movement only (``quantize.shift.check_shift_graph``); that this
part, run in ONNX Runtime, reproduces the PyTorch layer exactly on the same tensor (a shift
only moves values, so anything but 0 is a bug); and that the whole deploy form verifies on
every runtime (``pipeline.stages.verify``). Optionally lambda = 0 is trained too, for the
"within 1 point of lambda = 0" comparison.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from pydantic import Field, field_validator

from exporters.fileio import check_writable_output
from pipeline.stages.demonstration import (Progress, StageOptions, Trained, export_deploy_form, fp32_onnx, quiet,
                                           train_model, verify_export, write_summary)
from quantize.shift import DEFAULT_SHIFT_L1


class SparseShiftOptions(StageOptions):
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SparseShiftResult":
        """The inverse of ``to_dict`` (JSON made the histogram's keys strings; they are
        displacements): ``mdeploy run --resume`` rebuilds a reused stage's result from its
        ``summary.json``."""
        freeze = d["freeze_shifts_after"]
        return cls(model=str(d["model"]), shift_l1=float(d["shift_l1"]),
                   freeze_shifts_after=None if freeze is None else int(freeze), trained=Trained.from_dict(d["train"]),
                   statistics=dict(d["statistics"]), axis_histogram={int(k): int(v) for k, v in
                                                                      d["axis_histogram"].items()},
                   graph=dict(d["graph"]), shift_exact={str(k): float(v) for k, v in d["shift_exact"].items()},
                   shift_samples=int(d["shift_samples"]), verify=dict(d["verify"]),
                   artifacts=[dict(a) for a in d["artifacts"]], export_dir=str(d["export_dir"]),
                   seconds=float(d["seconds"]), folder=str(d["folder"]), options=dict(d["options"]),
                   lambda0=None if d["lambda0"] is None else dict(d["lambda0"]))


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
    say = quiet(progress)
    out = Path(out_dir)
    check_writable_output(out, opts.force)
    t0 = time.perf_counter()
    freeze = opts.freeze_shifts_after if opts.freeze_shifts_after is not None and \
        opts.freeze_shifts_after < opts.epochs else None
    cfg = TrainConfig(model=opts.model, data=opts.data, epochs=opts.epochs, train_samples=opts.train_samples,
                      input_size=opts.input_size, shift_l1=opts.shift_l1, freeze_shifts_after=freeze,
                      seed=opts.seed, threads=opts.threads)
    label = f"{opts.model} (lambda {opts.shift_l1:g})"
    trained = train_model(cfg, out / "train", say, label)
    model, _ = build_model(None, trained.checkpoint)
    stats = shift_statistics(model)
    say(f"{label}: {100 * stats.zero_fraction:.1f}% of {stats.channels} shift channels do not move")

    exp, deployed = export_deploy_form(trained.checkpoint, out / "export", opts.formats, say, opts.model)
    art = fp32_onnx(exp)
    graph = check_shift_graph(art.resolve(exp.folder), art.extra.get("layer_map", {}), deployed)
    inputs = load_inputs(None, exp.manifest, opts.eval_samples, opts.seed)
    say(f"{opts.model}: running each shift layer's ONNX part on {len(inputs.x)} held-out images")
    exact = _shift_parts_exact(art, exp.folder, deployed, graph, inputs.x)
    verify = verify_export(exp.folder, opts.eval_samples, opts.seed, say, opts.model)

    lambda0 = None
    if opts.compare_lambda0:
        base = train_model(cfg.model_copy(update={"shift_l1": 0.0}), out / "train_lambda0", say,
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
    write_summary(out, result)
    return result


__all__ = ["SparseShiftOptions", "SparseShiftResult", "sparse_shift_stage"]
