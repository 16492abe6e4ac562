"""One report section per stage of ``mdeploy run``: each result type keeps together its JSON
(``to_dict()``, the ``--json`` contract), its plots and its Markdown, so a stage's report
changes in one place. They hold the stages' own result objects and read nothing back from
disk; ``from_result`` builds each from what its stage function returned.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pipeline.report import plots as draw
from pipeline.report.markdown import num, pct, table
from pipeline.report.record import QUANTIZED, Figure, RunRecord

if TYPE_CHECKING:
    from device_tests.compare import ParityReport
    from device_tests.profile import Profile
    from exporters.artifact import Artifact
    from pipeline.stages.profile import ProfileResult, Skipped
    from pipeline.stages.repvgg import RepVGGResult
    from pipeline.stages.sparse_shift import SparseShiftResult
    from pipeline.stages.train import TrainResult


@dataclass
class TrainRecord:
    key: ClassVar[str] = "train"
    model: str
    data: str
    checkpoint: str
    best_epoch: int
    val_acc: float
    test_acc: float
    history: list[dict[str, Any]] = field(default_factory=list)     # one per epoch (EpochLog fields)

    @classmethod
    def from_result(cls, model: str, data: str, result: "TrainResult") -> "TrainRecord":
        return cls(model, data, str(result.checkpoint), result.best_epoch, result.best_val_acc, result.test_acc,
                   [dict(h.__dict__) for h in result.history])

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "data": self.data, "checkpoint": self.checkpoint, "best_epoch": self.best_epoch,
                "val_acc": self.val_acc, "test_acc": self.test_acc, "history": self.history}

    def plots(self, run: RunRecord) -> dict[str, bytes]:
        return {"training": draw.plot_training(self.history)} if self.history else {}

    def markdown(self, run: RunRecord, figure: Figure) -> list[str]:
        return ["## Training", "",
                f"`{self.model}` on `{self.data}`: best epoch {self.best_epoch}, validation accuracy "
                f"{100 * self.val_acc:.2f}%, held-out test accuracy {100 * self.test_acc:.2f}%.", ""] \
            + figure("training")


@dataclass
class ExportRecord:
    key: ClassVar[str] = "export"
    folder: str
    artifacts: list["Artifact"]
    seconds: dict[str, float]             # per format
    preprocessing: Any = None             # models.images.Preprocessing: the model's input contract
    assumed: list[str] = field(default_factory=list)   # values the export defaulted (manifest "assumed")

    def to_dict(self) -> dict[str, Any]:
        out = {"folder": self.folder, "artifacts": [a.to_dict() for a in self.artifacts], "seconds": self.seconds}
        if self.preprocessing is not None:
            out["preprocessing"] = dataclasses.asdict(self.preprocessing)
            out["assumed"] = list(self.assumed)
        return out

    def plots(self, run: RunRecord) -> dict[str, bytes]:
        return {}

    def markdown(self, run: RunRecord, figure: Figure) -> list[str]:
        if not self.artifacts:
            return []
        contract = []
        if self.preprocessing is not None:
            contract = [f"Input preprocessing (part of the model's contract, in manifest.json and the app files): "
                        f"{self.preprocessing.describe()}.", ""]
            contract += [f"- **assumed**: {a}" for a in self.assumed] + ([""] if self.assumed else [])
        return ["## Artifacts", ""] + contract + table(
            ["artifact", "file", "size (KiB)", "sha256"], "llrl",
            [[a.key, f"`{a.path}`", f"{a.size_bytes / 1024:,.1f}", f"`{a.sha256[:12]}`"] for a in self.artifacts]) \
            + [""] + self.delegation_lines()

    def delegation_lines(self) -> list[str]:
        """Where each delegated artifact's ops run (``extra["delegation"]``, ExecuTorch's
        XNNPACK split): an op left outside the delegate is slow on a phone, so say which."""
        lines = []
        for a in self.artifacts:
            d = a.extra.get("delegation") if isinstance(a.extra, dict) else None
            if not isinstance(d, dict):
                continue
            rest = d.get("non_delegated") or {}
            left = f" ({', '.join(f'{op} x{n}' for op, n in rest.items())})" if rest else ""
            lines.append(f"- **{a.key}** op split: {d.get('delegated_ops')} ops in {d.get('delegated_subgraphs')} "
                         f"{d.get('backend', '')} delegate subgraph(s), {d.get('non_delegated_ops')} on the "
                         f"portable CPU kernels{left}")
        return lines + [""] if lines else []


@dataclass
class VerifyRecord:
    """``mdeploy verify`` of the export folder or (``quantized``) of the quantize folder.

    The first of them in a run draws the figures of both: one parity chart and one
    per-layer chart over every artifact, and each artifact's accuracy against its size and
    local latency (from the profile stage, when it ran).
    """

    folder: str
    report: "ParityReport"
    sizes: dict[str, int | None]          # target -> bytes on disk (None: not found)
    quantized: bool = False

    @classmethod
    def from_result(cls, folder: str | Path, report: "ParityReport", quantized: bool = False) -> "VerifyRecord":
        return cls(str(folder), report, {p.target: _size(Path(folder), p.target_path) for p in report.pairs},
                   quantized)

    @property
    def key(self) -> str:
        return "verify_quantized" if self.quantized else "verify"

    @property
    def prefix(self) -> str:
        return QUANTIZED if self.quantized else ""

    def pairs(self) -> list[dict[str, Any]]:
        """Each pair's JSON with what the report needs beside it: size, accuracy, runner."""
        out = []
        for p in self.report.pairs:
            d = p.to_dict()
            d["size_bytes"] = self.sizes.get(p.target)
            d["accuracy"] = d.get("accuracy_target")
            d["runner"] = d.get("target_runner")
            out.append(d)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**self.report.to_dict(), "pairs": self.pairs(), "folder": self.folder}

    def plots(self, run: RunRecord) -> dict[str, bytes]:
        verified = run.sections_of(VerifyRecord)
        if verified[0] is not self:
            return {}
        pairs = [dict(p, target=v.prefix + p["target"]) for v in verified for p in v.pairs()]
        out = {}
        if pairs:
            out["parity"] = draw.plot_parity(pairs)
            if any(p.get("layers") for p in pairs):
                out["per_layer_error"] = draw.plot_layer_errors(pairs)
        points = tradeoff_points(run)
        if points:
            out["accuracy_size_latency"] = draw.plot_tradeoff(points)
        return out

    def markdown(self, run: RunRecord, figure: Figure) -> list[str]:
        pairs = self.pairs()
        if not pairs:
            return []
        title = "Parity of the quantized artifacts against PyTorch" if self.quantized else "Parity against PyTorch"
        from pipeline.stages.verify import RANDOM_DISCLAIMER
        disclaimer = [f"**{RANDOM_DISCLAIMER}**", ""] if (self.report.inputs or {}).get("random") else []
        rows = []
        for p in pairs:
            fd = p.get("first_divergent")
            rows.append([p["target"], p.get("runner", ""), num(p.get("max_abs")), num(p.get("mean_abs")),
                         num(p.get("cosine"), 6), num(p.get("snr_db"), 3), pct(p.get("top1_agreement")),
                         pct(p.get("accuracy")), "yes" if p.get("passed") else "**NO**", fd["layer"] if fd else ""])
        lines = [f"## {title}", ""] + disclaimer + table(
            ["target", "runner", "max abs", "mean abs", "cosine", "SNR dB", "top-1 agree", "accuracy", "passed",
             "first divergent"], "llrrrrrrll", rows) + [""]
        if run.sections_of(VerifyRecord)[0] is self:
            lines += figure("parity") + figure("per_layer_error")
            if not run.sections_of(ProfileRecord):      # else it closes the latency section
                lines += figure("accuracy_size_latency")
        return lines


