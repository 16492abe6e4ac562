"""RepVGG re-parameterization: what the deploy form buys, and what QARepVGG buys under int8.

    python -m bench.reparam                       # both tables, defaults below
    python -m bench.reparam --latency-only --model repvgg_a0 --size 224 --runs 20
    python -m bench.reparam --ptq-only --epochs 3 --train-samples 2000

1. **Latency, training form vs deploy form** (same weights, eval mode): PyTorch eager and
   ONNX Runtime (CPU EP), batch 1, measured side by side: the two forms alternate run by
   run, so a shared machine's load hits both alike; medians and their ratio are printed.
2. **int8 PTQ, RepVGG vs QARepVGG** (Chu et al. 2022): ``repvgg_tiny`` and
   ``qarepvgg_tiny`` trained the same way on the bundled MNIST, re-parameterized,
   exported to ONNX and converted to full-integer TFLite (``exporters.tflite``, calibrated
   on training images), then fp32 and int8 accuracy on held-out images, the int8 drop,
   top-1 agreement with fp32 and the SQNR of the int8 logits against the fp32 ones.
   ImageNet reference (the paper's Table 1): RepVGG-A0 72.4% fp32 -> 52.2% int8 PTQ;
   QARepVGG-A0 72.2% -> 70.4%.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models import create_model
from models.reparam import reparameterize_model


# -- 1. latency --------------------------------------------------------------------------
@dataclass
class LatencyRow:
    runtime: str
    train_ms: float
    deploy_ms: float

    @property
    def ratio(self) -> float:
        return self.deploy_ms / self.train_ms


def _alternate(fns: list, runs: int, warmup: int) -> list[list[float]]:
    """Run each fn in turn, ``warmup + runs`` rounds; returns per-fn times (ms) after warmup."""
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + runs):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def latency(model_name: str = "repvgg_a0", size: int = 224, runs: int = 20, warmup: int = 3,
            threads: int = 1) -> list[LatencyRow]:
    import onnxruntime as ort

    from exporters.onnx import export_onnx
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    train_form = create_model(model_name).eval()
    deploy_form = reparameterize_model(train_form)
    x = torch.randn(1, 3, size, size)
    rows = []
    with torch.inference_mode():
        t_train, t_deploy = _alternate([lambda: train_form(x), lambda: deploy_form(x)], runs, warmup)
    rows.append(LatencyRow("PyTorch eager", statistics.median(t_train), statistics.median(t_deploy)))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        sessions = []
        for tag, m in (("train", train_form), ("deploy", deploy_form)):
            path = Path(tmp) / f"{tag}.onnx"
            export_onnx(m, path, (1, 3, size, size))
            sessions.append(ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]))
        feed = {"input": x.numpy()}
        t_train, t_deploy = _alternate([lambda: sessions[0].run(None, feed),
                                        lambda: sessions[1].run(None, feed)], runs, warmup)
    rows.append(LatencyRow("ONNX Runtime CPU", statistics.median(t_train), statistics.median(t_deploy)))
    return rows


# -- 2. int8 PTQ --------------------------------------------------------------------------
@dataclass
class PtqRow:
    model: str
    fp32_acc: float
    int8_acc: float
    agreement: float            # int8 top-1 == fp32 top-1
    sqnr_db: float              # 10 log10(|fp32|^2 / |int8 - fp32|^2) over the logits
    train_test_acc: float       # the trainer's own held-out figure (PyTorch, training form)
    checkpoint: Path            # the trained training-form weights

    @property
    def drop(self) -> float:
        return self.fp32_acc - self.int8_acc


def ptq_comparison(out_dir: str | Path, models: tuple[str, ...] = ("repvgg_tiny", "qarepvgg_tiny"),
                   epochs: int = 2, train_samples: int = 1000, eval_samples: int = 500,
                   calibration_samples: int = 100, input_size: int = 32, seed: int = 0,
                   threads: int | None = 1) -> list[PtqRow]:
    """Train each model identically, deploy it, and measure fp32 vs full-integer TFLite."""
    from device_tests.runners.litert import LiteRTRunner
    from exporters.onnx import export_onnx
    from exporters.tflite import export_tflite
    from models.checkpoint import build_model
    from models.datasets import load_dataset, to_model_input
    from exporters.artifact import Preprocessing
    from pipeline.stages.train import TrainConfig, train
    from quantize.calibration import load_calibration

    out_dir = Path(out_dir)
    test = load_dataset("mnist", "test")
    pick = np.random.default_rng(seed).permutation(len(test))[:eval_samples]
    rows = []
    for name in models:
        folder = out_dir / name
        result = train(TrainConfig(model=name, data="mnist", epochs=epochs, train_samples=train_samples,
                                   input_size=input_size, seed=seed, threads=threads), folder, force=True)
        model, meta = build_model(None, result.checkpoint)
        deploy = reparameterize_model(model)
        pre = Preprocessing([input_size, input_size], meta["mean"], meta["std"], meta["channel_order"])
        x = to_model_input(test.images[pick], input_size, tuple(pre.mean), tuple(pre.std))
        y = test.labels[pick]
        calib = load_calibration("mnist", pre, samples=calibration_samples, seed=seed)
        export_onnx(deploy, folder / "model.onnx", (1, pre.channels, input_size, input_size))
        arts = {a.precision: a for a in export_tflite(folder / "model.onnx", folder, ["fp32", "int8"],
                                                       preprocessing=pre, calibration=calib)}
        logits = {}
        for prec, art in arts.items():
            with LiteRTRunner() as runner:
                runner.load(art, folder)
                logits[prec] = np.concatenate([runner.infer({"input": x[i:i + 1]})["logits"]
                                               for i in range(len(x))])
        f, q = logits["fp32"], logits["int8"]
        sqnr = 10 * np.log10(float((f ** 2).sum()) / max(float(((q - f) ** 2).sum()), 1e-30))
        rows.append(PtqRow(name, float((f.argmax(1) == y).mean()), float((q.argmax(1) == y).mean()),
                           float((q.argmax(1) == f.argmax(1)).mean()), sqnr, result.test_acc,
                           result.checkpoint))
    return rows


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="repvgg_a0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-samples", type=int, default=2000)
    ap.add_argument("--eval-samples", type=int, default=1000)
    ap.add_argument("--latency-only", action="store_true")
    ap.add_argument("--ptq-only", action="store_true")
    args = ap.parse_args(argv)
    console = Console()
    if not args.ptq_only:
        table = Table(title=f"{args.model} at {args.size}x{args.size}, batch 1, {args.threads} thread(s), "
                            f"median of {args.runs} alternating runs")
        for col in ("runtime", "training form ms", "deploy form ms", "deploy / training"):
            table.add_column(col, justify="left" if col == "runtime" else "right")
        for r in latency(args.model, args.size, args.runs, threads=args.threads):
            table.add_row(r.runtime, f"{r.train_ms:.2f}", f"{r.deploy_ms:.2f}", f"{r.ratio:.2f}x")
        console.print(table)
    if not args.latency_only:
        with tempfile.TemporaryDirectory(prefix="bench-reparam-") as tmp:
            rows = ptq_comparison(tmp, epochs=args.epochs, train_samples=args.train_samples,
                                  eval_samples=args.eval_samples, threads=args.threads)
        table = Table(title=f"int8 PTQ (TFLite full integer) after {args.epochs} epochs on "
                            f"{args.train_samples} MNIST images; {args.eval_samples} held-out images")
        for col in ("model", "fp32 acc", "int8 acc", "drop (points)", "top-1 agreement", "logit SQNR dB"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for r in rows:
            table.add_row(r.model, f"{r.fp32_acc:.2%}", f"{r.int8_acc:.2%}", f"{100 * r.drop:+.2f}",
                          f"{r.agreement:.2%}", f"{r.sqnr_db:.1f}")
        console.print(table)


if __name__ == "__main__":
    main()
