"""`mdeploy profile DIR`: latency, memory and per-op time of each artifact on each device.

    mdeploy profile runs/export                                   # every artifact, here
    mdeploy profile runs/export --device qemu-aarch64:cortex-a53  # instruction counts
    mdeploy profile runs/export --device ssh://pi@raspberrypi --threads 4 --runs 100
    mdeploy profile runs/export --device 'adb://SERIAL?benchmark_model=./benchmark_model'
    mdeploy profile runs/export --estimate raspberry-pi-5,snapdragon-865   # roofline, labelled

Every table says what produced its numbers (``measured on``); emulated runs show
instruction counts, never a latency; estimates are marked as estimates.
"""
from __future__ import annotations

import argparse

from pipeline.ui import Markup, esc


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    from device_tests.catalog import CATALOG       # light: no runtime or torch import at parse time
    p = sub.add_parser("profile", parents=[common], help="latency, memory and per-op time on devices",
                       description="Profile each artifact of an export folder on one or more devices. "
                                   "Devices: local | qemu-aarch64[:CPU] | adb://SERIAL[?benchmark_model=PATH] "
                                   "| ssh://[user@]host[:port][?python=PATH&identity=KEY&known_hosts=FILE].")
    p.add_argument("folder", help="an export folder (with manifest.json)")
    p.add_argument("--device", action="append", default=None, metavar="SPEC",
                   help="where to profile (repeatable; default: local)")
    p.add_argument("--runs", type=int, default=50, help="timed runs after the warm-up (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs after the first (default 5)")
    p.add_argument("--threads", type=int, default=None, help="runtime threads (default: the runtime's)")
    p.add_argument("--artifacts", type=_csv, default=None, metavar="KEYS",
                   help="comma-separated artifact keys or formats, e.g. tflite/int8,onnx "
                        "(default: every artifact but the PyTorch reference)")
    p.add_argument("--no-op-profile", action="store_true", help="skip the per-op breakdown")
    adb = p.add_argument_group("adb:// devices (benchmark_model delegates)")
    adb.add_argument("--use-gpu", action="store_true", help="--use_gpu=true")
    adb.add_argument("--use-nnapi", action="store_true", help="--use_nnapi=true")
    adb.add_argument("--use-xnnpack", choices=["true", "false"], default=None,
                     help="--use_xnnpack=... (default: the binary's own default)")
    p.add_argument("--top", type=int, default=10, help="per-op rows to show (default 10)")
    p.add_argument("--estimate", type=_csv, default=None, metavar="DEVICES|all",
                   help="also show roofline lower-bound estimates for catalogued devices: "
                        f"{', '.join(CATALOG)} (needs the pt reference in the export)")
    p.add_argument("--model", metavar="FILE.py:FACTORY",
                   help="for --estimate: the Python factory of a model only code defines (the export's "
                        "own record of it is never imported)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ui) -> int:
    from pipeline.stages.profile import ProfileOptions, estimates_for_folder, profile_folder
    opts = ProfileOptions(devices=args.device or ["local"], runs=args.runs, warmup=args.warmup,
                          threads=args.threads, artifacts=args.artifacts,
                          op_profile=not args.no_op_profile,
                          adb_options={"use_gpu": args.use_gpu, "use_nnapi": args.use_nnapi,
                                       "use_xnnpack": None if args.use_xnnpack is None
                                       else args.use_xnnpack == "true"})
    with ui.status("profiling"):
        result = profile_folder(args.folder, opts, progress=ui.info)
        if args.estimate:
            keys = None if args.estimate == ["all"] else args.estimate
            result.estimates = estimates_for_folder(args.folder, keys, args.artifacts, model=args.model)
    if args.json:
        ui.emit_json(result.to_dict())
        return 0 if result.profiles or result.estimates else 1
    for spec in dict.fromkeys(p.device for p in result.profiles):
        profiles = [p for p in result.profiles if p.device == spec]
        ui.table(latency_table(profiles) if any(p.latency for p in profiles) else instructions_table(profiles))
        for p in profiles:
            if p.ops_by_type:
                ui.table(ops_table(p, args.top))
            for note in p.notes:
                ui.info(Markup(f"[dim]{esc(p.artifact)} on {esc(p.device)}: {esc(note)}[/dim]"))
    for s in result.skipped:
        ui.warn(f"{s.artifact} on {s.device} not profiled: {s.reason}")
    if result.estimates:
        ui.table(estimates_table(result.estimates))
    return 0 if result.profiles or result.estimates else 1


def _ms(v: float | None) -> str:
    return "" if v is None else f"{v:.3g}" if v < 1 else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def _mb(v: int | None) -> str:
    return "" if v is None else f"{v / 2**20:.1f}"


def latency_table(profiles):
    from rich.table import Table
    first = profiles[0]
    threads = {p.threads for p in profiles}
    table = Table(title=f"latency on {first.device}: {first.measured_on}",
                  caption=f"{first.runs} timed runs after 1 + {first.warmup} warm-up; threads "
                          f"{', '.join(str(t or 'default') for t in threads)}; ms")
    for c in ("artifact", "runtime", "p50", "p90", "p99", "mean", "std", "min", "first", "init",
              "peak mem MB", "size MB"):
        table.add_column(c, justify="left" if c in ("artifact", "runtime") else "right")
    for p in profiles:
        lat = p.latency
        table.add_row(p.artifact, p.runtime, _ms(lat and lat.p50_ms), _ms(lat and lat.p90_ms),
                      _ms(lat and lat.p99_ms), _ms(lat and lat.mean_ms), _ms(lat and lat.std_ms),
                      _ms(lat and lat.min_ms), _ms(p.first_inference_ms), _ms(p.init_ms),
                      _mb(p.peak_memory_bytes), _mb(p.artifact_size_bytes))
    return table


def instructions_table(profiles):
    from rich.table import Table
    first = profiles[0]
    table = Table(title=f"instruction counts on {first.device}: {first.measured_on}",
                  caption="guest instructions from the qemu TCG plugin, 1 thread; deterministic, "
                          "comparable across models and precisions; not a latency")
    for c in ("artifact", "runtime", "per inference", "first inference", "init", "size MB"):
        table.add_column(c, justify="left" if c in ("artifact", "runtime") else "right")
    for p in profiles:
        ins = p.instructions
        table.add_row(p.artifact, p.runtime, f"{ins.mean:,.0f}" if ins and ins.mean else "",
                      f"{ins.first_inference:,}" if ins and ins.first_inference else "",
                      f"{ins.init:,}" if ins and ins.init else "", _mb(p.artifact_size_bytes))
    return table


def ops_table(p, top: int):
    from rich.table import Table
    table = Table(title=f"top {top} ops of {p.artifact} on {p.device}", caption=p.op_profile_note)
    for c in ("by type", "nodes", "ms", "%", " ", "by node", "type", "ms ", "% "):
        table.add_column(c, justify="right" if c.strip() in ("nodes", "ms", "%") else "left")
    for i in range(min(top, max(len(p.ops_by_type), len(p.ops_by_node)))):
        t = p.ops_by_type[i] if i < len(p.ops_by_type) else None
        n = p.ops_by_node[i] if i < len(p.ops_by_node) else None
        table.add_row(t.name if t else "", str(t.calls) if t else "", _ms(t.ms) if t else "",
                      f"{t.percent:.1f}" if t else "", "", n.name if n else "", n.op_type if n else "",
                      _ms(n.ms) if n else "", f"{n.percent:.1f}" if n else "")
    return table


def estimates_table(rows):
    from rich.table import Table
    first = rows[0]
    table = Table(title=f"ESTIMATES, not measurements: {first['label']}",
                  caption=f"{first['macs'] / 1e6:,.1f} MMACs, {first['params']:,} params; bytes = weights + "
                          "input + output once; see device_tests/catalog.py for every figure's source")
    for c in ("device", "unit", "precision", "compute ms", "memory ms", "lower bound ms", "bound"):
        table.add_column(c, justify="right" if "ms" in c else "left")
    for r in rows:
        table.add_row(r["device"], r["component"], r["precision"], _ms(r["compute_ms"]),
                      _ms(r["memory_ms"]), _ms(r["lower_bound_ms"]), r["bound"])
    return table
