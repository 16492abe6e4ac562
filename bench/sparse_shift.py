"""Sparse shift (Chen et al. 2019): accuracy against sparsity as lambda grows, and what a
deployed shift layer costs next to the depthwise 3x3 conv it replaces.

    python -m bench.sparse_shift                      # both tables (the sweep takes minutes)
    python -m bench.sparse_shift --plot sweep.png     # and the accuracy/sparsity plot
    python -m bench.sparse_shift --cost-only

1. **Lambda sweep**: ``fe_net_tiny`` trained on the bundled MNIST once per lambda (same
   seed, data, schedule; displacements frozen for the last epoch), then its held-out
   accuracy, the fraction of channels whose displacement rounds to (0, 0) and the
   accuracy change against lambda = 0. The suggested lambda is the largest whose
   accuracy is within 1 point of lambda = 0 (``quantize.shift.DEFAULT_SHIFT_L1`` was read
   from this table).
2. **Cost**: a deployed ``SparseShift`` (displacements drawn with a given fraction of
   zeros) against a depthwise 3x3 conv on the same tensor: multiply-accumulates (a shift
   has none: it is Pad/Slice/Concat) and latency in PyTorch and ONNX Runtime, measured
   side by side (the two alternate run by run), as ratios.
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
import torch.nn as nn

from models.sparse_shift import SparseShift, shift_order

LAMBDAS = (0.0, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3)


# -- 1. lambda sweep ---------------------------------------------------------------------
@dataclass
class SweepRow:
    lam: float
    test_acc: float
    zero_fraction: float
    histogram: dict[str, int]
    max_abs: int


def sweep(out_dir: str | Path, lambdas=LAMBDAS, epochs: int = 4, train_samples: int | None = None,
          model: str = "fe_net_tiny", seed: int = 0, threads: int | None = 1) -> list[SweepRow]:
    from pipeline.stages.train import TrainConfig, train
    rows = []
    for lam in lambdas:
        cfg = TrainConfig(model=model, data="mnist", epochs=epochs, train_samples=train_samples,
                          shift_l1=lam, freeze_shifts_after=max(1, epochs - 1), seed=seed,
                          threads=threads)
        result = train(cfg, Path(out_dir) / f"lambda_{lam:g}", force=True)
        s = result.meta["sparse_shift"]
        rows.append(SweepRow(lam, result.test_acc, s["zero_fraction"], s["histogram"],
                             max((layer["max_abs"] for layer in s["layers"]), default=0)))
    return rows


def suggested(rows: list[SweepRow], max_drop: float = 0.01) -> SweepRow:
    base = next(r for r in rows if r.lam == 0)
    ok = [r for r in rows if base.test_acc - r.test_acc <= max_drop]
    return max(ok, key=lambda r: r.lam)


def plot(rows: list[SweepRow], path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    ax.plot([100 * r.zero_fraction for r in rows], [100 * r.test_acc for r in rows], "o-")
    for r in rows:
        ax.annotate(f"λ={r.lam:g}", (100 * r.zero_fraction, 100 * r.test_acc),
                    textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("channels with zero displacement (%)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("fe_net_tiny on MNIST: accuracy vs shift sparsity")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# -- 2. cost against a depthwise conv ----------------------------------------------------------
@dataclass
class CostRow:
    case: str
    macs: int
    torch_ms: float
    ort_ms: float


def sparse_layer(channels: int, zero_fraction: float, max_shift: int = 1, seed: int = 0) -> SparseShift:
    """A deployed layer with ``zero_fraction`` still channels, the rest moved by one of the
    8 non-zero offsets of a 3x3 window (what trained layers mostly hold)."""
    rng = np.random.default_rng(seed)
    offsets = [(dy, dx) for dy in range(-max_shift, max_shift + 1)
               for dx in range(-max_shift, max_shift + 1) if (dy, dx) != (0, 0)]
    still = int(round(channels * zero_fraction))
    disp = [(0, 0)] * still + [offsets[i] for i in rng.integers(0, len(offsets), channels - still)]
    disp = torch.tensor(disp)
    disp = disp[shift_order(disp)]            # grouped, still channels last: as FE blocks fold it
    layer = SparseShift(channels, max_shift=max(1, max_shift), deploy=True)
    layer.set_extra_state(disp)
    return layer


def _alternate(fns: list, runs: int, warmup: int) -> list[float]:
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + runs):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[k].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def cost(channels: int = 144, size: int = 28, zero_fractions=(0.0, 0.5, 0.9), runs: int = 50,
         threads: int = 1) -> list[CostRow]:
    import onnxruntime as ort

    from exporters.onnx import export_onnx
    from models.complexity import count_complexity
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cases: list[tuple[str, nn.Module]] = [("depthwise 3x3 conv", nn.Conv2d(channels, channels, 3, padding=1,
                                                                           groups=channels).eval())]
    cases += [(f"sparse shift, {z:.0%} zero", sparse_layer(channels, z)) for z in zero_fractions]
    x = torch.randn(1, channels, size, size)
    macs = [count_complexity(nn.Sequential(m), (channels, size, size)).macs for _, m in cases]
    with torch.inference_mode():
        t_torch = _alternate([lambda m=m: m(x) for _, m in cases], runs, 5)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    with tempfile.TemporaryDirectory() as tmp:
        sessions = []
        for i, (_, m) in enumerate(cases):
            path = Path(tmp) / f"{i}.onnx"
            export_onnx(_Wrap(m), path, tuple(x.shape))
            sessions.append(ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]))
        feed = {"input": x.numpy()}
        t_ort = _alternate([lambda s=s: s.run(None, feed) for s in sessions], runs, 5)
    return [CostRow(name, mac, tt, to) for (name, _), mac, tt, to in zip(cases, macs, t_torch, t_ort)]


class _Wrap(nn.Module):
    """An all-zero shift is the identity, and an ONNX graph must compute something."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.m(x))


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train-samples", type=int, default=None, help="default: all 4,000 training images")
    ap.add_argument("--lambdas", type=lambda s: tuple(float(v) for v in s.split(",")), default=LAMBDAS)
    ap.add_argument("--plot", help="write the accuracy/sparsity plot to this PNG")
    ap.add_argument("--channels", type=int, default=144)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cost-only", action="store_true")
    ap.add_argument("--sweep-only", action="store_true")
    args = ap.parse_args(argv)
    console = Console()
    if not args.cost_only:
        with tempfile.TemporaryDirectory(prefix="bench-sparse-shift-") as tmp:
            rows = sweep(tmp, args.lambdas, args.epochs, args.train_samples, threads=args.threads)
        base = next((r for r in rows if r.lam == 0), rows[0])
        pick = suggested(rows) if any(r.lam == 0 for r in rows) else None
        table = Table(title=f"fe_net_tiny on MNIST, {args.epochs} epochs (shifts frozen for the last), "
                            "held-out accuracy vs lambda")
        for col in ("lambda", "test acc", "vs lambda=0 (points)", "zero-shift channels", "max |d|",
                    "most common (dy,dx)"):
            table.add_column(col, justify="left" if col.startswith("most") else "right")
        for r in rows:
            top = " ".join(f"{k}:{v}" for k, v in list(r.histogram.items())[:4])
            mark = " <- suggested" if pick is r else ""
            table.add_row(f"{r.lam:g}{mark}", f"{r.test_acc:.2%}", f"{100 * (r.test_acc - base.test_acc):+.1f}",
                          f"{r.zero_fraction:.1%}", str(r.max_abs), top)
        console.print(table)
        if args.plot:
            console.print(f"plot: {plot(rows, args.plot)}")
    if not args.sweep_only:
        rows = cost(args.channels, args.size, runs=args.runs, threads=args.threads)
        dw = rows[0]
        table = Table(title=f"1 x {args.channels} x {args.size} x {args.size}, batch 1, {args.threads} thread(s), "
                            f"median of {args.runs} alternating runs; ratios to the depthwise conv")
        for col in ("layer", "MACs", "MAC ratio", "PyTorch ms", "PyTorch ratio", "ORT ms", "ORT ratio"):
            table.add_column(col, justify="left" if col == "layer" else "right")
        for r in rows:
            table.add_row(r.case, f"{r.macs:,}", f"{r.macs / dw.macs:.2f}", f"{r.torch_ms:.3f}",
                          f"{r.torch_ms / dw.torch_ms:.2f}x", f"{r.ort_ms:.3f}", f"{r.ort_ms / dw.ort_ms:.2f}x")
        console.print(table)


if __name__ == "__main__":
    main()
