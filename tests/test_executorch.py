"""The ExecuTorch target (issue 16, item 2): ``.pte`` files lowered to XNNPACK, run by the
real ``executorch.runtime``, through the same export -> verify -> profile stages as every
other format.

The model is the one ``mdeploy run`` trains by default (``trained_mnist``, shared with the
other tests that need real weights), so the int8 figure is the one users get: top-1
agreement with float on the 1,000 held-out MNIST digits, against the issue's 0.98. The fp32
``.pte`` is held to the project's unchanged fp32 row (``1e-5 + 1e-5 * max|logit|``).
"""
from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path

import pytest

from device_tests.compare import DEFAULT_TOLERANCES


@pytest.fixture(scope="module")
def pte_export(trained_mnist, tmp_path_factory, cli) -> Path:
    out = tmp_path_factory.mktemp("executorch") / "export"
    code, _, err = cli("export", "--checkpoint", str(trained_mnist), "--formats", "executorch",
                       "--precisions", "fp32,int8", "--out", str(out), "-q")
    assert code == 0, err[-2000:]
    return out


@pytest.fixture(scope="module")
def cli(module_cli):
    """Module-scoped: the module's export fixtures call it."""
    return module_cli


@pytest.fixture(scope="module")
def verified(pte_export):
    from pipeline.stages.verify import VerifyOptions, verify_folder
    return verify_folder(pte_export, VerifyOptions(samples=1000))      # all 1,000 held-out digits


def test_fp32_pte_passes_verify_at_the_fp32_tolerance(pte_export, verified):
    pair = {p.target: p for p in verified.report.pairs}["executorch/fp32"]
    assert verified.report.inputs["samples"] == 1000 and not verified.report.inputs["random"]
    assert pair.passed and pair.top1_agreement == 1.0
    assert pair.tolerance["max_abs"] == DEFAULT_TOLERANCES["fp32"].max_abs == 1e-5        # the row, unchanged
    assert 0 < pair.ref_max_abs and pair.max_abs <= 1e-5 + 1e-5 * pair.ref_max_abs
    assert pair.target_runner.startswith(f"ExecuTorch {metadata.version('executorch')} (CPU, XNNPACK")


def test_int8_pte_keeps_top1_agreement_on_the_default_model(verified):
    pair = {p.target: p for p in verified.report.pairs}["executorch/int8"]
    assert pair.samples == 1000 and pair.passed
    assert pair.top1_agreement >= 0.98, pair.top1_agreement


def test_manifest_records_version_time_and_op_split(pte_export):
    from exporters.artifact import Manifest
    m = Manifest.load(pte_export)
    arts = {a.precision: a for a in m.find("executorch")}
    assert set(arts) == {"fp32", "int8"}
    assert m.versions["executorch"] == metadata.version("executorch")
    for precision, a in arts.items():
        assert a.path == f"model_{precision}.pte" and (pte_export / a.path).read_bytes()[4:8] == b"ET12"
        assert a.inputs[0].shape == [1, 1, 28, 28] and a.inputs[0].layout == "NCHW"
        assert a.inputs[0].dtype == a.outputs[0].dtype == "float32"       # int8 quantizes inside the delegate
        e = a.extra
        assert e["executorch_version"] == metadata.version("executorch") and e["export_seconds"] > 0
        split = e["delegation"]
        assert split["delegated_subgraphs"] >= 1 and split["delegated_ops"] > 0
        assert split["delegated"]["aten_convolution_default"] == 52            # every conv in XNNPACK
        assert split["non_delegated_ops"] == sum(split["non_delegated"].values())
        assert "manifest.json" in e["metadata"]                              # labels live there, not in the .pte
    q = arts["int8"].extra
    assert q["quantization"]["config"] == "get_symmetric_quantization_config(is_per_channel=True)"
    assert q["calibration"]["samples"] == 200
    assert arts["int8"].extra["delegation"]["delegated_quantize_dequantize"] > 0
    assert arts["int8"].size_bytes < arts["fp32"].size_bytes / 2.5


