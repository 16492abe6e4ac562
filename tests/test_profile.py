"""Local profiles for ONNX Runtime and LiteRT artifacts: every field filled (or said why not),
JSON round trip, and ONNX Runtime's per-op aggregation on its real profiling output.
No timing is asserted beyond sanity (order of percentiles); speed comparisons live in bench/."""
from __future__ import annotations

import json
import statistics

import numpy as np
import pytest

from device_tests.profile import LatencyStats, PeakMemory, Profile, profile_local
from tests import device_helpers as h


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prof")
    return [h.tiny_onnx(folder), *h.tiny_tflite(folder)], folder


def _check_common(p: Profile, art, runs: int, warmup: int) -> None:
    assert p.artifact == art.key and p.device == "local" and p.measured_on.startswith("local ")
    assert (p.runs, p.warmup, p.threads) == (runs, warmup, 1)
    lat = p.latency
    assert lat.count == runs
    assert 0 < lat.min_ms <= lat.p50_ms <= lat.p90_ms <= lat.p99_ms <= lat.max_ms
    assert lat.min_ms <= lat.mean_ms <= lat.max_ms and lat.std_ms >= 0
    assert p.first_inference_ms > 0 and p.init_ms > 0
    assert p.peak_memory_bytes is not None and p.peak_memory_bytes >= 0 and "RSS" in p.memory_note
    assert p.artifact_size_bytes == art.size_bytes > 0
    assert p.device_info["machine"] and p.runtime
    again = Profile.from_dict(json.loads(p.to_json()))
    assert again == p


def test_onnxruntime_profile_with_per_op(arts):
    (onnx_art, *_), folder = arts
    p = profile_local(onnx_art, folder, runs=20, warmup=3, threads=1)
    _check_common(p, onnx_art, 20, 3)
    assert p.runtime.startswith("onnxruntime ")
    types = {o.op_type for o in p.ops_by_type}
    assert "Conv" in types and len(p.ops_by_node) >= len(p.ops_by_type)
    assert sum(o.percent for o in p.ops_by_node) == pytest.approx(100.0)
    assert sum(o.ms for o in p.ops_by_type) == pytest.approx(sum(o.ms for o in p.ops_by_node))
    assert p.ops_by_type == sorted(p.ops_by_type, key=lambda o: -o.ms)
    assert "median kernel time" in p.op_profile_note


@pytest.mark.parametrize("index", [1, 2], ids=["fp32", "int8"])
def test_litert_profile(arts, index):
    art, folder = arts[0][index], arts[1]
    p = profile_local(art, folder, runs=20, warmup=3, threads=1)
    _check_common(p, art, 20, 3)
    assert "LiteRT" in p.runtime
    assert p.ops_by_type == [] and "not available from the LiteRT Python interpreter" in p.op_profile_note


def test_latency_stats_match_the_statistics_module():
    times = [float(x) for x in np.random.default_rng(0).gamma(2.0, 3.0, size=101)]
    s = LatencyStats.from_times(times)
    q = statistics.quantiles(times, n=100, method="inclusive")     # linear, like numpy's default
    assert s.p50_ms == pytest.approx(statistics.median(times))
    assert s.p90_ms == pytest.approx(q[89]) and s.p99_ms == pytest.approx(q[98])
    assert s.std_ms == pytest.approx(statistics.pstdev(times)) and s.mean_ms == pytest.approx(statistics.fmean(times))


def test_peak_memory_sees_an_allocation():
    with PeakMemory() as mem:
        block = np.ones(64 * 1024 * 1024 // 8)          # 64 MiB, touched
        del block
    assert mem.delta >= 60 * 1024 * 1024


def test_ort_profile_aggregation_on_real_events(arts):
    """parse_ort_profile on ONNX Runtime's own JSON: per-run medians, warm-up dropped."""
    from pathlib import Path

    from device_tests.profile import _ort_feed, _ort_session, parse_ort_profile
    (onnx_art, *_), folder = arts
    s = _ort_session(str(folder / onnx_art.path), 1, profile_prefix=str(folder / "ortprof"))
    feed = _ort_feed(s)
    for _ in range(4):
        s.run(None, feed)
    events = json.loads(Path(s.end_profiling()).read_text())
    by_type, by_node, n = parse_ort_profile(events, skip_runs=1)
    assert n == 3
    kernel_nodes = {e["name"][:-len("_kernel_time")] for e in events
                    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")}
    assert {o.name for o in by_node} == kernel_nodes
    assert sum(o.calls for o in by_type) == len(by_node)
    assert parse_ort_profile(events, skip_runs=4) == ([], [], 0)


def test_coreml_and_unknown_formats_say_why(arts):
    from device_tests.profile import NotProfilable, measure
    with pytest.raises(NotProfilable, match="macOS"):
        measure("mlpackage", "x.mlpackage", runs=1, warmup=0, threads=None)
    with pytest.raises(NotProfilable):
        measure("pt", "x.safetensors", runs=1, warmup=0, threads=None)
