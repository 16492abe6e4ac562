"""LiteRT int8 vs fp32 latency on this CPU, for a few small zoo models (batch 1, 1 thread).

    python -m bench.local_latency
    python -m bench.local_latency mobilenet_v2_035 --runs 500 --threads 2

Uses the project's profiler (``device_tests.profile.profile_local``: median of ``--runs``
after a warm-up). The ratio column is fp32 p50 / int8 p50: above 1 means int8 is faster.
Latency on a shared machine is noisy; that is why it lives in a benchmark that prints
what it measured, never in a timed unit test.
"""
from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from bench._zoo_exports import DEFAULT_MODELS, artifact, zoo_export


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=list(DEFAULT_MODELS))
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    from device_tests.profile import ProfileError, profile_local
    console = Console()
    table = Table(title=f"LiteRT on this CPU, {args.threads} thread(s), p50 of {args.runs} runs")
    for c in ("model", "input", "fp32 p50 ms", "int8 p50 ms", "fp32 min", "int8 min",
              "fp32/int8 (p50)", "int8 faster?", "measured on"):
        table.add_column(c, justify="left" if c in ("model", "measured on", "int8 faster?") else "right")
    for name in args.models:
        folder = zoo_export(name)
        try:
            p = {k: profile_local(artifact(folder, f"tflite/{k}"), folder, runs=args.runs, warmup=args.warmup,
                                  threads=args.threads, op_profile=False) for k in ("fp32", "int8")}
        except ProfileError as exc:
            console.print(f"[yellow]{name}: {exc}[/yellow]")
            table.add_row(name, "", "", "", "", "", "", "failed", str(exc)[:60])
            continue
        ratio = p["fp32"].latency.p50_ms / p["int8"].latency.p50_ms
        size = "x".join(map(str, artifact(folder, "tflite/fp32").inputs[0].shape[1:3]))
        table.add_row(name, size, f"{p['fp32'].latency.p50_ms:.4f}",
                      f"{p['int8'].latency.p50_ms:.4f}", f"{p['fp32'].latency.min_ms:.4f}",
                      f"{p['int8'].latency.min_ms:.4f}", f"{ratio:.2f}x", "yes" if ratio > 1 else "no",
                      p["fp32"].measured_on)
    console.print(table)


if __name__ == "__main__":
    main()
