"""`mdeploy verify DIR`: every artifact of an export folder against its PyTorch reference.

Exit code 0 when every pair passes its tolerance, 1 when any fails (the first divergent
layer is named), 2 on bad input. The work is ``pipeline.stages.verify.verify_folder``.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

from pipeline.ui import Markup, esc

# Short names accepted by --tolerance, beside the Tolerance field names themselves.
_ALIASES = {"atol": "max_abs", "abs": "max_abs", "cosine": "min_cosine", "snr": "min_snr_db",
            "snr_db": "min_snr_db", "top1": "min_top1", "layer_rel": "layer_max_rel",
            "layer_snr": "layer_min_snr_db"}


def parse_tolerance(text: str) -> tuple[str, dict[str, float | None]]:
    """``[PRECISION:]KEY=VALUE[,KEY=VALUE...]`` -> (scope, overrides); scope ``*`` = all."""
    scope, sep, rest = text.partition(":")
    if not sep or "=" in scope:
        scope, rest = "*", text
    out: dict[str, float | None] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, found {item!r}")
        key = _ALIASES.get(key.strip().lower().replace("-", "_"), key.strip().lower().replace("-", "_"))
        try:
            out[key] = None if value.strip().lower() in ("none", "off") else float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or 'none' for {key}, found {value!r}") from None
    return scope.strip().lower(), out


def _runner_option(text: str) -> tuple[str, str, Any]:
    target, eq, value = text.partition("=")
    kind, dot, key = target.partition(".")
    if not (eq and dot and kind and key):
        raise argparse.ArgumentTypeError(f"expected KIND.KEY=VALUE, found {text!r}")
    try:
        parsed: Any = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return kind, key, parsed


def _samples(text: str) -> int | None:
    if text.lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', found {text!r}") from None


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "verify", parents=[common], help="check every artifact's numbers against PyTorch",
        description="Run the same inputs through PyTorch and every artifact of an export folder; "
                    "report max/mean abs error, max rel error, cosine, SNR/PSNR, top-1/top-5 "
                    "agreement per pair, and for a failing pair the first divergent layer. "
                    "Exit 0: all pass, 1: a pair fails, 2: bad input.")
    p.add_argument("folder", help="an export folder (with manifest.json)")
    p.add_argument("--inputs", help="photos | mnist | digits | .npy/.npz (float NCHW inputs or uint8 images) | "
                                    "image folder | image file (default: the held-out split of the checkpoint's "
                                    "data; required when the export records none)")
    p.add_argument("--random-inputs", action="store_true",
                   help="run on random pixels instead of real inputs; the report then says first that it "
                        "is not evidence of parity")
    p.add_argument("--samples", type=_samples, default=100, help="number of inputs, or 'all' (default 100)")
    p.add_argument("--tolerance", type=parse_tolerance, action="append", default=[],
                   metavar="[PRECISION:]KEY=VALUE,...",
                   help="override a tolerance, e.g. 'max_abs=1e-4', 'fp16:snr=35,top1=0.98', "
                        "'int8:top1=none' (keys: max_abs rtol min_cosine min_snr_db min_top1 "
                        "layer_max_rel layer_min_snr_db; aliases atol snr top1 cosine)")
    p.add_argument("--runners", type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()),
                   help="only these runner kinds, e.g. onnxruntime,litert (default: every artifact)")
    p.add_argument("--runner-option", type=_runner_option, action="append", default=[],
                   metavar="KIND.KEY=VALUE",
                   help="runner option, e.g. onnxruntime.graph_optimization_level=disable")
    p.add_argument("--threads", type=int, help="threads for every runner that takes the option")
    p.add_argument("--no-divergence", action="store_true", help="skip the first-divergent-layer search")
    p.add_argument("--per-layer", action="store_true",
                   help="per-layer error curves for every pair, not only failing ones (in --json; "
                        "the lowest-SNR layer of each pair is printed)")
    p.add_argument("--divergence-samples", type=int, default=4,
                   help="inputs used by the per-layer search (the worst-differing ones; default 4)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model", metavar="FILE.py:FACTORY",
                   help="the Python factory of a model only code defines; the export's own record of "
                        "it is never imported (a data file must not run code)")
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace):
    from models.errors import InputError
    from pipeline.stages.verify import VerifyOptions
    tolerances: dict[str, dict[str, float | None]] = {}
    for scope, overrides in args.tolerance:
        tolerances.setdefault(scope, {}).update(overrides)
    runner_options: dict[str, dict[str, Any]] = {}
    if args.threads is not None:
        if args.threads < 1:
            raise InputError("--threads", "a positive number", str(args.threads))
        for kind in ("onnxruntime", "litert", "coreml", "executorch"):
            runner_options.setdefault(kind, {})["threads"] = args.threads
    for kind, key, value in args.runner_option:
        runner_options.setdefault(kind, {})[key] = value
    if args.model:
        runner_options.setdefault("torch", {})["model"] = args.model
    for flag, value in (("--divergence-samples", args.divergence_samples), ("--batch-size", args.batch_size)):
        if value < 1:
            raise InputError(flag, "a positive number", str(value))
    opts = VerifyOptions(inputs=args.inputs, samples=args.samples, tolerances=tolerances,
                         runners=args.runners, runner_options=runner_options,
                         divergence=not args.no_divergence or args.per_layer,
                         per_layer="all" if args.per_layer else "failing",
                         divergence_samples=args.divergence_samples, batch_size=args.batch_size,
                         random_inputs=args.random_inputs)
    # Validate tolerance keys now (a typo is bad input, not a failing pair).
    from device_tests.compare import tolerance_for
    for scope in tolerances:
        tolerance_for("fp32" if scope == "*" else scope, tolerances)
    return opts


def run(args: argparse.Namespace, ui) -> int:
    from pipeline.stages.verify import RANDOM_DISCLAIMER, verify_folder
    opts = options_from_args(args)
    with ui.status("verifying"):
        result = verify_folder(args.folder, opts, progress=ui.info)
    report = result.report
    if args.json:
        d = report.to_dict()
        ui.emit_json({"disclaimer": RANDOM_DISCLAIMER, **d} if report.inputs.get("random") else d)
        return 0 if report.passed else 1
    if report.inputs.get("random"):
        ui.result(Markup(f"[bold red]{esc(RANDOM_DISCLAIMER)}[/bold red]"))      # the report's first line
    for note in result.notes:
        if note != RANDOM_DISCLAIMER:
            ui.warn(note)
    ui.table(pairs_table(report))
    for pair in report.pairs:
        if not pair.passed:
            ui.result(Markup(f"[red]{esc(pair.target)} FAILED[/red]: {esc('; '.join(pair.failures))}"))
            if pair.layers:
                ui.table(layers_table(pair))
            if pair.first_divergent:
                fd = pair.first_divergent
                ui.result(Markup(f"first divergent layer: [bold]{esc(fd['layer'])}[/bold] (PyTorch module) = "
                                 f"tensor [bold]{esc(fd['tensor'])}[/bold] in {esc(pair.target_path)}: max abs "
                                 f"{fd['max_abs']:.3g}, {fd['max_rel']:.3g} of its range"))
            if pair.divergence_note:
                ui.result(f"per-layer search: {pair.divergence_note}")
            if pair.diagnosis:
                ui.result(f"diagnosis: {pair.diagnosis}")
    for pair in report.pairs:
        if pair.passed and pair.layers:
            worst = min(pair.layers, key=lambda x: float("inf") if x.snr_db is None else x.snr_db)
            ui.result(Markup(f"{esc(pair.target)}: lowest-SNR layer [bold]{esc(worst.module)}[/bold] "
                             f"({esc(worst.tensor)}): {_fmt(worst.snr_db, '.1f')} dB, max abs "
                             f"{worst.max_abs:.3g} over {len(pair.layers)} matched layers"))
    n_fail = sum(not p.passed for p in report.pairs)
    ui.result(f"{len(report.pairs) - n_fail}/{len(report.pairs)} pairs pass on "
              f"{report.inputs.get('samples')} inputs from {report.inputs.get('source')}"
              + (" (random: not evidence of parity)" if report.inputs.get("random") else ""))
    return 0 if report.passed else 1


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "inf" if v is None else format(v, spec)


def pairs_table(report):
    """One row per pair; columns with nothing to show (no labels, <= 5 classes) are left out."""
    from rich import box
    from rich.table import Table
    runners = "; ".join(f"{k}: {v}" for k, v in report.runners.items())
    table = Table(title="parity against PyTorch", caption=runners, box=box.SIMPLE_HEAD, pad_edge=False)
    cols: dict[str, Any] = {
        "target": lambda p: p.target,
        "max abs": lambda p: _fmt(p.max_abs, ".2g"),
        "max rel": lambda p: _fmt(p.max_rel, ".2g"),
        "cosine": lambda p: f"{p.cosine:.6f}",
        "SNR dB": lambda p: _fmt(p.snr_db, ".1f"),
        "top-1": lambda p: _fmt(p.top1_agreement, ".3f") if p.top1_agreement is not None else "",
        "top-5": lambda p: _fmt(p.top5_agreement, ".3f") if p.top5_agreement is not None else "",
        "accuracy": lambda p: (f"{p.accuracy_reference:.3f}/{p.accuracy_target:.3f}"
                               if p.accuracy_reference is not None else ""),
        "result": lambda p: Markup("[green]pass[/green]" if p.passed else "[red]FAIL[/red]"),
    }
    cols = {k: f for k, f in cols.items() if any(f(p) for p in report.pairs) or k in ("target", "result")}
    for c in cols:
        table.add_column(c, justify="left" if c in ("target", "result") else "right",
                         no_wrap=c in ("target", "result"))
    for p in report.pairs:
        table.add_row(*(f(p) for f in cols.values()))
    return table


def layers_table(pair, context: int = 3, max_rows: int = 30):
    """The per-layer error curve around the first divergent layer (JSON has all layers)."""
    from rich import box
    from rich.table import Table
    layers = pair.layers or []
    first = next((i for i, x in enumerate(layers) if not x.passed), len(layers) - 1)
    hi = min(len(layers), first + context + 1)
    lo = max(0, hi - max_rows)
    table = Table(title=f"per-layer error, {pair.reference} vs {pair.target} "
                        f"({len(layers)} layers compared)", box=box.SIMPLE_HEAD)
    for c in ("#", "PyTorch module", "tensor", "max abs", "max rel", "SNR dB", ""):
        table.add_column(c, justify="right" if c in ("#", "max abs", "max rel", "SNR dB") else "left",
                         no_wrap=c in ("PyTorch module", ""))
    if lo:
        table.add_row("...", f"{lo} earlier layers", "", "", "", "", "")
    for i, x in enumerate(layers[lo:hi], start=lo):
        mark = Markup("[red]<- first[/red]" if i == first and not x.passed else ("" if x.passed else "[red]over[/red]"))
        table.add_row(str(x.index), x.module, x.tensor, _fmt(x.max_abs, ".2g"), _fmt(x.max_rel, ".2g"),
                      _fmt(x.snr_db, ".1f"), mark)
    if hi < len(layers):
        table.add_row("...", f"{len(layers) - hi} later layers", "", "", "", "", "")
    return table
