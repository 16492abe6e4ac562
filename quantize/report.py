"""The quantization report as data: what quantizing cost, next to published reference points.

Built from arrays (float outputs, each variant's outputs, labels), so it knows nothing of
runtimes: the pipeline runs the artifacts and hands the outputs over. The metrics are
defined as in ``device_tests/compare.py`` (the verify stage's), restated here in NumPy
because ``quantize/`` sits below ``device_tests/``:

* ``snr_db = 10 log10(sum ref^2 / sum (out - ref)^2)`` per output, over all samples;
* ``top1_agreement``: fraction of samples whose arg-max class is the float model's;
* ``accuracy``: fraction of samples whose arg-max class is the label.

The references are Qualcomm's own published figures for MobileNetV2 on ImageNet (top-1),
as the project's issue 7 quotes them:

* AIMET data-free quantization (Nagel et al. 2019: CLE + bias correction, W8A8):
  71.72% float -> 71.08% int8, a drop of 0.64 points;
* Qualcomm AI Hub's MobileNet-v2-Quantized as a w8a8 TFLite model: about 1.8 points
  below float. Only that drop is quoted; no float or quantized accuracy is, so none is
  shown (no number derived from another source is presented as published) and its
  relative drop is unknown.

They were measured on MobileNetV2, so ``references_for`` gives them for that
architecture only (any other model gets none: a drop on another network says nothing
about this one). On another data set than ImageNet, the comparison that holds best is
the drop *relative to float accuracy* (``drop / float_accuracy``) where it is known.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Sequence

import numpy as np

from models.util import snr_db  # noqa: F401  (part of this module's metrics)


# ---------------------------------------------------------------- metrics


def top1_agreement(ref: np.ndarray, out: np.ndarray) -> float:
    return float((np.asarray(ref).argmax(-1) == np.asarray(out).argmax(-1)).mean())


def top5_agreement(ref: np.ndarray, out: np.ndarray) -> float | None:
    """Fraction of samples whose float top-1 class is among the quantized top-5 (None with
    fewer than 6 classes, where it says nothing)."""
    ref, out = np.asarray(ref), np.asarray(out)
    if ref.ndim != 2 or ref.shape[-1] < 6:
        return None
    top5 = np.argpartition(-out, 5, axis=-1)[:, :5]
    return float((top5 == ref.argmax(-1)[:, None]).any(-1).mean())


def accuracy(out: np.ndarray, labels: np.ndarray | None) -> float | None:
    if labels is None:
        return None
    return float((np.asarray(out).argmax(-1) == np.asarray(labels)).mean())


# ---------------------------------------------------------------- references


@dataclass(frozen=True)
class ReferencePoint:
    """A published float -> quantized accuracy pair (top-1, percent), or only the published
    drop (``published_drop``) when that is all the source gives."""

    name: str
    short: str
    model: str
    dataset: str
    float_accuracy: float | None
    quantized_accuracy: float | None
    source: str
    published_drop: float | None = None

    @property
    def drop(self) -> float:
        if self.published_drop is not None:
            return self.published_drop
        return round(self.float_accuracy - self.quantized_accuracy, 4)

    @property
    def relative_drop(self) -> float | None:
        """Drop / float accuracy, only when both are published."""
        if self.float_accuracy is None or self.quantized_accuracy is None:
            return None
        return self.drop / self.float_accuracy

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drop": self.drop, "relative_drop": self.relative_drop}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ReferencePoint":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


REFERENCE_ARCHITECTURE = "mobilenet_v2"       # the registry name of the model the references measured
REFERENCES: tuple[ReferencePoint, ...] = (
    ReferencePoint("AIMET data-free (CLE + bias correction), W8A8", "AIMET data-free W8A8", "MobileNetV2", "ImageNet",
                   71.72, 71.08, "Nagel et al. 2019, Data-Free Quantization (arXiv:1906.04721), Qualcomm AIMET; "
                   "as quoted in issue 7"),
    ReferencePoint("Qualcomm AI Hub, w8a8 TFLite", "AI Hub w8a8 TFLite", "MobileNetV2", "ImageNet",
                   None, None, "Qualcomm AI Hub MobileNet-v2-Quantized model card: about 1.8 points below float "
                   "(as quoted in issue 7; only the drop is quoted)", published_drop=1.8),
)


def references_for(model_spec: str | None) -> tuple[ReferencePoint, ...]:
    """The published reference points measured on this architecture (a registry name);
    none for any other model, whose drop they would not describe."""
    return REFERENCES if model_spec == REFERENCE_ARCHITECTURE else ()


# ---------------------------------------------------------------- the report


@dataclass
class VariantResult:
    """One quantized artifact measured against the float model."""

    key: str
    path: str
    precision: str
    size_bytes: int
    samples: int
    accuracy: float | None
    float_accuracy: float | None
    top1_agreement: float
    snr_db: dict[str, float | None]
    size_ratio: float | None = None       # float size / this size
    top5_agreement: float | None = None

    @property
    def drop_points(self) -> float | None:
        if self.accuracy is None or self.float_accuracy is None:
            return None
        return round(100.0 * (self.float_accuracy - self.accuracy), 4)

    @property
    def relative_drop(self) -> float | None:
        if self.accuracy is None or not self.float_accuracy:
            return None
        return (self.float_accuracy - self.accuracy) / self.float_accuracy

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drop_points": self.drop_points, "relative_drop": self.relative_drop}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VariantResult":
        """``to_dict``'s inverse (its derived figures are recomputed, not read)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def measure_variant(key: str, path: str, precision: str, size_bytes: int, ref: Mapping[str, np.ndarray],
                    out: Mapping[str, np.ndarray], labels: np.ndarray | None,
                    float_size: int | None = None) -> VariantResult:
    """Metrics of one variant's outputs (name -> array, in the float model's output order)."""
    names = list(ref)
    outs = list(out.values())
    if len(outs) != len(names):
        raise ValueError(f"{key}: {len(outs)} outputs, the float model has {len(names)}")
    first_ref, first_out = ref[names[0]], outs[0]
    return VariantResult(
        key=key, path=path, precision=precision, size_bytes=int(size_bytes), samples=int(len(first_ref)),
        accuracy=accuracy(first_out, labels), float_accuracy=accuracy(first_ref, labels),
        top1_agreement=top1_agreement(first_ref, first_out), top5_agreement=top5_agreement(first_ref, first_out),
        snr_db={n: snr_db(ref[n], o) for n, o in zip(names, outs)},
        size_ratio=(float_size / size_bytes) if float_size and size_bytes else None)


