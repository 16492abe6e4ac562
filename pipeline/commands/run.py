"""`mdeploy run`: the whole pipeline on the built-in default (or a config file).

train -> export (ONNX, TFLite, Core ML) -> verify (parity of every artifact against
PyTorch on held-out images, per-layer error curves) -> quantize (Snapdragon QDQ ONNX and
int8 TFLite with the accuracy cost, verified the same way) -> profile (every artifact,
locally and on configured devices) -> repvgg (RepVGG vs QARepVGG re-parameterized and
int8) -> sparse_shift (FE-Net with sparse shifts, exported as zero-FLOP data movement)
-> report (HTML/Markdown/JSON with plots). Each stage is the same function its own command
calls; this module only sequences them, shows progress and adds each stage's result to
the typed run record (``pipeline.report.RunRecord``), which writes the report and the
``--json`` document.

Each run gets a fresh folder ``runs/<UTC timestamp>-<name>/`` (``runs/latest``
points at the newest), so nothing earlier is ever overwritten. The folder is built in a
hidden staging sibling and renamed into place when every stage has finished; a failed or
killed run leaves no folder and ``latest`` keeps pointing at the last complete one.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.util import pct
from pipeline.commands.run_cache import relocate_files
from pipeline.config import STAGES
from pipeline.ui import Markup, esc

if TYPE_CHECKING:
    from pipeline.report import RunRecord


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("run", parents=[common], help="the whole pipeline on the built-in default",
                       description="Train, export, verify, profile and report in one run folder.")
    p.add_argument("--config", help="a TOML or JSON run configuration (default: the built-in one)")
    p.add_argument("--out", default="runs", help="parent folder of run folders (default: runs)")
    p.add_argument("--name", help="run name (default: the config's name)")
    p.add_argument("--stages", help=f"comma list, a subset of {','.join(STAGES)} (default: the config's)")
    p.add_argument("--epochs", type=int, help="override the config's training epochs")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN",
                   help="reuse the train, export, quantize, repvgg and sparse_shift stages of the newest run "
                        "of this name (finished, or killed midway), or of the run folder RUN under --out, where "
                        "their config is unchanged; verify, profile and the report run again")
    p.set_defaults(func=run)


def _new_run_dir(parent: Path, name: str) -> Path:
    """A fresh run folder name (not created: the run is built in a staging sibling and
    renamed to it at the end, see ``run``)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = parent / f"{stamp}-{name}"
    n = 1
    while os.path.lexists(run_dir):
        n += 1
        run_dir = parent / f"{stamp}-{name}-{n}"
    return run_dir


def _point_latest(run_dir: Path) -> None:
    """``latest`` -> the finished run (a symlink swapped in with one rename)."""
    parent = run_dir.parent
    tmp = parent / f".latest.{os.getpid()}"
    try:
        with contextlib.suppress(FileNotFoundError):   # a killed process of the same pid left it
            tmp.unlink()
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, parent / "latest")
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _remove_dead_latest_links(parent: Path) -> None:
    """A process killed between making ``.latest.<pid>`` and renaming it over ``latest``
    (``_point_latest``) leaves that symlink behind; remove those of dead processes (a live
    one's is its swap in progress)."""
    from exporters.fileio import pid_alive
    try:
        entries = list(parent.iterdir()) if parent.is_dir() else []
    except OSError:
        return
    for entry in entries:
        match = re.fullmatch(r"\.latest\.(\d+)", entry.name)
        if match and entry.is_symlink() and not pid_alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


