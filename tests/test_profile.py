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


# -- the catalogue's roofline estimates ------------------------------------------------

def test_roofline_is_the_max_of_its_cited_terms():
    from device_tests.catalog import CATALOG, ESTIMATE_LABEL, estimate_model, min_bytes
    macs, params, inp, out = 300_000_000, 3_500_000, 3 * 224 * 224, 1000
    rows = estimate_model(macs, params, inp, out, "int8", ["raspberry-pi-5", "snapdragon-8-gen-2"])
    pi = next(r for r in rows if r.device == "raspberry-pi-5")
    spec = CATALOG["raspberry-pi-5"]
    peak = spec.components[0].peak_ops["int8"].value
    assert pi.compute_ms == pytest.approx(2 * macs / peak * 1e3)
    assert pi.memory_ms == pytest.approx(min_bytes(params, inp, out, "int8") / spec.memory_bandwidth.value * 1e3)
    assert pi.lower_bound_ms == max(pi.compute_ms, pi.memory_ms) and pi.label == ESTIMATE_LABEL
    npu = next(r for r in rows if r.device == "snapdragon-8-gen-2" and r.component == "NPU")
    assert npu.compute_ms is None and npu.lower_bound_ms == npu.memory_ms and "not published" in npu.bound


def test_every_catalogue_figure_is_cited_or_marked_not_published():
    from device_tests.catalog import CATALOG, NOT_PUBLISHED
    for spec in CATALOG.values():
        figures = [spec.memory_bandwidth] + [f for c in spec.components for f in c.peak_ops.values()]
        for f in figures:
            assert (f.value is None) == (f.source == NOT_PUBLISHED), (spec.key, f)
            assert f.value is None or (f.value > 0 and len(f.source) > 10)


def test_unknown_catalogue_device_is_input_error():
    from device_tests.catalog import estimate_model
    from models.errors import InputError
    with pytest.raises(InputError, match="pixel-99"):
        estimate_model(1, 1, 1, 1, "fp32", ["pixel-99"])


# -- the CLI -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def export_dir(arts):
    artifacts, folder = arts
    h.save_manifest(folder, artifacts)
    return folder


def test_cli_profile_json(cli, export_dir):
    code, out, err = cli("profile", str(export_dir), "--runs", "5", "--warmup", "1", "--threads", "1",
                         "--artifacts", "onnx,tflite/int8", "--device", "local", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert [p["artifact"] for p in doc["profiles"]] == ["onnx/fp32", "tflite/int8"]
    for p in doc["profiles"]:
        assert p["latency"]["count"] == 5 and p["measured_on"].startswith("local")
    assert doc["profiles"][0]["ops_by_type"] and doc["skipped"] == []


def test_cli_profile_tables_and_skips(cli, export_dir, tmp_path):
    code, out, err = cli("profile", str(export_dir), "--runs", "3", "--warmup", "0", "--threads", "1",
                         "--artifacts", "tflite/fp32", "--device", "local",
                         "--device", f"ssh://nobody@127.0.0.1:1?known_hosts={tmp_path / 'kh'}")
    assert code == 0
    assert "latency on local" in out and "3 timed runs after 1 + 0 warm-up" in out
    assert "not profiled" in err and "ssh://nobody@127.0.0.1:1" in err


@pytest.mark.parametrize("argv, found", [
    (["--device", "phone"], "expected local | qemu-aarch64"),
    (["--artifacts", "coreml/int4"], "expected artifact keys or formats"),
    (["--runs", "0"], "runs >= 1"),
])
def test_cli_profile_bad_input_is_one_line_exit_2(cli, export_dir, argv, found):
    code, out, err = cli("profile", str(export_dir), *argv)
    assert code == 2 and found in err and len(err.strip().splitlines()) == 1