def test_verify_per_layer_compares_every_tap_of_both_programs(pte_export, cli):
    """``mdeploy verify --per-layer``: the export's tap programs give the ``.pte`` files a
    per-layer error curve like every other format's (fp32 at the fp32 per-layer bound)."""
    import json as _json
    from exporters.artifact import Manifest
    arts = {a.precision: a for a in Manifest.load(pte_export).find("executorch")}
    for a in arts.values():
        assert (pte_export / a.extra["taps"]["file"]).is_file() and a.extra["taps"]["final_max_abs_vs_shipped"] == 0
    code, out, err = cli("verify", str(pte_export), "--runners", "torch,executorch", "--per-layer",
                         "--samples", "16", "--json")
    assert code == 0, err[-2000:]
    pairs = {p["target"]: p for p in _json.loads(out)["pairs"]}
    for precision, a in arts.items():
        layers = pairs[f"executorch/{precision}"]["layers"]
        assert [layer["module"] for layer in layers] == list(a.extra["layer_map"].values())
        assert len(layers) > 20
    assert all(layer["passed"] for layer in pairs["executorch/fp32"]["layers"])


def test_profile_measures_pte_files(pte_export):
    from pipeline.stages.profile import ProfileOptions, profile_folder
    res = profile_folder(pte_export, ProfileOptions(runs=5, warmup=1, threads=1, artifacts=["executorch"]))
    assert not res.skipped, res.skipped
    assert {p.artifact for p in res.profiles} == {"executorch/fp32", "executorch/int8"}
    for p in res.profiles:
        assert p.runtime.startswith("ExecuTorch") and "threads=1" in p.runtime
        assert p.latency is not None and p.latency.count == 5 and p.latency.p50_ms > 0
        assert p.init_ms > 0 and p.first_inference_ms > 0 and p.artifact_size_bytes > 0


def test_verify_of_pte_files_prints_nothing_on_stderr_in_a_fresh_process(pte_export):
    """What the libraries print as they load (torchao's missing CUDA kernels, ExecuTorch's
    cpuinfo lines from C++) is captured: a quiet verify's stderr is empty. In a fresh
    process, because they print only on first import and first pool query."""
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", str(pte_export), "--samples", "4", "-q"],
                          capture_output=True, text=True, timeout=300, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == "", proc.stderr[-2000:]


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_broken_pte_is_one_line_exit_2(pte_export, tmp_path, cli, damage):
    folder = tmp_path / damage
    shutil.copytree(pte_export, folder)
    pte = folder / "model_fp32.pte"
    data = pte.read_bytes()
    pte.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"PK\x03\x04 not a program" * 8)
    for argv in (("-q", "profile", str(folder), "--runs", "1"), ("-q", "verify", str(folder), "--samples", "2")):
        code, out, err = cli(*argv)
        assert code == 2 and err.count("\n") == 1 and "model_fp32.pte" in err, (argv, err)
        assert "Traceback" not in err


