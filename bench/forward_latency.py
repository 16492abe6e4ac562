"""Forward latency of every zoo model at batch 1 on this CPU, beside params and MACs.

    python -m bench.forward_latency                 # every model, its default input size
    python -m bench.forward_latency --small         # each model's small input size (quick)
    python -m bench.forward_latency 'mobilenet*' --runs 50 --threads 1

Prints one table; the last columns are ratios to the first model in the table, so
runs on different machines compare by shape, not by absolute milliseconds. Timing is
median of ``--runs`` after ``--warmup`` runs (median resists the outliers of a shared
machine). Latency lives here, never in unit tests.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from models import create_model, list_models, model_entry
from models.complexity import count_complexity


def time_forward(model: torch.nn.Module, x: torch.Tensor, runs: int, warmup: int) -> list[float]:
    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pattern", nargs="?", default=None)
    ap.add_argument("--small", action="store_true", help="use each model's small input size")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    table = Table(title=f"PyTorch eager forward, batch 1, {torch.get_num_threads()} threads, "
                        f"median of {args.runs}")
    for col in ("model", "input", "params", "MMACs", "ms (median)", "ms (min)", "GMAC/s", "latency ratio"):
        table.add_column(col, justify="left" if col == "model" else "right")
    base = None
    for name in list_models(args.pattern):
        entry = model_entry(name)
        size = entry.small_input_size if args.small else entry.input_size
        model = create_model(name).eval()
        c = count_complexity(model, size)
        x = torch.randn(1, 3, size, size)
        times = time_forward(model, x, args.runs, args.warmup)
        med = statistics.median(times)
        base = base or med
        table.add_row(name, str(size), f"{c.params:,}", f"{c.mmacs:,.1f}", f"{med:.2f}",
                      f"{min(times):.2f}", f"{c.macs / med / 1e6:.1f}", f"{med / base:.2f}x")
        console.print(f"[dim]{name}: {med:.2f} ms[/dim]")
    console.print(table)


if __name__ == "__main__":
    main()