def _size(root: Path, rel: str) -> int | None:
    if not rel:
        return None
    from exporters.artifact import size_of
    path = root / rel
    return size_of(path) if path.exists() else None


def _db(v: float | None) -> str:
    """An SNR in dB; None means no error at all."""
    return "exact" if v is None else num(v, 3)


def tradeoff_points(run: RunRecord) -> list[dict[str, Any]]:
    """One point per verified artifact: accuracy, size and local p50 latency."""
    profile = run.sections_of(ProfileRecord)
    latency = profile[0].local_p50_ms() if profile else {}
    points = []
    for v in run.sections_of(VerifyRecord):
        for p in v.pairs():
            if p.get("size_bytes") and p.get("accuracy") is not None:
                name = v.prefix + p["target"]
                points.append({"name": name, "size_bytes": p["size_bytes"], "accuracy": p["accuracy"],
                               "latency_ms": latency.get(name), "quantized": v.quantized})
    return points


@dataclass
class QuantizeRecord:
    key: ClassVar[str] = "quantize"
    folder: str
    report: Any                           # quantize.report.QuantReport
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"folder": self.folder, **self.report.to_dict(), "seconds": self.seconds}

    def plots(self, run: RunRecord) -> dict[str, bytes]:
        q = self.report.to_dict()
        sens = q.get("sensitivity")
        out = {"int8_sensitivity": draw.plot_sensitivity(sens)} if sens and sens.get("layers") else {}
        for key, mixed in _searches(q):
            out[key] = draw.plot_mixed_precision(mixed)
        return out

    def markdown(self, run: RunRecord, figure: Figure) -> list[str]:
        q = self.report.to_dict()
        if not q.get("variants"):
            return []
        calib = q.get("calibration") or {}
        rows = [[v["key"], pct(v.get("accuracy")), num(v.get("drop_points"), 3), pct(v.get("top1_agreement")),
                 ", ".join(num(x, 3) for x in (v.get("snr_db") or {}).values()), f"{v['size_bytes'] / 1024:,.1f}",
                 f"{num(v.get('size_ratio'), 3)}x"] for v in q["variants"]]
        plain = q.get("plain_route")
        if plain:
            rows.append([plain["key"], pct(plain.get("accuracy")), num(plain.get("drop_points"), 3),
                         pct(plain.get("top1_agreement")),
                         ", ".join(num(x, 3) for x in (plain.get("snr_db") or {}).values()), "-", "-"])
        lines = [f"## Quantization ({q.get('target')})", "",
                 f"Float (PyTorch) accuracy {pct(q.get('float_accuracy'))} on {q.get('eval_samples')} held-out "
                 f"inputs; calibration: {calib.get('samples')} inputs, {calib.get('method')} ranges.", ""]
        lines += table(["artifact", "accuracy", "drop (points; negative = gained)", "top-1 agree", "SNR dB",
                        "size (KiB)", "smaller"], "lrrrrrr", rows)
        from pipeline.commands.quantize import rounding_summary
        summary = rounding_summary(q)
        if summary:
            lines += ["", summary[0].upper() + summary[1:]]
        refs = q.get("references") or []
        if refs:
            lines += ["", "Qualcomm's published reference points for MobileNetV2 (ImageNet top-1): " + "; ".join(
                (f"{r['short']}: {r['float_accuracy']:.2f}% -> {r['quantized_accuracy']:.2f}% ({r['drop']:.2f} points)"
                 if r.get("float_accuracy") is not None and r.get("quantized_accuracy") is not None
                 else f"{r['short']}: a drop of about {r['drop']:.1f} points (only the drop is published)")
                + f" [{r['source']}]" for r in refs) + "."]
        lines += [""] + figure("int8_sensitivity")
        sens = q.get("sensitivity") or {}
        top = (sens.get("layers") or [])[:10]
        if top and "activation_only_snr_db" in top[0]:
            ranked = sens.get("mode") != "split"            # the whole-layer ranking ran (--sensitivity-mode)
            what = ("only this layer quantized, only its weights, only its activations" if ranked else
                    "only this layer's weights quantized, only its activations; ranked by the worse of the two")
            hint = "" if ranked else "; `--sensitivity-mode only` adds the layer quantized whole"
            lines += [f"Most sensitive layers ({sens.get('profile')}; logit SNR in dB with {what}; "
                      f"{sens.get('samples')} calibration inputs{hint}):", ""]
            lines += table(["layer", "op"] + ["layer quantized"] * ranked + ["weights only", "activations only"],
                           "ll" + "r" * (2 + ranked),
                           [[x["layer"], x["op_type"]] + [_db(x.get("snr_db"))] * ranked
                            + [_db(x.get("weight_only_snr_db")) if x.get("has_weights") else "-",
                               _db(x.get("activation_only_snr_db"))] for x in top]) + [""]
        for key, mixed in _searches(q):
            default = f" (the default of `--target {q.get('target')}`; `--target-sqnr off` for all-8-bit)" \
                if mixed.get("default_target") else ""
            lines += [f"Mixed precision to {mixed['target_sqnr_db']:g} dB logit SQNR{default} ({mixed['profile']}, "
                      f"{mixed['samples']} calibration inputs): "
                      + (mixed.get("note") or f"reached, {_db(mixed.get('sqnr_db'))} dB ({mixed['profile']} "
                         f"{_db(mixed.get('start_sqnr_db'))} dB)") + ". 16-bit activations: "
                      + (", ".join(f"`{x}`" for x in mixed["w8a16_layers"]) or "none") + "; 16-bit weights: "
                      + (", ".join(f"`{x}`" for x in mixed.get("w16a16_layers", [])) or "none") + "; float: "
                      + (", ".join(f"`{x}`" for x in mixed["keep_float"]) or "none") + ".", ""]
            lines += figure(key)
        return lines


