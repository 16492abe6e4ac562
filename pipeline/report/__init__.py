"""The run report: ``report.json`` for machines (the same document as ``mdeploy run
--json``), ``report.md`` for a PR comment, ``report.html`` with the plots inlined, and
each plot as a PNG under ``plots/``.

``record`` holds the typed run record and the ``ReportSection`` protocol, ``sections``
one section per stage, ``plots``, ``markdown`` and ``html`` the three renderings. The
schema of the JSON document is ``run_record.schema.json`` beside this file.
"""
from __future__ import annotations

import json
from pathlib import Path

from exporters.fileio import atomic_write_bytes, atomic_write_text
from pipeline.report.html import render_html
from pipeline.report.markdown import render_markdown
from pipeline.report.plots import (plot_layer_errors, plot_parity, plot_repvgg, plot_sensitivity, plot_sparse_shift,
                                   plot_tradeoff, plot_training)
from pipeline.report.record import QUANTIZED, ReportSection, RunRecord
from pipeline.report.sections import (ExportRecord, ProfileRecord, QuantizeRecord, RepVGGRecord, SparseShiftRecord,
                                      TrainRecord, VerifyRecord, tradeoff_points)

SCHEMA_PATH = Path(__file__).with_name("run_record.schema.json")


def write_report(run_dir: str | Path, run: RunRecord) -> dict[str, Path]:
    """Write report.json, report.md and report.html (plots as PNG files and inline)."""
    run_dir = Path(run_dir)
    plots: dict[str, bytes] = {}
    for section in run.sections:
        plots.update(section.plots(run))
    for name, png in plots.items():
        atomic_write_bytes(run_dir / "plots" / f"{name}.png", png)
    md = render_markdown(run, plots)
    return {
        "json": atomic_write_text(run_dir / "report.json", json.dumps(run.to_dict(), indent=2, default=str) + "\n"),
        "md": atomic_write_text(run_dir / "report.md", md),
        "html": atomic_write_text(run_dir / "report.html", render_html(md, plots)),
    }


__all__ = ["QUANTIZED", "SCHEMA_PATH", "ExportRecord", "ProfileRecord", "QuantizeRecord", "RepVGGRecord",
           "ReportSection", "RunRecord", "SparseShiftRecord", "TrainRecord", "VerifyRecord", "plot_layer_errors",
           "plot_parity", "plot_repvgg", "plot_sensitivity", "plot_sparse_shift", "plot_tradeoff", "plot_training",
           "render_html", "render_markdown", "tradeoff_points", "write_report"]
