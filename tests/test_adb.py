"""Android over adb: the benchmark_model parser on real recorded outputs, and the whole
command flow against a stand-in ``adb`` on PATH that logs the exact argument lists it gets
and replays a recorded benchmark_model output. A real device run happens only where one
is attached (and MDEPLOY_BENCHMARK_MODEL names the binary); here it skips, saying why.
"""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from device_tests.devices.benchmark_model import parse_benchmark_output
from tests import device_helpers as h

DATA = Path(__file__).parent / "data" / "benchmark_model"


def recorded(name: str) -> str:
    """The tool output of a data file, without its citation header (up to the first blank line)."""
    return (DATA / name).read_text().split("\n\n", 1)[1]


# -- the parser, on real outputs -------------------------------------------------------

def test_tf28_tab_tables_and_scientific_notation():
    o = parse_benchmark_output(recorded("qemu_riscv64_tf28_mobilenet_v1_op_profiling.txt"))
    # figures as printed in the recording (us), scientific notation included
    assert o.runs == {"count": 50, "first": 2990275, "curr": 2913402, "min": 2727568,
                      "max": 3189954, "avg": 2.95034e+06, "std": 109798}
    assert (o.init_us, o.first_inference_us, o.inference_avg_us) == (17187, 3512391, 2.95034e+06)
    assert (o.init_mem_mb, o.overall_mem_mb, o.threads) == (4.21094, 46.0859, 4)
    lat = o.latency()
    assert lat.count == 50 and lat.mean_ms == pytest.approx(2950.34) and lat.min_ms == pytest.approx(2727.568)
    assert [t.name for t in o.ops_by_type] == ["CONV_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D",
                                               "SOFTMAX", "SQUEEZE"]
    conv = o.ops_by_type[0]
    assert (conv.ms, conv.percent, conv.calls) == (2651.853, 89.897, 15)
    assert len(o.ops_by_node) == 31                     # the Run Order table, not "Top by"
    top = o.ops_by_node[0]
    assert top.name == "[MobilenetV1/MobilenetV1/Conv2d_5_pointwise/Relu6]:10" and top.ms == 277.374
    assert [x.name for x in o.init_ops] == ["AllocateTensors/0"]
    # the node rows add up to the type summary (rounding of the printed figures only)
    assert sum(n.ms for n in o.ops_by_node if n.op_type == "CONV_2D") == pytest.approx(conv.ms, abs=0.01)


def test_tf24_android_peak_memory_line_and_nnapi_profile():
    o = parse_benchmark_output(recorded("mi11_tf24_yolov5s_fp32_cpu.txt"))
    assert o.runs["avg"] == 249684 and o.runs["std"] == 1442 and o.warmup is None
    assert (o.init_us, o.first_inference_us, o.warmup_avg_us) == (16242, 360262, 304586)
    assert o.overall_mem_mb == 138.809 and o.init_mem_mb == 4.92969
    assert o.as_raw()["peak_memory_bytes"] == int(138.809 * 1024 * 1024)
    i8 = parse_benchmark_output(recorded("mi11_tf24_yolov5s_int8_cpu.txt"))
    assert i8.inference_avg_us == 95788.3 and i8.latency().mean_ms == pytest.approx(95.7883)

    p = parse_benchmark_output(recorded("mi11_tf24_yolov5s_nnapi_op_profiling.txt"))
    assert p.runs is None and p.latency() is None       # the page shows the op tables only
    assert [(t.name, t.ms, t.calls) for t in p.ops_by_type] == [
        ("TfLiteNnapiDelegate", 149.483, 3), ("STRIDED_SLICE", 8.347, 6), ("RESIZE_NEAREST_NEIGHBOR", 0.879, 2)]
    assert p.ops_by_node[0].name.startswith("[model/tf.nn.silu_16/mul, model/tf.nn.silu_26/mul")
    # init table: AllocateTensors ran twice at 158.023 ms a call
    alloc = next(x for x in p.init_ops if x.op_type == "AllocateTensors")
    assert alloc.calls == 2 and alloc.ms == pytest.approx(316.046)


def test_recent_litert_info_prefix_and_xnnpack_names_with_spaces():
    o = parse_benchmark_output(recorded("x86_litert_xnnpack_efficientdet_int8_op_profiling.txt"))
    assert o.warmup["count"] == 32 and o.runs["count"] == 64 and o.runs["avg"] == 15517.6
    assert o.init_us == 32163 and o.overall_mem_mb == 34.8281
    assert o.ops_by_type[0].name == "Convolution (NHWC, QC8) GEMM"
    assert (o.ops_by_type[0].ms, o.ops_by_type[0].calls) == (5.236, 62)
    assert len(o.ops_by_type) == 11 and len(o.ops_by_node) == 12     # the excerpt's 12 rows
    dw = next(n for n in o.ops_by_node if n.name == "Delegate/Convolution (NHWC, QC8) DWConv:1")
    assert dw.calls == 13 and dw.ms == pytest.approx(13 * 0.051)     # avg ms is per call


