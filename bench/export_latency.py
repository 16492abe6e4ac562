"""ONNX export time and ONNX Runtime latency beside PyTorch eager latency, per model.

    python -m bench.export_latency                     # a few mobile models at their own input size
    python -m bench.export_latency --all --small       # every zoo model at its small input size
    python -m bench.export_latency 'shufflenet*' --threads 2 --runs 50

Both runtimes run in the same process, one after the other, on the same input, with the
same thread count (default 1: single-core figures are the most repeatable on a shared
machine and the closest to a phone's big core). Latency is the median of ``--runs``
after ``--warmup``. The ratios are the point: ``ORT/eager`` < 1 means ONNX Runtime is
faster than eager PyTorch on this CPU; ``export/eager`` says how many eager forwards
one export costs. ORT is timed at each graph optimization level given (default
``all``, add ``disable`` to see what ORT's fusions buy).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from bench.forward_latency import time_forward
from exporters.onnx import export_onnx
from models import create_model, list_models, model_entry

DEFAULT_MODELS = ("mobilenet_v2", "shufflenet_v2_x1_0", "squeezenet1_1", "mobilenet_v1_050")


def time_ort(session, x: np.ndarray, runs: int, warmup: int) -> list[float]:
    feed = {session.get_inputs()[0].name: x}
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _session(path: Path, threads: int, level: str):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pattern", nargs="?", help="fnmatch filter over the zoo (implies the whole zoo)")
    ap.add_argument("--all", action="store_true", help="every registered model")
    ap.add_argument("--small", action="store_true", help="each model's small input size")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--levels", default="all", help="ORT graph optimization levels, comma list")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    levels = [lv.strip() for lv in args.levels.split(",") if lv.strip()]
    names = list_models(args.pattern) if (args.all or args.pattern) else list(DEFAULT_MODELS)
    console = Console()
    table = Table(title=f"ONNX export and ONNX Runtime vs PyTorch eager, batch 1, {args.threads} thread(s), "
                        f"median of {args.runs}")
    cols = ["model", "input", "export s", "eager ms"]
    for lv in levels:
        cols += [f"ORT {lv} ms", f"ORT {lv}/eager"]
    cols.append("export/eager")
    for c in cols:
        table.add_column(c, justify="left" if c == "model" else "right")
    with tempfile.TemporaryDirectory(prefix="mdeploy-bench-") as tmp:
        # The exporter's first call pays one-time imports and registry building (seconds):
        # pay it on a trivial module so the first model's export time is its own.
        export_onnx(torch.nn.Conv2d(3, 4, 3), Path(tmp) / "warmup.onnx", (1, 3, 8, 8))
        for name in names:
            entry = model_entry(name)
            size = entry.small_input_size if args.small else entry.input_size
            torch.manual_seed(0)
            model = create_model(name).eval()
            x = torch.randn(1, 3, size, size)
            path = Path(tmp) / f"{name}.onnx"
            t0 = time.perf_counter()
            export_onnx(model, path, (1, 3, size, size))
            export_s = time.perf_counter() - t0
            eager = statistics.median(time_forward(model, x, args.runs, args.warmup))
            row = [name, str(size), f"{export_s:.1f}", f"{eager:.2f}"]
            for lv in levels:
                ort_ms = statistics.median(time_ort(_session(path, args.threads, lv), x.numpy(),
                                                    args.runs, args.warmup))
                row += [f"{ort_ms:.2f}", f"{ort_ms / eager:.2f}x"]
            row.append(f"{export_s * 1e3 / eager:,.0f}x")
            table.add_row(*row)
            console.print(f"[dim]{name}: export {export_s:.1f}s, eager {eager:.2f} ms[/dim]")
            path.unlink()
    console.print(table)


if __name__ == "__main__":
    main()