def _searches(q: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The quantize report's ``--target-sqnr`` searches with a path, each with its figure's
    name: the target profile's, then the other profiles' default searches."""
    first = q.get("mixed_precision") or {}
    others = q.get("mixed_precision_others") or []
    named = [("mixed_precision_pareto", first)] + [
        (f"mixed_precision_pareto_{m.get('profile', i)}", m) for i, m in enumerate(others)]
    return [(k, m) for k, m in named if m.get("path")]


@dataclass
class ProfileRecord:
    """Profiles of the export folder and, named with ``QUANTIZED`` in front, of the quantize
    folder: one latency table for every artifact of the run."""

    key: ClassVar[str] = "profile"
    folder: str
    profiles: list["Profile"] = field(default_factory=list)
    skipped: list["Skipped"] = field(default_factory=list)
    estimates: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_results(cls, exported: "ProfileResult", quantized: "ProfileResult | None" = None) -> "ProfileRecord":
        rec = cls(exported.folder, list(exported.profiles), list(exported.skipped), list(exported.estimates))
        if quantized is not None:
            for p in quantized.profiles:
                p.artifact = f"{QUANTIZED}{p.artifact}"
            rec.profiles += quantized.profiles
            rec.skipped += [dataclasses.replace(s, artifact=f"{QUANTIZED}{s.artifact}") for s in quantized.skipped]
        return rec

    def local_p50_ms(self) -> dict[str, float]:
        out = {}
        for p in self.to_dict()["profiles"]:
            lat = p.get("latency") or {}
            if p.get("device") == "local" and lat.get("p50_ms"):
                out[p["artifact"]] = lat["p50_ms"]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"folder": self.folder, "profiles": [p.to_dict() for p in self.profiles],
                "skipped": [dataclasses.asdict(s) for s in self.skipped], "estimates": self.estimates}

    def plots(self, run: RunRecord) -> dict[str, bytes]:
        return {}

    def markdown(self, run: RunRecord, figure: Figure) -> list[str]:
        profiles = self.to_dict()["profiles"]
        if not profiles:
            return figure("accuracy_size_latency")
        rows = []
        for p in profiles:
            lat = p.get("latency") or {}
            rows.append([p["artifact"], p["device"], p["runtime"], num(lat.get("p50_ms")), num(lat.get("p90_ms")),
                         num(p.get("first_inference_ms")), num(p.get("init_ms")),
                         f"{(p.get('artifact_size_bytes') or 0) / 1024:,.1f}"])
        return ["## Latency", ""] + table(["artifact", "device", "runtime", "p50 ms", "p90 ms", "first ms", "init ms",
                                           "size (KiB)"], "lllrrrrr", rows) + [""] \
            + figure("accuracy_size_latency")


@dataclass
class RepVGGRecord:
    key: ClassVar[str] = "repvgg"
    result: "RepVGGResult"

    def to_dict(self) -> dict[str, Any]:
        return self.result.to_dict()

    def plots(self, run: RunRecord) -> dict[str, bytes]:
        return {"repvgg_int8": draw.plot_repvgg(self.to_dict())} if self.result.variants else {}

    def markdown(self, run: RunRecord, figure: Figure) -> list[str]:
        if not self.result.variants:
            return []
        rows = []
        for v in self.result.variants:
            i8 = v.int8 or {}
            rows.append([v.model, f"{v.params_train:,} -> {v.params_deploy:,}", f"{v.convs} / {v.blocks}", v.adds,
                         num(v.reparam_max_abs), pct(i8.get("float_accuracy")), pct(i8.get("accuracy")),
                         num(i8.get("drop_points"), 3), num(i8.get("snr_db"), 3)])
        return ["## RepVGG re-parameterization", ""] + table(
            ["model", "params train -> deploy", "convs / blocks", "Adds", "reparam max abs", "fp32 acc", "int8 acc",
             "drop (points; negative = gained)", "int8 SNR dB"], "lrrrrrrrr", rows) + [""] + figure("repvgg_int8")


@dataclass
class SparseShiftRecord:
    key: ClassVar[str] = "sparse_shift"
    result: "SparseShiftResult"

    def to_dict(self) -> dict[str, Any]:
        return self.result.to_dict()

    def plots(self, run: RunRecord) -> dict[str, bytes]:
        return {"sparse_shifts": draw.plot_sparse_shift(self.to_dict())} if self.result.statistics else {}

    def markdown(self, run: RunRecord, figure: Figure) -> list[str]:
        sh, st = self.result, self.result.statistics
        if not st:
            return []
        return ["## Sparse shifts", "",
                f"`{sh.model}` trained with L1 {sh.shift_l1:g}: held-out accuracy {pct(sh.trained.test_acc)}; "
                f"{st['zero']} of {st['channels']} channels ({pct(st['zero_fraction'])}) do not move. Exported "
                f"shifts are data movement only: {'yes' if sh.data_movement_only else '**NO**'}; shift outputs "
                f"exact against PyTorch: {'yes' if sh.shift_parts_exact else '**NO**'}.", ""] + figure("sparse_shifts")


__all__ = ["ExportRecord", "ProfileRecord", "QuantizeRecord", "RepVGGRecord", "SparseShiftRecord", "TrainRecord",
           "VerifyRecord", "tradeoff_points"]
