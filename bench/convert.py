"""Conversion time and fp32 parity of the three PyTorch-to-phone routes, per model, side by side.

    python -m bench.convert                              # a few mobile models at their small input size
    python -m bench.convert --all                        # the whole zoo (long: onnx2tf is the slow route)
    python -m bench.convert 'shufflenet*' --routes onnx2tf,litert-torch

Routes, each timed from the PyTorch model to a written fp32 file (the ONNX export both
TFLite routes need is timed apart, once, and counted in the onnx2tf route, which cannot
start without it):

* ``onnx2tf``: ONNX -> onnx2tf -> SavedModel -> TFLiteConverter (``exporters.tflite``);
* ``litert-torch``: PyTorch -> LiteRT directly (``exporters.litert_torch``);
* ``executorch``: ``torch.export`` -> XNNPACK-lowered ``.pte`` (``exporters.executorch``).

Parity is the max abs difference of the file's logits from PyTorch's on 4 inputs, run by
the project's runners (LiteRT, ExecuTorch). Weights are the zoo sweeps' trained-like
recipe (``tests.zoo_checks.trained_like``), so logits depend on the input. A route that
fails is a row with its one-line error, and its time is left out of the totals of every
route (totals compare the models all routes converted). The summary line gives each
route's total against onnx2tf's, measured in the same run.
"""
from __future__ import annotations

import argparse
import fnmatch
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from models import create_model, list_models, model_entry

DEFAULT_MODELS = ("mobilenet_v2", "shufflenet_v2_x1_0", "squeezenet1_1", "mobilenet_v1_050", "mixer")
ROUTES = ("onnx2tf", "litert-torch", "executorch")


def _model(name: str, size: int) -> torch.nn.Module:
    from models.reparam import is_reparameterizable, reparameterize_model
    from tests.zoo_checks import trained_like
    torch.manual_seed(0)
    model = trained_like(create_model(name, num_classes=10, in_chans=3), size)
    return reparameterize_model(model) if is_reparameterizable(model) else model.eval()


def _convert(route: str, model: torch.nn.Module, size: int, work: Path, onnx_path: Path):
    """The written fp32 artifact of ``route`` (relative to ``work``)."""
    from exporters.artifact import Preprocessing
    pre = Preprocessing([size, size], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], "RGB")
    if route in ("onnx2tf", "litert-torch"):
        from exporters.tflite import export_tflite
        (art,) = export_tflite(onnx_path, work, ["fp32"], preprocessing=pre, module=model, converter=route)
        return art
    from exporters.executorch import export_executorch
    (art,) = export_executorch(model, work, ["fp32"], input_shape=(1, 3, size, size))
    return art


def _max_abs(route: str, art, work: Path, x: np.ndarray, ref: np.ndarray) -> float:
    from device_tests.runners.base import runner_for
    with runner_for(art)() as r:
        r.load(art, work)
        out = r.infer({art.inputs[0].name: x})
    return float(np.max(np.abs(next(iter(out.values())) - ref)))


def bench(names: list[str], routes: list[str]) -> dict[str, dict[str, tuple[float | None, float | None, str]]]:
    """name -> route -> (seconds, max abs, error)."""
    from exporters.onnx import export_onnx
    from models.util import one_line
    results: dict[str, dict[str, tuple[float | None, float | None, str]]] = {}
    for name in names:
        size = model_entry(name).small_input_size
        model = _model(name, size)
        x = np.random.default_rng(0).standard_normal((4, 3, size, size)).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        row: dict[str, tuple[float | None, float | None, str]] = {}
        with tempfile.TemporaryDirectory(prefix="mdeploy-bench-convert-") as tmp:
            work = Path(tmp)
            t0 = time.perf_counter()
            export_onnx(model, work / "model.onnx", (1, 3, size, size))
            onnx_s = time.perf_counter() - t0
            for route in routes:
                (work / route).mkdir()
                t0 = time.perf_counter()
                try:
                    art = _convert(route, model, size, work / route, work / "model.onnx")
                except Exception as exc:   # a converter's failure is a result here, not a crash
                    row[route] = (None, None, one_line(exc, 120))
                    continue
                seconds = time.perf_counter() - t0 + (onnx_s if route == "onnx2tf" else 0.0)
                row[route] = (seconds, _max_abs(route, art, work / route, x, ref), "")
        results[name] = row
        print(f"{name}: " + ", ".join(f"{r} {v[0]:.1f} s" if v[0] is not None else f"{r} failed"
                                      for r, v in row.items()), flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pattern", nargs="?", help="fnmatch filter over the zoo")
    ap.add_argument("--all", action="store_true", help="every zoo model")
    ap.add_argument("--routes", default=",".join(ROUTES), help=f"comma list of {', '.join(ROUTES)}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: repeatable on a shared machine)")
    args = ap.parse_args(argv)
    routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    bad = [r for r in routes if r not in ROUTES]
    if bad:
        ap.error(f"--routes: expected some of {', '.join(ROUTES)}, found {', '.join(bad)}")
    torch.set_num_threads(args.threads)
    names = list_models() if args.all or args.pattern else list(DEFAULT_MODELS)
    if args.pattern:
        names = [n for n in names if fnmatch.fnmatch(n, args.pattern)]
    results = bench(names, routes)

    table = Table(title="fp32 conversion: seconds (max abs from PyTorch)")
    table.add_column("model")
    for r in routes:
        table.add_column(r, justify="right")
    for name, row in results.items():
        table.add_row(name, *[f"{row[r][0]:.1f} s ({row[r][1]:.1e})" if row[r][0] is not None
                              else f"failed: {row[r][2]}" for r in routes])
    console = Console()
    console.print(table)
    common = [n for n, row in results.items() if all(row[r][0] is not None for r in routes)]
    totals = {r: sum(results[n][r][0] for n in common) for r in routes}
    failed = {r: sum(1 for row in results.values() if row[r][0] is None) for r in routes}
    parts = [f"{r} {totals[r]:.0f} s" + (f" ({totals[r] / totals['onnx2tf']:.2f}x onnx2tf)"
                                          if "onnx2tf" in totals and totals["onnx2tf"] and r != "onnx2tf" else "")
             for r in routes]
    console.print(f"totals over the {len(common)} models every route converted: " + ", ".join(parts))
    console.print("failed: " + ", ".join(f"{r} {failed[r]}" for r in routes))


if __name__ == "__main__":
    main()