def test_failure_is_reported_not_parsed_as_numbers():
    o = parse_benchmark_output(recorded("mi11_tf24_yolov5s_int8_nnapi_failed.txt"))
    assert o.failed and o.runs is None
    assert any("ANEURALNETWORKS_OP_FAILED" in e for e in o.errors)


# -- the command flow, with a stand-in adb ----------------------------------------------

GETPROP = """[ro.build.version.release]: [14]
[ro.build.version.sdk]: [34]
[ro.product.cpu.abi]: [arm64-v8a]
[ro.product.manufacturer]: [StandIn]
[ro.product.model]: [Stand-in phone]
[ro.soc.manufacturer]: [QTI]
[ro.soc.model]: [SM8550]
"""     # the getprop format; values are the stand-in's own, not a real phone's

FAKE_ADB = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_ADB_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:2] != ["-s", "SERIAL1"]:
    sys.stderr.write("error: device 'x' not found\\n"); sys.exit(1)
rest = args[2:]
on_device = os.environ.get("FAKE_ADB_ON_DEVICE", "")
if rest == ["get-state"]:
    print("device")
elif rest[0] == "push":
    print("1 file pushed, 0 skipped.")
elif rest[0] == "shell":
    cmd = rest[1]
    if cmd == "getprop":
        sys.stdout.write(os.environ["FAKE_ADB_GETPROP"])
    elif cmd.startswith("ls "):
        sys.exit(0 if cmd[3:] == on_device else 1)
    elif " --graph=" in cmd:
        sys.stdout.write(open(os.environ["FAKE_ADB_REPLAY"]).read())
    elif not cmd.startswith(("mkdir ", "chmod ", "rm ")):
        sys.stderr.write("unexpected: " + cmd + "\\n"); sys.exit(2)
