"""Parse the output of TFLite/LiteRT's ``benchmark_model`` into numbers.

Formats seen in real recordings (``tests/data/benchmark_model/`` cites each):

* summary lines, with or without a log prefix (``INFO: ``, logcat's ``I tflite  : ``):
  ``count=50 first=.. curr=.. min=.. max=.. avg=.. std=..`` (newer builds add
  ``p5= median= p95=``; numbers may be in scientific notation, ``avg=2.95034e+06``);
  the first such line is the warm-up, the last the regular runs;
* ``Inference timings in us: Init: .., First inference: .., Warmup (avg): .., Inference (avg): ..``;
* memory: ``Memory footprint delta from the start of the tool (MB): init=.. overall=..``
  (TF 2.4: ``Peak memory footprint (MB): init=.. overall=..``) and
  ``Overall peak memory footprint (MB) via periodic monitoring: ..``;
* with ``--enable_op_profiling=true``: "Run Order", "Top by Computation Time" and
  "Summary by node type" tables, tab-separated with a ``[start]`` column (TF 2.x) or
  space-aligned without it (recent LiteRT), where XNNPACK op names contain spaces
  (``Convolution (NHWC, QC8) GEMM``). Columns are read from each table's own header.

``[avg ms]`` in the Run Order table is per call; ``[times called]`` is per inference, so
a node's time per inference is their product.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from device_tests.profile import LatencyStats, OpTime

_PREFIX = re.compile(r"^(?:(?:INFO|WARNING|ERROR|VERBOSE): |[VDIWEF] tflite\s*: )")
_NUM = r"([-+0-9.eE]+)"
_STATS = re.compile(r"\b(count|first|curr|min|max|avg|std|p5|median|p95)=" + _NUM)
_TIMINGS = re.compile(r"Inference timings in us: Init: " + _NUM + r", First inference: " + _NUM
                      + r", Warmup \(avg\): " + _NUM + r", Inference \(avg\): " + _NUM)
_MEM = re.compile(r"(?:Memory footprint delta from the start of the tool|Peak memory footprint) "
                  r"\(MB\): init=" + _NUM + r" overall=" + _NUM)
_PEAK = re.compile(r"Overall peak memory footprint \(MB\) via periodic monitoring: " + _NUM)
_THREADS = re.compile(r"^(?:#threads used for CPU inference|Num threads): \[(\d+)\]")
_DELEGATE = re.compile(r"Replacing (\d+) out of (\d+) node\(s\) with delegate \(([^)]+)\)")
_SIZE = re.compile(r"The input model file size \(MB\): " + _NUM)
_SPLIT = re.compile(r"\s*\t\s*|\s{2,}")


@dataclass
class BenchmarkOutput:
    runs: dict[str, float] | None = None          # the regular runs' count/min/max/avg/std/...
    warmup: dict[str, float] | None = None
    init_us: float | None = None
    first_inference_us: float | None = None
    warmup_avg_us: float | None = None
    inference_avg_us: float | None = None
    init_mem_mb: float | None = None
    overall_mem_mb: float | None = None
    peak_mem_mb: float | None = None
    model_size_mb: float | None = None
    threads: int | None = None
    delegation: list[str] = field(default_factory=list)     # "58/58 nodes -> TfLiteXNNPackDelegate"
    ops_by_type: list[OpTime] = field(default_factory=list)
    ops_by_node: list[OpTime] = field(default_factory=list)
    init_ops: list[OpTime] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    failed: bool = False

    def latency(self) -> LatencyStats | None:
        r = self.runs
        if not r or "avg" not in r:
            return None
        ms = {k: v / 1e3 for k, v in r.items() if k != "count"}
        return LatencyStats(count=int(r.get("count", 0)), min_ms=ms.get("min", ms["avg"]),
                            p50_ms=ms.get("median"), p90_ms=None, p99_ms=None, mean_ms=ms["avg"],
                            std_ms=ms.get("std"), max_ms=ms.get("max"))

    def as_raw(self) -> dict[str, Any]:
        """The fields ``device_tests.profile.build_profile`` takes (times are not individual)."""
        mem_mb = self.peak_mem_mb if self.peak_mem_mb is not None else self.overall_mem_mb
        note = ("peak RSS by periodic monitoring (benchmark_model)" if self.peak_mem_mb is not None else
                "max RSS growth since the tool started (benchmark_model; approximate, includes the tool)"
                if self.overall_mem_mb is not None else "not reported")
        return {"init_ms": None if self.init_us is None else self.init_us / 1e3,
                "first_inference_ms": None if self.first_inference_us is None else self.first_inference_us / 1e3,
                "peak_memory_bytes": None if mem_mb is None else int(mem_mb * 1024 * 1024),
                "memory_note": note, "ops_by_type": self.ops_by_type, "ops_by_node": self.ops_by_node}


def _strip(line: str) -> str:
    return _PREFIX.sub("", line.rstrip("\r\n"))


def _float(s: str) -> float:
    return float(s.rstrip("%"))


def parse_benchmark_output(text: str) -> BenchmarkOutput:
    out = BenchmarkOutput()
    stats_lines: list[dict[str, float]] = []
    section = None          # "init" | "run"
    table = None            # "order" | "top" | "summary"
    cols: list[str] = []
    for raw in text.splitlines():
        line = _strip(raw)
        s = line.strip()
        if "Profiling Info for Benchmark Initialization" in s:
            section, table = "init", None
            continue
        if "Operator-wise Profiling Info for Regular Benchmark Runs" in s:
            section, table = "run", None
            continue
        if s.startswith("=====") and section:
            table = ("order" if "Run Order" in s else "top" if "Top by" in s else
                     "summary" if "Summary by node type" in s else None)
            cols = []
            continue
        if table and "[" in s and ("[node type]" in s or "[Node type]" in s):
            cols = [c.strip().lower() for c in re.findall(r"\[([^\]]+)\]", s)]
            continue
        if table and cols:
            if not s or s.startswith(("Timings (microseconds)", "Number of nodes")):
                table, cols = None, []
            elif not s.startswith("["):        # a row (an excerpt marker is not)
                _table_row(out, section, table, cols, s)
            if not s.startswith("Timings"):
                continue
        if s.startswith("Timings (microseconds)") or s.startswith("Memory (bytes)"):
            continue                              # the op profiler's own totals
        if s.startswith("count=") and "first=" in s:
            stats_lines.append({k: float(v) for k, v in _STATS.findall(s)})
        elif m := _TIMINGS.search(s):
            out.init_us, out.first_inference_us, out.warmup_avg_us, out.inference_avg_us = map(float, m.groups())
        elif m := _MEM.search(s):
            out.init_mem_mb, out.overall_mem_mb = map(float, m.groups())
        elif m := _PEAK.search(s):
            out.peak_mem_mb = float(m.group(1))
        elif m := _THREADS.match(s):
            out.threads = int(m.group(1))
        elif m := _DELEGATE.search(s):
            out.delegation.append(f"{m.group(1)}/{m.group(2)} nodes -> {m.group(3)}")
        elif m := _SIZE.search(s):
            out.model_size_mb = float(m.group(1))
        elif raw.startswith(("ERROR", "E tflite")) or s.startswith(("Failed to", "Benchmarking failed")):
            out.errors.append(s)
            if "Benchmarking failed" in s:
                out.failed = True
    if stats_lines:
        out.runs = stats_lines[-1]
        out.warmup = stats_lines[0] if len(stats_lines) > 1 else None
    if not out.ops_by_type and out.ops_by_node:     # no summary table: aggregate the nodes
        agg: dict[str, list[float]] = {}
        for o in out.ops_by_node:
            a = agg.setdefault(o.op_type, [0.0, 0.0, 0])
            a[0] += o.ms
            a[1] += o.percent
            a[2] += 1
        out.ops_by_type = sorted((OpTime(t, t, ms, pct, int(n)) for t, (ms, pct, n) in agg.items()),
                                 key=lambda o: -o.ms)
    out.ops_by_node.sort(key=lambda o: -o.ms)
    return out


def _table_row(out: BenchmarkOutput, section: str | None, table: str, cols: list[str], s: str) -> None:
    fields = _SPLIT.split(s)
    if len(fields) < len(cols):
        return
    if len(fields) > len(cols):                     # a name with two spaces inside
        fields = fields[:len(cols) - 1] + ["  ".join(fields[len(cols) - 1:])]
    row = dict(zip(cols, fields))
    try:
        if table == "summary" and section == "run":
            out.ops_by_type.append(OpTime(row["node type"], row["node type"], _float(row["avg ms"]),
                                          _float(row["avg %"]), int(_float(row["count"]))))
        elif table == "order":
            calls = int(_float(row.get("times called", "1")))
            op = OpTime(row.get("name", row["node type"]), row["node type"],
                        _float(row["avg ms"]) * calls, _float(row["%"]), calls)
            (out.ops_by_node if section == "run" else out.init_ops).append(op)
    except (KeyError, ValueError):
        pass                                        # a line that only looks like a row
