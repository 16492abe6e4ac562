"""`mdeploy run`: the whole pipeline on the built-in default (or a config file).

train -> export (ONNX, TFLite, Core ML) -> verify (parity of every artifact against
PyTorch on held-out images) -> profile (every artifact, locally) -> report
(HTML/Markdown/JSON with plots). Each stage is the same function its own command
calls; this module only sequences them, shows progress and writes the run record.

Each run gets a fresh folder ``runs/<UTC timestamp>-<name>/`` (``runs/latest``
points at the newest), so nothing earlier is ever overwritten.
"""
from __future__ import annotations

import argparse
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

STAGES = ("train", "export", "verify", "profile", "report")


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("run", parents=[common], help="the whole pipeline on the built-in default",
                       description="Train, export, verify, profile and report in one run folder.")
    p.add_argument("--config", help="a TOML or JSON run configuration (default: the built-in one)")
    p.add_argument("--out", default="runs", help="parent folder of run folders (default: runs)")
    p.add_argument("--name", help="run name (default: the config's name)")
    p.add_argument("--stages", help=f"comma list, a subset of {','.join(STAGES)} (default: the config's)")
    p.add_argument("--epochs", type=int, help="override the config's training epochs")
    p.set_defaults(func=run)


def _new_run_dir(parent: Path, name: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = parent / f"{stamp}-{name}"
    n = 1
    while run_dir.exists():
        n += 1
        run_dir = parent / f"{stamp}-{name}-{n}"
    run_dir.mkdir(parents=True)
    latest = parent / "latest"
    tmp = parent / f".latest.{os.getpid()}"
    try:
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, latest)
    except OSError:
        pass
    return run_dir


def run(args: argparse.Namespace, ui) -> int:
    from models.errors import InputError
    from pipeline.config import load_config
    cfg = load_config(args.config)
    if args.epochs:
        cfg.train.epochs = args.epochs
    stages = [s.strip() for s in (args.stages.split(",") if args.stages else cfg.stages) if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise InputError("--stages", f"a comma list of {', '.join(STAGES)}", ", ".join(bad))
    if "train" not in stages and not cfg.checkpoint:
        raise InputError("--stages", "train, or a config with a checkpoint to start from", "neither")
    run_dir = _new_run_dir(Path(args.out), args.name or cfg.name)
    ui.info(f"[bold]mdeploy run[/bold] -> {run_dir}")
    record: dict[str, Any] = {"name": args.name or cfg.name, "run_dir": str(run_dir),
                              "config": cfg.model_dump(), "stages": {}, "notes": []}
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else None
    export_dir = run_dir / "export"
    code = 0

    def timed(stage: str):
        ui.info(f"\n[bold cyan]== {stage}[/bold cyan]")
        return time.perf_counter()

    if "train" in stages:
        from pipeline.commands.train import progress_printer
        from pipeline.stages.train import train
        t0 = timed("train")
        with ui.progress() as prog:
            result = train(cfg.train, run_dir / "train", progress=progress_printer(ui, prog, cfg.train.model))
        checkpoint = result.checkpoint
        record["train"] = {"model": cfg.train.model, "data": cfg.train.data, "checkpoint": str(checkpoint),
                           "best_epoch": result.best_epoch, "val_acc": result.best_val_acc,
                           "test_acc": result.test_acc,
                           "history": [h.__dict__ for h in result.history]}
        record["stages"]["train"] = time.perf_counter() - t0
        ui.result(f"trained {cfg.train.model}: held-out accuracy {100 * result.test_acc:.2f}% "
                  f"(best epoch {result.best_epoch}) -> {checkpoint}")

    if "export" in stages:
        from pipeline.commands.export import artifacts_table
        from pipeline.stages.export import ExportOptions, export_model
        t0 = timed("export")
        precisions = tuple(dict.fromkeys([*cfg.export.tflite_precisions, *cfg.export.coreml_precisions]))
        with ui.status("exporting"):
            exp = export_model(None, export_dir, checkpoint=checkpoint, progress=ui.info,
                               options=ExportOptions(formats=tuple(cfg.export.formats),
                                                     precisions=precisions, opset=cfg.export.opset))
        record["export"] = {"folder": str(export_dir),
                            "artifacts": [a.to_dict() for a in exp.manifest.artifacts],
                            "seconds": exp.seconds}
        record["stages"]["export"] = time.perf_counter() - t0
        ui.table(artifacts_table(exp.manifest, export_dir))

    if "verify" in stages:
        from pipeline.commands.verify import layers_table, pairs_table
        from pipeline.stages.verify import VerifyOptions, verify_folder
        t0 = timed("verify")
        ver = verify_folder(export_dir, VerifyOptions(samples=cfg.verify.samples), progress=ui.info)
        pairs = []
        for p in ver.report.pairs:
            d = p.to_dict()
            d["size_bytes"] = _artifact_size(export_dir, p.target_path)
            d["accuracy"] = d.get("accuracy_target")
            d["runner"] = d.get("target_runner")
            pairs.append(d)
        record["verify"] = {**ver.report.to_dict(), "pairs": pairs}
        record["notes"] += ver.notes
        record["stages"]["verify"] = time.perf_counter() - t0
        ui.table(pairs_table(ver.report))
        for p in ver.report.pairs:
            if not p.passed and p.layers:
                ui.table(layers_table(p))
        if not ver.passed:
            code = 1
            ui.warn("some artifacts failed parity; see the per-layer tables above and the report")

    if "profile" in stages:
        from pipeline.commands.profile import latency_table
        from pipeline.stages.profile import ProfileOptions, profile_folder
        t0 = timed("profile")
        prof = profile_folder(export_dir, ProfileOptions(devices=cfg.profile.devices, runs=cfg.profile.runs,
                                                         warmup=cfg.profile.warmup), progress=ui.info)
        record["profile"] = prof.to_dict()
        record["stages"]["profile"] = time.perf_counter() - t0
        ui.table(latency_table(prof.profiles))

    if "report" in stages:
        from pipeline.report import write_report
        timed("report")
        paths = write_report(run_dir, record)
        ui.result(f"report: {paths['html']}  (also {paths['md'].name}, {paths['json'].name})")
    if args.json:
        ui.emit_json(record)
    return code


def _artifact_size(root: Path, rel: str) -> int | None:
    if not rel:
        return None
    from exporters.artifact import size_of
    path = root / rel
    return size_of(path) if path.exists() else None