"""


@pytest.fixture
def fake_adb(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    adb = bin_dir / "adb"
    adb.write_text(FAKE_ADB.format(python=sys.executable))
    adb.chmod(adb.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "adb_log.jsonl"
    replay = tmp_path / "replay.txt"
    replay.write_text(recorded("x86_litert_xnnpack_efficientdet_int8_op_profiling.txt"))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_ADB_LOG", str(log))
    monkeypatch.setenv("FAKE_ADB_REPLAY", str(replay))
    monkeypatch.setenv("FAKE_ADB_GETPROP", GETPROP)
    return lambda: [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def tflite_arts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tfl")
    return h.tiny_tflite(folder), folder


def test_flow_with_user_binary(fake_adb, tflite_arts, tmp_path):
    from device_tests.devices import parse_device
    (fp32, _), folder = tflite_arts
    binary = tmp_path / "benchmark_model"
    binary.write_bytes(b"\x7fELF stand-in")
    dev = parse_device(f"adb://SERIAL1?benchmark_model={binary}")
    p = dev.profile(fp32, folder, runs=64, warmup=3, threads=4, use_xnnpack=True)
    remote_model = f"/data/local/tmp/mdeploy/{fp32.sha256[:16]}.tflite"
    bm = "/data/local/tmp/mdeploy/benchmark_model"
    assert fake_adb() == [
        ["-s", "SERIAL1", "get-state"],
        ["-s", "SERIAL1", "shell", "mkdir -p /data/local/tmp/mdeploy"],
        ["-s", "SERIAL1", "push", str(binary), bm],
        ["-s", "SERIAL1", "shell", f"chmod 755 {bm}"],
        ["-s", "SERIAL1", "shell", "mkdir -p /data/local/tmp/mdeploy"],
        ["-s", "SERIAL1", "push", str(folder / fp32.path), remote_model],
        ["-s", "SERIAL1", "shell", f"{bm} --graph={remote_model} --num_runs=64 --min_secs=0 "
                                   "--warmup_runs=3 --warmup_min_secs=0 --num_threads=4 --use_gpu=false "
                                   "--use_nnapi=false --use_xnnpack=true --enable_op_profiling=true"],
        ["-s", "SERIAL1", "shell", f"rm -f {remote_model}"],
        ["-s", "SERIAL1", "shell", "getprop"],
    ]
    # the Profile carries the replayed recording's figures and the device's description
    assert p.latency.count == 64 and p.latency.mean_ms == pytest.approx(15.5176)
    assert p.init_ms == pytest.approx(32.163) and p.first_inference_ms == pytest.approx(19.834)
    assert p.ops_by_type[0].name == "Convolution (NHWC, QC8) GEMM"
    assert p.measured_on == "adb device Stand-in phone (SM8550, Android 14)"
    assert p.device_info["soc"] == "SM8550" and p.threads == 4
    assert p.runtime == "benchmark_model (XNNPACK)"


def test_flow_binary_found_on_device(fake_adb, tflite_arts, monkeypatch):
    from device_tests.devices.adb import AdbDevice
    monkeypatch.setenv("FAKE_ADB_ON_DEVICE", "/data/local/tmp/benchmark_model")
    (_, int8), folder = tflite_arts
    AdbDevice("SERIAL1").profile(int8, folder, runs=10, warmup=1, op_profile=False, use_nnapi=True)
    calls = fake_adb()
    assert ["-s", "SERIAL1", "shell", "ls /data/local/tmp/mdeploy/benchmark_model"] in calls
    run = next(c for c in calls if "--graph=" in c[-1])
    assert run[3].startswith("/data/local/tmp/benchmark_model --graph=")
    assert "--use_nnapi=true" in run[3] and "--enable_op_profiling=false" in run[3]
    assert "--num_threads" not in run[3]


def test_no_binary_and_no_parity_are_explicit(fake_adb, tflite_arts):
    from device_tests.devices.adb import AdbDevice
    from device_tests.devices.base import DeviceUnavailable
    (fp32, _), folder = tflite_arts
    dev = AdbDevice("SERIAL1")
    with pytest.raises(DeviceUnavailable, match="benchmark_model"):
        dev.profile(fp32, folder)
    with pytest.raises(DeviceUnavailable, match="parity on this device was not run"):
        dev.run("litert", fp32, folder, h.sample_input())


def test_failed_benchmark_raises(fake_adb, tflite_arts, monkeypatch, tmp_path):
    from device_tests.devices.adb import AdbDevice
    from device_tests.devices.base import DeviceError
    replay = tmp_path / "failed.txt"
    replay.write_text(recorded("mi11_tf24_yolov5s_int8_nnapi_failed.txt"))
    monkeypatch.setenv("FAKE_ADB_REPLAY", str(replay))
    monkeypatch.setenv("FAKE_ADB_ON_DEVICE", "/data/local/tmp/mdeploy/benchmark_model")
    (fp32, _), folder = tflite_arts
    with pytest.raises(DeviceError, match="ANEURALNETWORKS_OP_FAILED"):
        AdbDevice("SERIAL1").profile(fp32, folder, use_nnapi=True)


def test_unattached_serial(fake_adb, tflite_arts):
    from device_tests.devices.adb import AdbDevice
    from device_tests.devices.base import DeviceUnavailable
    (fp32, _), folder = tflite_arts
    with pytest.raises(DeviceUnavailable, match="attached device"):
        AdbDevice("OTHER").profile(fp32, folder)


# -- a real phone, where one is attached ----------------------------------------------

def test_real_device(tflite_arts):
    import shutil

    from device_tests.environment import adb_devices
    adb = shutil.which("adb")
    devices = adb_devices(adb) if adb else []
    binary = os.environ.get("MDEPLOY_BENCHMARK_MODEL")
    if not devices:
        pytest.skip("no Android device attached (adb " + ("found" if adb else "not installed") +
                    "): the real-device run was not done here")
    if not binary:
        pytest.skip("MDEPLOY_BENCHMARK_MODEL is not set (path to LiteRT's Android benchmark_model)")
    from device_tests.devices.adb import AdbDevice
    (fp32, _), folder = tflite_arts
    p = AdbDevice(devices[0], benchmark_model=binary).profile(fp32, folder, runs=20, warmup=2)
    assert p.latency.count >= 20 and p.latency.mean_ms > 0 and p.device_info.get("android")


def test_profile_stage_passes_delegate_options_and_skips_onnx(fake_adb, tflite_arts, monkeypatch):
    """`mdeploy profile --device adb://... --use-gpu`: the stage reaches the same command flow;
    an artifact benchmark_model cannot run is skipped with its reason."""
    from pipeline.stages.profile import ProfileOptions, profile_folder
    monkeypatch.setenv("FAKE_ADB_ON_DEVICE", "/data/local/tmp/mdeploy/benchmark_model")
    arts, folder = tflite_arts
    import onnx
    from onnx import TensorProto, helper
    # a real (tiny) ONNX file: profile refuses an onnx entry whose file is not ONNX
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(folder / "tiny.onnx"))
    onnx_like = h.Artifact.from_dict({**arts[0].to_dict(), "format": "onnx", "path": "tiny.onnx"})
    h.save_manifest(folder, [*arts, onnx_like])
    result = profile_folder(folder, ProfileOptions(devices=["adb://SERIAL1"], runs=64, warmup=1,
                                                   artifacts=["tflite/fp32", "onnx"],
                                                   adb_options={"use_gpu": True}))
    assert [p.artifact for p in result.profiles] == ["tflite/fp32"]
    assert [(s.artifact, "a .tflite artifact" in s.reason) for s in result.skipped] == [("onnx/fp32", True)]
    run = next(c for c in fake_adb() if "--graph=" in c[-1])
    assert "--use_gpu=true" in run[-1] and "--use_nnapi=false" in run[-1]
