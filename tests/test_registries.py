"""A new format is one file: an exporter and a runner defined here register themselves and
flow through the real export -> verify -> profile stages (issue 12).

The format is TorchScript with an NHWC input (``torch.jit.trace`` of the model behind a
permute), loaded by ``torch.jit.load``: a real runtime, so the parity and latency figures
are measured, not stand-ins. The NHWC input makes the runner's edge do real work: the
base class's ``infer`` transposes the comparator's NCHW batches, and the runner's
``_run`` only ever sees what the file takes. The classes are defined inside a fixture and
removed from the registries afterwards, so no other test sees the extra format.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
import torch

from exporters.artifact import Artifact, TensorSpec, sha256_of, size_of
from models.errors import InputError

SIZE, CLASSES = 12, 5

MODEL_SOURCE = '''
import torch.nn as nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def build():
    return Tiny()
'''


@pytest.fixture(scope="module")
def torchscript_format():
    """Define (and so register) a TorchScript exporter and runner; unregister them after."""
    from device_tests import profile as prof
    from device_tests.runners import base as runners_base
    from exporters import base as exporters_base
    from exporters.base import ExportContext, Exporter, ExporterOptions, option
    from exporters.fileio import atomic_write_bytes

    @dataclass
    class TorchScriptOptions(ExporterOptions):
        layout: str = option("NHWC", key="torchscript_layout", flag="--torchscript-layout")

        def checked(self) -> "TorchScriptOptions":
            if self.layout not in ("NCHW", "NHWC"):
                raise InputError("--torchscript-layout", "NCHW or NHWC", repr(self.layout))
            return self

    class _Permuted(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x.permute(0, 3, 1, 2))

    class TorchScriptExporter(Exporter):
        name = "torchscript"
        format = "torchscript"
        precisions = ("fp32",)
        options_type = TorchScriptOptions

        def export(self, source: torch.nn.Module, out_dir: Path, precisions: Sequence[str],
                   ctx: ExportContext) -> list[Artifact]:
            layout = self.options.layout
            n, c, h, w = ctx.input_shape
            shape = [n, h, w, c] if layout == "NHWC" else [n, c, h, w]
            module = _Permuted(source) if layout == "NHWC" else source
            with torch.no_grad():
                traced = torch.jit.trace(module.eval(), torch.zeros(shape))
                classes = int(traced(torch.zeros(shape)).shape[1])
            buf = io.BytesIO()
            torch.jit.save(traced, buf, _extra_files={"input.json": json.dumps(shape)})
            path = atomic_write_bytes(Path(out_dir) / "model.torchscript", buf.getvalue())
            return [Artifact(path=str(path.relative_to(ctx.root)), format="torchscript", precision="fp32",
                             inputs=[TensorSpec("input", ["batch", *shape[1:]], "float32", layout)],
                             outputs=[TensorSpec("logits", ["batch", classes], "float32", "NC")],
                             sha256=sha256_of(path), size_bytes=size_of(path), tool="torch.jit.trace",
                             tool_version=torch.__version__)]

    class TorchScriptRunner(runners_base.Runner):
        kind = "torchscript"
        formats = ("torchscript",)
        seen: list[tuple[int, ...]] = []          # what _run was fed: the file's own layout

        def load(self, artifact: Artifact, root: str | Path | None = None) -> None:
            self.artifact = artifact
            self.path = artifact.resolve(root) if root is not None else Path(artifact.path)
            self.module = torch.jit.load(str(self.path))

        def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            (x,) = feed.values()
            type(self).seen.append(x.shape)
            with torch.no_grad():
                return {"logits": self.module(torch.from_numpy(x)).numpy()}

        @classmethod
        def profile(cls, path: str, *, runs: int, warmup: int, threads: int | None,
                    op_profile: bool = True, marker: Any = None) -> dict[str, Any]:
            extra = {"input.json": ""}
            with prof.PeakMemory() as mem:
                t0 = time.perf_counter()
                module = torch.jit.load(path, _extra_files=extra)
                init_ms = (time.perf_counter() - t0) * 1e3
                x = torch.from_numpy(prof.random_input(json.loads(extra["input.json"]), np.float32))
                with torch.no_grad():
                    first, times = prof._timed_runs(lambda: module(x), runs, warmup, marker)
            return {"runtime": f"torch.jit {torch.__version__}", "init_ms": init_ms, "first_inference_ms": first,
                    "times_ms": times, "peak_memory_bytes": mem.delta, "memory_note": mem.method,
                    "ops_by_type": [], "ops_by_node": [], "op_profile_note": "not available"}

    yield TorchScriptOptions, TorchScriptRunner
    exporters_base._EXPORTERS.pop("torchscript", None)
    runners_base._RUNNERS.pop("torchscript", None)


@pytest.fixture(scope="module")
def exported(torchscript_format, tmp_path_factory) -> Path:
    from exporters.fileio import atomic_write_bytes
    from models.checkpoint import checkpoint_bytes, load_factory
    from pipeline.stages.export import ExportOptions, export_model
    from tests.parity_helpers import make_realistic
    options_type, _ = torchscript_format
    folder = tmp_path_factory.mktemp("registries")
    (folder / "tiny.py").write_text(MODEL_SOURCE)
    spec = f"{folder / 'tiny.py'}:build"
    torch.manual_seed(0)
    model = make_realistic(load_factory(spec), torch.randn(32, 3, SIZE, SIZE))   # logits a few units wide
    meta = {"model": spec, "num_classes": CLASSES, "in_chans": 3, "input_size": SIZE,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "channel_order": "RGB"}
    ckpt = atomic_write_bytes(folder / "tiny.safetensors", checkpoint_bytes(model, meta))
    out = folder / "export"
    res = export_model(spec, out, checkpoint=ckpt, options=ExportOptions(
        formats=("onnx", "torchscript"), exporter_options={"torchscript": options_type("NHWC")}))
    assert res.seconds["torchscript"] > 0
    return out


def test_new_format_flows_through_export_verify_profile(torchscript_format, exported):
    from exporters.artifact import Manifest
    from pipeline.stages.profile import ProfileOptions, profile_folder
    from pipeline.stages.verify import VerifyOptions, verify_folder
    _, runner_cls = torchscript_format

    m = Manifest.load(exported)
    (art,) = m.find("torchscript")
    assert art.inputs[0].layout == "NHWC" and art.inputs[0].shape == ["batch", SIZE, SIZE, 3]
    assert (exported / art.path).is_file() and sha256_of(exported / art.path) == art.sha256

    runner_cls.seen.clear()
    res = verify_folder(exported, VerifyOptions(samples=16, divergence=False, random_inputs=True,  # the user names the factory
                                                runner_options={"torch": {"model": m.source["model"]}}))
    pairs = {p.target: p for p in res.report.pairs}
    assert set(pairs) == {"onnx/fp32", "torchscript/fp32"}
    ts = pairs["torchscript/fp32"]
    assert ts.passed and ts.samples == 16 and ts.top1_agreement == 1.0
    assert 0 < ts.ref_max_abs and ts.max_abs <= 1e-5 + 1e-5 * ts.ref_max_abs      # the fp32 row, unchanged
    assert res.report.runners["torchscript/fp32"] == "torchscript"
    assert runner_cls.seen and all(s[1:] == (SIZE, SIZE, 3) for s in runner_cls.seen), runner_cls.seen

    prof = profile_folder(exported, ProfileOptions(devices=["local"], runs=5, warmup=1,
                                                   artifacts=["torchscript"]))
    assert not prof.skipped, prof.skipped
    (row,) = prof.profiles
    assert row.format == "torchscript" and row.runtime.startswith("torch.jit")
    assert row.latency is not None and row.latency.count == 5 and row.latency.p50_ms > 0
    assert row.artifact_size_bytes == art.size_bytes


def test_new_runner_gets_the_base_edge(torchscript_format, exported):
    """The new runner wrote no shape check: the base's is the same for every runtime."""
    from exporters.artifact import Manifest
    _, runner_cls = torchscript_format
    (art,) = Manifest.load(exported).find("torchscript")
    with runner_cls() as r:
        r.load(art, exported)
        y = r.infer({"input": np.zeros((3, 3, SIZE, SIZE), np.float32)})["logits"]
        assert y.shape == (3, CLASSES) and y.dtype == np.float32
        with pytest.raises(InputError, match=rf"\[N, 3, {SIZE}, {SIZE}\] \(NCHW\)"):
            r.infer({"input": np.zeros((1, SIZE, SIZE, 3), np.float32)})     # NHWC given to an NCHW API
        with pytest.raises(InputError, match="'input'"):
            r.infer({"image": np.zeros((1, 3, SIZE, SIZE), np.float32)})


def test_new_exporter_options_and_precisions_are_checked(torchscript_format, tmp_path):
    from pipeline.stages.export import ExportOptions, export_model
    options_type, _ = torchscript_format
    (tmp_path / "tiny.py").write_text(MODEL_SOURCE)
    spec = f"{tmp_path / 'tiny.py'}:build"
    with pytest.raises(InputError, match="--torchscript-layout"):
        export_model(spec, tmp_path / "a", options=ExportOptions(
            formats=("torchscript",), exporter_options={"torchscript": options_type("HWCN")}))
    with pytest.raises(InputError, match="for torchscript, some of fp32"):
        export_model(spec, tmp_path / "b", options=ExportOptions(formats=("torchscript", "tflite"),
                                                                 precisions=("int8",)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
