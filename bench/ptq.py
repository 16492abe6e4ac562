"""Post-training quantization side by side: float, plain PTQ, + CLE, + bias correction,
per calibration method, on one model.

    python -m bench.ptq --checkpoint runs/default/train/model.safetensors
    python -m bench.ptq                          # trains the default run's model briefly first
    python -m bench.ptq --model repvgg_tiny --reparam --epochs 3 --input-size 32
    python -m bench.ptq --methods minmax --weights per-tensor --eval-samples 500

For each set of float fixes (``quantize/float_fixes.py``: none, CLE, CLE + high-bias
absorption, bias correction, CLE + bias correction, all), the fixed PyTorch model is
exported to ONNX and quantized to QDQ int8 (uint8 activations, symmetric int8 weights)
with each calibration method (MinMax, Entropy, Percentile), twice:

* **per-channel weights**, what ``mdeploy quantize`` ships (ORT CPU, QNN HTP);
* **per-tensor weights**, what older accelerators (NNAPI drivers, Hexagon DSP) take and
  the setting of Nagel et al. 2019 (Data-Free Quantization), where a depthwise
  convolution's channels share one grid and CLE matters most.

Every model runs on ONNX Runtime's CPU EP on the held-out split. Columns: accuracy,
its change against the *original* float model (points), top-1 agreement with it and
the SNR of the logits. The float rows show what each fix does to float accuracy (CLE
replaces ReLU6 by ReLU; HBA and bias correction shift biases by design).

Qualcomm's published reference (MobileNetV2, ImageNet): AIMET data-free 71.72% ->
71.08% (-0.64 points); AI Hub's w8a8 TFLite about -1.8 points.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FIX_SETS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("plain PTQ", ()),
    ("+ CLE", ("cle",)),
    ("+ CLE + HBA", ("cle", "hba")),
    ("+ bias corr.", ("bias",)),
    ("+ CLE + bias corr.", ("cle", "bias")),
    ("+ CLE + HBA + bias corr.", ("cle", "hba", "bias")),
)
WEIGHTS = ("per-channel", "per-tensor")


@dataclass
class Cell:
    accuracy: float
    change: float          # points against the original float model
    agreement: float
    snr_db: float | None


@dataclass
class Row:
    weights: str
    fixes: str
    float_accuracy: float          # of the fixed float model
    float_change: float            # max |logits| change of the fixes on calibration inputs
    cells: dict[str, Cell]


def _model(args: argparse.Namespace, work: Path):
    from models.checkpoint import build_model
    from models.reparam import reparameterize_model
    ckpt = args.checkpoint
    if ckpt is None:
        from pipeline.config import RunConfig
        from pipeline.stages.train import train
        cfg = RunConfig().train.model_copy(update={"epochs": args.epochs, "train_samples": args.train_samples,
                                                   "seed": args.seed})
        if args.model:
            cfg = cfg.model_copy(update={"model": args.model, "model_kwargs": {}})
        if args.input_size:
            cfg = cfg.model_copy(update={"input_size": args.input_size})
        ckpt = train(cfg, work / "train", force=True).checkpoint
    model, meta = build_model(None, ckpt)
    if args.reparam:
        model = reparameterize_model(model)
    return model.eval(), meta


def run(args: argparse.Namespace) -> tuple[list[Row], dict]:
    from exporters.artifact import Preprocessing
    from exporters.onnx import export_onnx
    from models.datasets import load_dataset, to_model_input
    from quantize.calibration import load_calibration
    from quantize.float_fixes import apply_float_fixes
    from quantize.onnx_ptq import GENERIC_INT8, GENERIC_INT8_PER_TENSOR, PtqSession
    from quantize.report import accuracy, snr_db, top1_agreement
    from quantize.sensitivity import run_onnx

    work = Path(tempfile.mkdtemp(prefix="bench-ptq-"))
    model, meta = _model(args, work)
    size = meta["input_size"]
    size = [size, size] if isinstance(size, int) else list(size)
    pre = Preprocessing(size, meta["mean"], meta["std"], meta["channel_order"])
    data = meta.get("data") or "mnist"
    calib = load_calibration(data, pre, args.samples, seed=args.seed)
    test = load_dataset(data, "test").subset(args.eval_samples, seed=args.seed)
    x = to_model_input(test.images, tuple(size), pre.mean, pre.std, pre.channels)
    shape = (1, pre.channels, *size)
    export_onnx(model, work / "float.onnx", shape)
    ref = run_onnx(work / "float.onnx", "input", x)
    float_acc = accuracy(ref, test.labels)
    profiles = {"per-channel": GENERIC_INT8, "per-tensor": GENERIC_INT8_PER_TENSOR}
    rows = []
    exported: dict[tuple, tuple[Path, float, float]] = {}
    for weights in args.weights:
        per_channel = weights == "per-channel"
        for label, fixes in FIX_SETS:
            key = (fixes, per_channel if "bias" in fixes else None)
            if key not in exported:
                path = work / f"fixed_{len(exported)}.onnx"
                if fixes:
                    res = apply_float_fixes(model, fixes, calibration=calib, per_channel=per_channel)
                    export_onnx(res.model, path, shape)
                    change = res.max_abs_change or 0.0
                else:
                    path, change = work / "float.onnx", 0.0
                exported[key] = (path, float(accuracy(run_onnx(path, "input", x), test.labels)), change)
            path, fixed_acc, change = exported[key]
            cells = {}
            with PtqSession(path, calib, qnn=False) as session:
                for method in args.methods:
                    q = work / "q.onnx"
                    session.quantize(profiles[weights], q, method=method)
                    out = run_onnx(q, "input", x)
                    acc = accuracy(out, test.labels)
                    cells[method] = Cell(acc, 100 * (acc - float_acc), top1_agreement(ref, out), snr_db(ref, out))
            rows.append(Row(weights, label, fixed_acc, change, cells))
            if args.verbose:
                print(f"{weights} {label}: " + ", ".join(f"{m} {c.accuracy:.2%}" for m, c in cells.items()),
                      flush=True)
    info = {"model": meta.get("model"), "float_accuracy": float_acc, "eval": len(x), "calibration": len(calib),
            "data": data}
    return rows, info


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="an mdeploy checkpoint (default: train the default run's model)")
    ap.add_argument("--model", help="registry model to train instead of the default run's")
    ap.add_argument("--reparam", action="store_true", help="re-parameterize (RepVGG) before quantizing")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train-samples", type=int, default=None)
    ap.add_argument("--input-size", type=int)
    ap.add_argument("--samples", type=int, default=200, help="calibration inputs")
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--methods", type=lambda s: tuple(s.split(",")), default=("minmax", "entropy", "percentile"))
    ap.add_argument("--weights", type=lambda s: tuple(s.split(",")), default=WEIGHTS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows, info = run(args)
    console = Console(width=250)     # wide tables: rich sizes them to their content
    for weights in args.weights:
        table = Table(title=f"{info['model']}: QDQ int8 on ONNX Runtime CPU, {weights} int8 weights, uint8 "
                            f"activations; float {info['float_accuracy']:.2%} on {info['eval']} held-out "
                            f"{info['data']} images; {info['calibration']} calibration images")
        table.add_column("float fixes", no_wrap=True)
        table.add_column("float acc", justify="right")
        for m in args.methods:
            for col in (f"{m} acc", "change", "agree", "SNR"):
                table.add_column(col, justify="right")
        for r in (r for r in rows if r.weights == weights):
            cells = []
            for m in args.methods:
                c = r.cells[m]
                cells += [f"{c.accuracy:.2%}", f"{c.change:+.2f}", f"{c.agreement:.1%}",
                          "inf" if c.snr_db is None else f"{c.snr_db:.1f}"]
            table.add_row(r.fixes, f"{r.float_accuracy:.2%}", *cells)
        console.print(table)
    console.print(f"change: points of accuracy against the original float model; agree: top-1 agreement "
                  f"with it; SNR: logits, dB. Reference (MobileNetV2, ImageNet): AIMET data-free -0.64 points, "
                  f"AI Hub w8a8 TFLite about -1.8. {time.perf_counter() - t0:.0f} s.")


if __name__ == "__main__":
    main()
