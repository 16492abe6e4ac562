"""LiteRT latency of fp32 vs fp16 vs int8 TFLite, side by side, on this CPU.

    python -m bench.tflite_latency                       # the default few models
    python -m bench.tflite_latency mobilenet_v2_035 squeezenet1_1 --size 128 --runs 50
    python -m bench.tflite_latency --threads 2 --no-xnnpack

Each model (random weights: latency does not depend on their values) goes PyTorch ->
ONNX -> TFLite in every precision through the real exporters, int8 calibrated on the
bundled digits; then each ``.tflite`` runs in the LiteRT interpreter (XNNPACK on, as
an app gets it, unless ``--no-xnnpack``). Printed: median latency and the ratios
latency/fp32 and size/fp32 per precision. Median of ``--runs`` after ``--warmup``:
the median resists a shared machine's outliers; compare ratios across machines, not
milliseconds. On x86 XNNPACK runs fp16-weight models in fp32 (weights dequantized at
load), so fp16 is expected to match fp32 in latency and halve only the size; int8
gains depend on the CPU's int8 dot-product support.
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

from exporters.artifact import Preprocessing
from exporters.onnx import export_onnx
from exporters.tflite import export_tflite
from models import create_model
from quantize.calibration import load_calibration

DEFAULT_MODELS = ("mobilenet_v2_035", "mobilenet_v1_050", "squeezenet1_1", "shufflenet_v2_x0_5")
PRECISIONS = ("fp32", "fp16", "int8")


def time_tflite(path: Path, threads: int | None, xnnpack: bool, runs: int, warmup: int) -> list[float]:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = Interpreter(model_path=str(path), num_threads=threads, experimental_op_resolver_type=resolver)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    x = np.random.default_rng(0).standard_normal(d["shape"]).astype(d["dtype"])
    it.set_tensor(d["index"], x)
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        it.invoke()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=list(DEFAULT_MODELS))
    ap.add_argument("--size", type=int, default=96, help="input height/width (default 96)")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-xnnpack", dest="xnnpack", action="store_false")
    args = ap.parse_args(argv)
    console = Console()
    if not console.is_terminal:          # piped to a file: don't squeeze the table to 80 columns
        console.width = 132
    pre = Preprocessing([args.size, args.size], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], "RGB")
    calib = load_calibration("digits", pre, samples=64)
    table = Table(title=f"LiteRT {args.size}x{args.size} batch 1, {args.threads} thread(s), "
                        f"XNNPACK {'on' if args.xnnpack else 'off'}, median of {args.runs}")
    for col in ("model", "fp32 ms", "fp16 ms", "int8 ms", "latency fp16/fp32", "latency int8/fp32",
                "fp32 KB", "size fp16/fp32", "size int8/fp32"):
        table.add_column(col, justify="left" if col == "model" else "right")
    with tempfile.TemporaryDirectory(prefix="mdeploy-bench-") as tmp:
        for name in args.models:
            folder = Path(tmp) / name
            torch.manual_seed(0)
            model = create_model(name, num_classes=10, in_chans=3).eval()
            console.print(f"[dim]{name}: exporting ...[/dim]")
            export_onnx(model, folder / "model.onnx", (1, 3, args.size, args.size))
            arts = {a.precision: a for a in export_tflite(folder / "model.onnx", folder, PRECISIONS,
                                                          preprocessing=pre, calibration=calib)}
            ms = {p: statistics.median(time_tflite(a.resolve(folder), args.threads, args.xnnpack,
                                                   args.runs, args.warmup)) for p, a in arts.items()}
            size = {p: a.size_bytes for p, a in arts.items()}
            console.print(f"[dim]{name}: " + ", ".join(f"{p} {v:.2f} ms" for p, v in ms.items()) + "[/dim]")
            table.add_row(name, f"{ms['fp32']:.2f}", f"{ms['fp16']:.2f}", f"{ms['int8']:.2f}",
                          f"{ms['fp16'] / ms['fp32']:.2f}x", f"{ms['int8'] / ms['fp32']:.2f}x",
                          f"{size['fp32'] / 1024:,.0f}", f"{size['fp16'] / size['fp32']:.2f}x",
                          f"{size['int8'] / size['fp32']:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