def _relocate(obj: Any, old: str, new: str, seen: set[int] | None = None) -> Any:
    """``obj`` with every string naming a path under ``old`` made to name it under ``new``
    (dataclasses edited in place): the stages ran in the staging folder, but the record
    must name the folder the run will have once renamed into place."""
    import dataclasses
    seen = set() if seen is None else seen
    if isinstance(obj, str):
        return new + obj[len(old):] if obj == old or obj.startswith(old + os.sep) else obj
    if id(obj) in seen:
        return obj
    if isinstance(obj, dict):
        seen.add(id(obj))
        return {k: _relocate(v, old, new, seen) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        seen.add(id(obj))
        return type(obj)(_relocate(v, old, new, seen) for v in obj)
    if isinstance(obj, Path):
        return Path(_relocate(str(obj), old, new, seen))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        seen.add(id(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            fixed = _relocate(value, old, new, seen)
            if fixed is not value:
                object.__setattr__(obj, f.name, fixed)
    return obj


def run(args: argparse.Namespace, ui) -> int:
    from models.errors import InputError
    from pipeline.config import load_config
    from models.checkpoint import is_factory_spec
    from models.util import path_component
    cfg = load_config(args.config)
    if args.epochs is not None:
        if args.epochs < 1:
            raise InputError("--epochs", "a positive number of epochs", str(args.epochs))
        cfg.train.epochs = args.epochs
    # the run folder's name is one path component: a name like 'x/../..' would put the run
    # (and what 'latest' points at) outside --out
    name = path_component(args.name if args.name is not None else cfg.name,
                          "--name" if args.name is not None else f"{args.config}: name")
    out_parent = Path(args.out)
    from exporters.fileio import check_output_location
    check_output_location(out_parent)
    # code runs only when the user's own config names it (train.model = "file.py:factory");
    # the checkpoint's record of it is never imported
    user_factory = cfg.train.model if is_factory_spec(cfg.train.model) else None
    stages = [s.strip() for s in (args.stages.split(",") if args.stages else cfg.stages) if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise InputError("--stages" if args.stages or not args.config else f"{args.config}: stages",
                         f"a comma list of {', '.join(STAGES)}", ", ".join(bad))
    if "train" not in stages and not cfg.checkpoint:
        raise InputError("--stages", "train, or a config with a checkpoint to start from", "neither")
    try:
        _check_config(cfg, stages, args.config or "the built-in configuration")
    except InputError as exc:
        if not args.config:
            raise
        # the value came from the user's file: name the file and the section, not a flag
        raise InputError(args.config, f"{getattr(exc, 'section', '')}{exc.expected}", exc.found) from None
    from exporters.fileio import remove_dead_staging, staged_output_dir
    from pipeline.commands.run_cache import find_previous
    previous = find_previous(out_parent, name, args.resume or None) if args.resume is not None else None
    remove_dead_staging(out_parent, keep=previous)      # what killed runs left (each run has a new name)
    _remove_dead_latest_links(out_parent)
    run_dir = _new_run_dir(out_parent, name)
    ui.info(Markup(f"[bold]mdeploy run[/bold] -> {esc(run_dir)}"))
    if args.resume is not None:
        ui.info(f"resuming from {previous.name}" if previous is not None else
                f"--resume: no earlier run named {name} in {out_parent}: running every stage")
    from pipeline.report import RunRecord
    record = RunRecord(name=name, run_dir=str(run_dir), config=cfg.model_dump())
    # the run is built in a staging sibling and renamed to its name only when every stage
    # has finished: a failed or killed run leaves no half-run folder, and 'latest' moves
    # only to a complete run
    with staged_output_dir(run_dir) as stage:
        code = _stages(args, ui, cfg, stages, stage, record, user_factory, shown=run_dir, previous=previous)
        for old, new in ((stage.resolve(), run_dir.resolve()), (stage, run_dir)):   # absolute and as given
            _relocate(record, str(old), str(new))
            relocate_files(stage, old, new)
        record.run_dir = str(run_dir)
        if "report" in stages:
            from pipeline.report import write_report
            paths = write_report(stage, record)
            ui.result(f"report: {run_dir / paths['html'].name}  (also {paths['md'].name}, {paths['json'].name})")
    _point_latest(run_dir)
    if previous is not None:
        remove_dead_staging(out_parent)                 # the killed run resumed from, once reused
    if args.json:
        ui.emit_json(record.to_dict())
    return code


def _previous_quant_report(folder: Path) -> Any:
    """The ``QuantReport`` of an earlier run's quantized folder, or None when it cannot be
    read back (then the stage reruns)."""
    from pipeline.commands.run_cache import read_stage_json
    from pipeline.stages.quantize import REPORT_NAME
    from quantize.report import QuantReport
    data = read_stage_json(folder / REPORT_NAME)
    try:
        return QuantReport.from_dict(data) if isinstance(data, dict) else None
    except (KeyError, TypeError):
        return None


def _previous_demonstration(folder: Path, result_type: Any) -> Any:
    """The result (``RepVGGResult``, ``SparseShiftResult``) a demonstration folder adopted
    from an earlier run saved in its ``summary.json``, or None when it cannot be read back or
    its checks failed: then the stage reruns, so a failure is measured again (as verify always is after
    a reused quantize stage) rather than carried over, and a fixed bug shows as fixed."""
    from pipeline.commands.run_cache import read_stage_json
    from pipeline.stages.demonstration import SUMMARY_NAME
    data = read_stage_json(folder / SUMMARY_NAME)
    try:
        res = result_type.from_dict(data) if isinstance(data, dict) else None
        return res if res is not None and res.passed else None
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _stages(args: argparse.Namespace, ui, cfg, stages: list[str], run_dir: Path, record: "RunRecord",
            user_factory: str | None, shown: Path, previous: Path | None = None) -> int:
    """Every stage of the run, in order, into ``run_dir`` (the staging folder); the exit code.
    Messages name ``shown``, the folder the run will have once renamed into place. With
    ``previous`` (``--resume``), train, export, quantize, repvgg and sparse_shift are copied
    from it where their keys match (``pipeline.commands.run_cache``)."""
    from exporters.artifact import sha256_of
    from pipeline.commands.run_cache import adopt, mark_done, reusable, stage_key
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else None
    export_dir = run_dir / "export"
    code = 0
    # what the export depends on upstream: the training config, or the given checkpoint's bytes
    upstream = stage_key("train", cfg.train.model_dump(), user_factory) if "train" in stages else \
        (sha256_of(checkpoint) if checkpoint is not None and checkpoint.is_file() else None)
    upstream_reused = "train" not in stages

    def timed(stage: str):
        ui.info(Markup(f"\n[bold cyan]== {esc(stage)}[/bold cyan]"))
        return time.perf_counter()

    if "train" in stages:
        from pipeline.commands.train import progress_printer
        from pipeline.report import TrainRecord
        from pipeline.stages.train import train
        t0 = timed("train")
        done = reusable(previous, "train", upstream)
        if done is not None:
            assert previous is not None
            adopt(previous, "train", run_dir)
            rec = TrainRecord(**{**done["record"], "checkpoint": str(run_dir / "train" /
                                                                     Path(done["record"]["checkpoint"]).name)})
            checkpoint, upstream_reused = Path(rec.checkpoint), True
            record.add(rec)
            ui.result(f"train: reused from {previous.name} (same training config): held-out accuracy "
                      f"{100 * rec.test_acc:.2f}%")
        else:
            with ui.progress() as prog:
                result = train(cfg.train, run_dir / "train", progress=progress_printer(ui, prog, cfg.train.model))
            checkpoint = result.checkpoint
            rec = record.add(TrainRecord.from_result(cfg.train.model, cfg.train.data, result))
            mark_done(run_dir / "train", "train", upstream, rec.to_dict(), time.perf_counter() - t0)
            ui.result(f"trained {cfg.train.model}: held-out accuracy {100 * result.test_acc:.2f}% "
                      f"(best epoch {result.best_epoch}) -> {shown / checkpoint.relative_to(run_dir)}")
        record.stages["train"] = time.perf_counter() - t0

    if "export" in stages:
        from pipeline.commands.export import artifacts_table
        from pipeline.report import ExportRecord
        from pipeline.stages.export import ExportOptions, export_model
        t0 = timed("export")
        precisions = tuple(dict.fromkeys([*cfg.export.tflite_precisions, *cfg.export.coreml_precisions]))
        key = stage_key("export", cfg.export.model_dump(), upstream, user_factory)
        done = reusable(previous, "export", key) if upstream_reused else None
        upstream, upstream_reused = key, done is not None
        if done is not None:
            from exporters.artifact import Manifest
            assert previous is not None
            adopt(previous, "export", run_dir)
            manifest, seconds = Manifest.load(export_dir), dict(done["record"].get("seconds", {}))
            assumed = list(manifest.assumed)
            ui.result(f"export: reused from {previous.name} (same export config and checkpoint)")
        else:
            with ui.status("exporting"):
                exp = export_model(user_factory, export_dir, checkpoint=checkpoint, progress=ui.info,
                                   options=ExportOptions(formats=tuple(cfg.export.formats),
                                                         precisions=precisions, opset=cfg.export.opset,
                                                         **cfg.export.app_options()))
            manifest, seconds, assumed = exp.manifest, exp.seconds, list(exp.assumed)
            mark_done(export_dir, "export", key, {"seconds": seconds}, time.perf_counter() - t0)
        record.add(ExportRecord(str(export_dir), list(manifest.artifacts), seconds, manifest.preprocessing, assumed))
        record.stages["export"] = time.perf_counter() - t0
        ui.table(artifacts_table(manifest, export_dir))
        for line in assumed:
            ui.assumed(line)

    if "verify" in stages:
        t0 = timed("verify")
        ok = _verify(ui, record, export_dir, cfg.verify.samples, quantized=False, model=user_factory)
        record.stages["verify"] = time.perf_counter() - t0
        if not ok:
            code = 1

    quant_dir = run_dir / "quantized"
    if "quantize" in stages:
        from pipeline.commands.quantize import sensitivity_progress, show_report
        from pipeline.report import QuantizeRecord
        from pipeline.stages.quantize import QuantizeOptions, quantize_folder
        t0 = timed("quantize")
        q = cfg.quantize
        opts = QuantizeOptions(target=q.target, method=q.method, samples=q.samples,
                               float_fixes=tuple(q.float_fixes), weight_rounding=tuple(q.weight_rounding),
                               keep_float=q.keep_float,
                               w8a16_layers=q.w8a16_layers, target_sqnr=q.target_sqnr,
                               target_profile=q.target_profile, sensitivity=q.sensitivity,
                               tflite_inputs=tuple(q.tflite_inputs), tflite_int8w=q.tflite_int8w,
                               coreml=q.coreml,
                               plain_baseline=q.plain_baseline, eval_samples=q.eval_samples,
                               model=user_factory)
        # the quantized folder depends on the export (its key chains back to training, which
        # also names the calibration data) and the quantize section; verify below always reruns
        key = stage_key("quantize", q.model_dump(), upstream, user_factory)
        done = reusable(previous, quant_dir.name, key) if upstream_reused and "export" in stages else None
        report = _previous_quant_report(previous / quant_dir.name) if done is not None and previous else None
        if done is not None and report is not None:
            assert previous is not None
            adopt(previous, quant_dir.name, run_dir)
            seconds = dict(done["record"].get("seconds", {}))
            ui.result(f"quantize: reused from {previous.name} (same quantize config and export)")
        else:
            with sensitivity_progress(ui) as on_layer:
                res = quantize_folder(export_dir, quant_dir, opts, progress=ui.info, layer_progress=on_layer)
            report, seconds = res.report, res.seconds
            mark_done(quant_dir, quant_dir.name, key, {"seconds": seconds}, time.perf_counter() - t0)
        record.add(QuantizeRecord(str(quant_dir), report, seconds))
        show_report(ui, report)
        ok = _verify(ui, record, quant_dir, cfg.verify.samples, quantized=True, model=user_factory)
        record.stages["quantize"] = time.perf_counter() - t0
        if not ok:
            code = 1

    if "profile" in stages:
        from pipeline.commands.profile import latency_table
        from pipeline.report import ProfileRecord
        from pipeline.stages.profile import ProfileOptions, profile_folder
        t0 = timed("profile")
        popts = ProfileOptions(devices=cfg.profile.devices, runs=cfg.profile.runs, warmup=cfg.profile.warmup)
        prof = profile_folder(export_dir, popts, progress=ui.info)
        qprof = profile_folder(quant_dir, popts, progress=ui.info) if quant_dir.is_dir() else None
        profiled = record.add(ProfileRecord.from_results(prof, qprof))
        record.stages["profile"] = time.perf_counter() - t0
        for device in dict.fromkeys(p.device for p in profiled.profiles):
            ui.table(latency_table([p for p in profiled.profiles if p.device == device]))
        for s in profiled.skipped:
            ui.info(f"not profiled: {s.artifact} ({s.reason})")

    from pipeline.report import RepVGGRecord, SparseShiftRecord
    from pipeline.stages.repvgg import RepVGGResult, repvgg_stage
    from pipeline.stages.sparse_shift import SparseShiftResult, sparse_shift_stage
    for stage, func, result_type, section, table in (
            ("repvgg", repvgg_stage, RepVGGResult, RepVGGRecord, repvgg_table),
            ("sparse_shift", sparse_shift_stage, SparseShiftResult, SparseShiftRecord, sparse_shift_table)):
        if stage not in stages:
            continue
        t0 = timed(stage)
        # a demonstration trains its own models from its own section (data, seed, epochs...) and
        # reads nothing of the train/export chain: its section alone is its key
        key = stage_key(stage, getattr(cfg, stage).model_dump())
        res = None
        if previous is not None and reusable(previous, stage, key) is not None:
            # read back from the adopted copy, whose JSON adopt already made name this run
            adopted = adopt(previous, stage, run_dir)
            res = _previous_demonstration(adopted, result_type)
            if res is None:
                shutil.rmtree(adopted)       # unreadable or failed: the stage runs again, from nothing
        if res is not None:
            assert previous is not None
            ui.result(f"{stage}: reused from {previous.name} (same [{stage}] config)")
        else:
            opts = getattr(cfg, stage).model_copy(update={"force": True})     # the run folder is new
            res = func(opts, run_dir / stage, progress=ui.info)
            mark_done(run_dir / stage, stage, key, {"passed": res.passed}, time.perf_counter() - t0)
        record.add(section(res))
        record.stages[stage] = time.perf_counter() - t0
        ui.table(table(res.to_dict()))
        if not res.passed:
            code = 1
            ui.warn(f"a {stage} check failed (see the table and {stage}/summary.json)")

    if "report" in stages:
        timed("report")
    return code


def _check_config(cfg, stages: list[str], source: str) -> None:
    """Every section a stage of this run will read, checked before the first stage starts:
    a bad opset or device spec must not surface after twenty minutes of training."""
    from models.errors import InputError

    def section(name: str, check) -> None:
        try:
            check()
        except InputError as exc:
            exc.section = f"[{name}] {exc.source}: " if exc.source else f"[{name}] "  # type: ignore[attr-defined]
            raise

    from models import model_entry
    if "train" in stages:
        section("train", lambda: model_entry(cfg.train.model))
    if "train" not in stages and cfg.checkpoint and not Path(cfg.checkpoint).is_file():
        raise InputError(source, "checkpoint: an existing checkpoint file", repr(cfg.checkpoint))
    if "export" in stages:
        from pipeline.stages.export import ExportOptions, _plan
        precisions = tuple(dict.fromkeys([*cfg.export.tflite_precisions, *cfg.export.coreml_precisions]))
        opts = ExportOptions(formats=tuple(cfg.export.formats), precisions=precisions, opset=cfg.export.opset,
                             **cfg.export.app_options())
        section("export", lambda: _plan(tuple(dict.fromkeys(f.strip().lower() for f in opts.formats
                                                              if f.strip())), opts))
    if "quantize" in stages:
        from pipeline.stages.quantize import QuantizeOptions, _check_options
        q = cfg.quantize
        section("quantize", lambda: _check_options(QuantizeOptions(target=q.target, method=q.method, samples=q.samples,
                                       float_fixes=tuple(q.float_fixes), weight_rounding=tuple(q.weight_rounding),
                                       keep_float=q.keep_float, w8a16_layers=q.w8a16_layers,
                                       target_sqnr=q.target_sqnr, target_profile=q.target_profile,
                                       eval_samples=q.eval_samples)))
    if "repvgg" in stages:
        from models.util import path_component
        for model in cfg.repvgg.models:             # each becomes a folder of the run
            section("repvgg", lambda: model_entry(path_component(model, "models")))
    if "profile" in stages:
        from device_tests.devices import parse_device
        for spec in cfg.profile.devices:
            section("profile", lambda: parse_device(spec))


def _verify(ui, record: "RunRecord", folder: Path, samples: int, quantized: bool,
            model: str | None = None) -> bool:
    """``mdeploy verify`` on one folder, per-layer error curves for every pair (the report
    plots them), tables shown; the result goes into the run record."""
    from pipeline.commands.verify import layers_table, pairs_table
    from pipeline.report import VerifyRecord
    from pipeline.stages.verify import VerifyOptions, verify_folder
    opts = VerifyOptions(samples=samples, per_layer="all",
                         runner_options={"torch": {"model": model}} if model else {})
    ver = verify_folder(folder, opts, progress=ui.info)
    record.add(VerifyRecord.from_result(folder, ver.report, quantized=quantized))
    record.notes += ver.notes
    ui.table(pairs_table(ver.report))
    for p in ver.report.pairs:
        if not p.passed and p.layers:
            ui.table(layers_table(p))
    if not ver.passed:
        ui.warn(f"some artifacts in {folder.name} failed parity; see the per-layer tables above and the report")
    return ver.passed


def repvgg_table(rep: dict[str, Any]):
    from rich.table import Table
    t = Table(title="RepVGG vs QARepVGG: re-parameterized into plain 3x3 convs, then int8 PTQ (ORT CPU)")
    for c in ("model", "params train->deploy", "convs/blocks", "Adds", "reparam max abs", "fp32 acc",
              "int8 acc", "change", "int8 SNR dB", "checks"):
        t.add_column(c, justify="left" if c in ("model", "checks") else "right")
    for v in rep["variants"]:
        q = v.get("int8") or {}
        ok = v["reparam_ok"] and v["one_conv_per_block"] and (v.get("fp32_parity") or {}).get("passed")
        t.add_row(v["model"], f"{v['params_train']:,} -> {v['params_deploy']:,}", f"{v['convs']}/{v['blocks']}",
                  str(v["adds"]), f"{v['reparam_max_abs']:.1e}", _pct(q.get("float_accuracy")),
                  _pct(q.get("accuracy")), f"{-q['drop_points']:+.2f} pt" if q.get("drop_points") is not None else "",
                  f"{q['snr_db']:.1f}" if q.get("snr_db") is not None else "",
                  Markup("[green]pass[/green]" if ok else "[red]FAIL[/red]"))
    return t


def sparse_shift_table(sh: dict[str, Any]):
    from rich.table import Table
    st = sh["statistics"]
    t = Table(title=f"sparse shifts: {sh['model']} trained with L1 {sh['shift_l1']:g}, held-out accuracy "
                    f"{_pct(sh['train'].get('test_acc'))}; exported as data movement "
                    f"({'yes' if sh['data_movement_only'] else 'NO'}), shift outputs exact "
                    f"({'yes' if sh['shift_parts_exact'] else 'NO'})")
    for c in ("layer", "channels", "zero shift", "max |shift|"):
        t.add_column(c, justify="left" if c == "layer" else "right")
    for layer in st["layers"]:
        t.add_row(layer["name"], str(layer["channels"]), _pct(layer["zero_fraction"]), str(layer["max_abs"]))
    t.add_row(Markup("[bold]all[/bold]"), str(st["channels"]), _pct(st["zero_fraction"]), "")
    return t


def _pct(x: float | None) -> str:
    return pct(x, 1)
