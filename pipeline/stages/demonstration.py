"""What the two architecture demonstrations of ``mdeploy run`` (``repvgg``, ``sparse_shift``)
share: they train their own small networks and carry them through the pipeline's own
train, export and verify stages, so a demonstration proves the same code users run rather
than a copy of it. Each writes ``summary.json`` (its result's ``to_dict()``) beside the
sub-folders those stages wrote atomically, and prints nothing (``progress`` gets strings).
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
from pydantic import BaseModel, ConfigDict

from exporters.fileio import atomic_write_text
from models.errors import InputError

Progress = Callable[[str], None]
SUMMARY_NAME = "summary.json"


class StageOptions(BaseModel):
    """Options of a demonstration: a ``[repvgg]`` / ``[sparse_shift]`` config section, where
    a typo must be an error rather than a silently ignored key."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def finite(v: float | None, digits: int | None = None) -> float | None:
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Trained":
        """The inverse of ``to_dict``: a resumed run rebuilds a reused stage's result from its
        ``summary.json``."""
        return cls(str(d["checkpoint"]), float(d["test_acc"]), float(d["val_acc"]), int(d["best_epoch"]),
                   float(d["seconds"]), [dict(h) for h in d["history"]])


def quiet(progress: Progress | None) -> Progress:
    return progress or (lambda msg: None)


def train_model(cfg: Any, out: Path, say: Progress, label: str) -> Trained:
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


def export_deploy_form(checkpoint: str, out: Path, formats: list[str], say: Progress, label: str
                       ) -> tuple[Any, nn.Module]:
    """The export stage (deploy form, fp32) and the deployed reference it wrote."""
    from models.checkpoint import build_model
    from pipeline.stages.export import PT_NAME, ExportOptions, export_model
    exp = export_model(None, out, checkpoint=checkpoint, progress=lambda m: say(f"{label}: {m}"),
                       options=ExportOptions(formats=tuple(formats), precisions=("fp32",), force=True))
    deployed, _ = build_model(None, out / PT_NAME)
    return exp, deployed


def fp32_onnx(exp: Any) -> Any:
    arts = [a for a in exp.manifest.find("onnx", "fp32") if not a.variant]
    if not arts:
        raise InputError(exp.folder / "manifest.json", "an fp32 ONNX artifact", "none")
    return arts[0]


def verify_export(folder: Path, samples: int, seed: int, say: Progress, label: str) -> dict[str, Any]:
    from pipeline.stages.verify import VerifyOptions, verify_folder
    ver = verify_folder(folder, VerifyOptions(samples=samples, seed=seed), progress=lambda m: say(f"{label}: {m}"))
    rows = [{"target": p.target, "runner": p.target_runner, "precision": p.precision, "passed": p.passed,
             "max_abs": finite(p.max_abs), "max_rel": finite(p.max_rel), "cosine": finite(p.cosine),
             "top1_agreement": finite(p.top1_agreement), "accuracy_reference": finite(p.accuracy_reference),
             "accuracy_target": finite(p.accuracy_target), "failures": list(p.failures),
             "first_divergent": p.first_divergent, "diagnosis": p.diagnosis}
            for p in ver.report.pairs]
    return {"passed": ver.passed, "samples": int(ver.report.inputs.get("samples", 0)),
            "source": ver.report.inputs.get("source"), "pairs": rows, "notes": list(ver.notes)}


@torch.no_grad()
def max_abs_difference(a: nn.Module, b: nn.Module, x: np.ndarray, batch: int = 256) -> float:
    worst = 0.0
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i:i + batch])
        worst = max(worst, (a(xb) - b(xb)).abs().max().item())
    return worst


def write_summary(out: Path, result: Any) -> None:
    atomic_write_text(out / SUMMARY_NAME, json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