@dataclass
class QuantReport:
    model: str
    target: str
    float_accuracy: float | None
    float_size_bytes: int | None
    eval_source: str
    eval_samples: int
    calibration: dict[str, Any]
    variants: list[VariantResult] = field(default_factory=list)
    float_fixes: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: dict[str, Any] | None = None
    weight_rounding: dict[str, Any] | None = None
    mixed_precision: dict[str, Any] | None = None      # quantize.mixed_precision: split probes, --target-sqnr search
    mixed_precision_others: list[dict[str, Any]] = field(default_factory=list)  # other profiles' default searches
    plain_route: VariantResult | None = None           # the first profile with round-to-nearest weights (not written)
    notes: list[str] = field(default_factory=list)
    references: tuple[ReferencePoint, ...] = REFERENCES

    def comparison(self) -> list[dict[str, Any]]:
        """Each variant's drop next to each reference's, absolute and relative to float."""
        rows = []
        for v in self.variants:
            if v.drop_points is None:
                continue
            for ref in self.references:
                rel = v.relative_drop
                rows.append({"variant": v.key, "drop_points": v.drop_points, "relative_drop": rel,
                             "reference": ref.name, "reference_drop_points": ref.drop,
                             "reference_relative_drop": ref.relative_drop,
                             "at_least_as_good": (rel <= ref.relative_drop if rel is not None
                                                  and ref.relative_drop is not None
                                                  else v.drop_points <= ref.drop)})
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "target": self.target, "float_accuracy": self.float_accuracy,
            "float_size_bytes": self.float_size_bytes, "eval_source": self.eval_source,
            "eval_samples": self.eval_samples, "calibration": self.calibration,
            "variants": [v.to_dict() for v in self.variants], "float_fixes": self.float_fixes,
            "sensitivity": self.sensitivity, "weight_rounding": self.weight_rounding,
            "mixed_precision": self.mixed_precision, "mixed_precision_others": self.mixed_precision_others,
            "plain_route": self.plain_route.to_dict() if self.plain_route is not None else None, "notes": self.notes,
            "references": [r.to_dict() for r in self.references], "comparison": self.comparison(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantReport":
        """``to_dict``'s inverse: a finished quantize stage's ``quantization_report.json``
        read back (``mdeploy run --resume``); ``comparison`` is recomputed."""
        plain = d.get("plain_route")
        return cls(model=d["model"], target=d["target"], float_accuracy=d.get("float_accuracy"),
                   float_size_bytes=d.get("float_size_bytes"), eval_source=d["eval_source"],
                   eval_samples=d["eval_samples"], calibration=dict(d.get("calibration") or {}),
                   variants=[VariantResult.from_dict(v) for v in d.get("variants") or []],
                   float_fixes=list(d.get("float_fixes") or []), sensitivity=d.get("sensitivity"),
                   weight_rounding=d.get("weight_rounding"), mixed_precision=d.get("mixed_precision"),
                   mixed_precision_others=list(d.get("mixed_precision_others") or []),
                   plain_route=VariantResult.from_dict(plain) if plain else None, notes=list(d.get("notes") or []),
                   references=tuple(ReferencePoint.from_dict(r) for r in d.get("references") or []))


def worst_snr(snrs: Sequence[float | None]) -> float | None:
    vals = [s for s in snrs if s is not None]
    return min(vals) if vals else None