def test_int8_without_calibration_data_is_one_line(cli, tmp_path):
    code, _, err = cli("-q", "export", "mobilenet_v2", "--num-classes", "10", "--in-chans", "1", "--input-size", "28",
                       "--model-arg", "width_mult=0.35", "--formats", "executorch", "--precisions", "int8",
                       "--out", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and "--calibration" in err and "executorch int8" in err, err
    assert not (tmp_path / "out").exists()


def test_a_model_torch_export_refuses_is_one_line_naming_it(cli, tmp_path):
    (tmp_path / "branchy.py").write_text(
        "import torch.nn as nn\n\n"
        "class Branchy(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, 4, 3)\n"
        "    def forward(self, x):\n"
        "        y = self.conv(x).mean((2, 3))\n"
        "        return y if y.sum() > 0 else -y      # data-dependent control flow\n\n"
        "def build():\n"
        "    return Branchy()\n")
    code, _, err = cli("-q", "export", f"{tmp_path / 'branchy.py'}:build", "--input-size", "16", "--formats", "executorch",
                       "--out", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and "Branchy" in err and "torch.export" in err, err
    assert not (tmp_path / "out").exists()


def test_doctor_reports_both_converters(cli):
    code, out, _ = cli("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(out)["checks"]}
    assert code == 0
    assert checks["python package ExecuTorch"]["detail"] == metadata.version("executorch")
    assert checks["python package litert-torch"]["detail"] == metadata.version("litert-torch")   # pinned
    assert checks["python package ai-edge-quantizer"]["detail"] == metadata.version("ai-edge-quantizer")


def test_sparse_shifts_lower_without_negative_pads(tmp_path):
    """FE-Net's deploy-form shifts crop with negative Pads, which ExecuTorch's portable
    ``constant_pad_nd`` refuses at run time ("Padding values must be non-negative"); the
    exporter traces them as Pad + Slice (``models.sparse_shift.no_negative_pads``), and the
    program runs with fp32 parity."""
    import numpy as np
    import torch

    from device_tests.runners.executorch import ExecuTorchRunner
    from exporters.executorch import export_executorch
    from models import create_model
    from models.reparam import reparameterize_model
    from tests.zoo_checks import fp32_parity_failure, trained_like
    torch.manual_seed(0)
    model = reparameterize_model(trained_like(create_model("fe_net_tiny", num_classes=10, in_chans=3), 32))
    (art,) = export_executorch(model, tmp_path, ["fp32"], input_shape=(1, 3, 32, 32))
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with ExecuTorchRunner() as r:
        r.load(art, tmp_path)
        out = r.infer({"input": x})["logits"]
    assert fp32_parity_failure(model, x, out, "fe_net_tiny") is None


def test_runners_survive_a_pool_reset_between_their_load_and_their_run(pte_export):
    """ExecuTorch's thread pool is process-wide, and its size follows the free cores at each
    runner's load. XNNPACK keeps a pointer to the pool a method was loaded with: executing a
    method after another runner reset the pool aborted the process (seen in CI, a segfault
    inside ``execute``; ``__pthread_tpp_change_priority`` assertions here). Each runner
    reloads its method when the pool moved. In a child process, so a crash is a failed
    assertion and not the end of the test session."""
    import subprocess
    import sys
    import textwrap
    root = Path(__file__).resolve().parents[1]
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(root)!r})
        import numpy as np
        from device_tests.profile import executorch_pool_generation, executorch_threads
        from device_tests.runners.executorch import ExecuTorchRunner
        from exporters.artifact import Manifest
        folder = {str(pte_export)!r}
        m = Manifest.load(folder)
        arts = [a for a in m.artifacts if a.format == "executorch"]
        runners = []
        for i, a in enumerate(arts):
            r = ExecuTorchRunner(threads=1 + i % 2)       # each load resizes the pool
            r.load(a, folder)
            runners.append(r)
        x = {{arts[0].inputs[0].name: np.random.default_rng(0).normal(size=(2, *arts[0].inputs[0].shape[1:]))
              .astype(np.float32)}}
        first = [r.infer(x) for r in runners]
        before = executorch_pool_generation()
        for k in range(12):
            executorch_threads(1 + k % 2)                  # another runner, or a profile, resets it
            for r, y0 in zip(runners, first):
                y = r.infer(x)
                for name in y0:
                    assert np.array_equal(y[name], y0[name]), name
        assert executorch_pool_generation() > before
        assert all(r._pool == executorch_pool_generation() for r in runners)   # each reloaded on the new pool
        print("ok", len(runners))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.split()[-2:] == ["ok", "2"], (proc.returncode, proc.stderr[-3000:])
