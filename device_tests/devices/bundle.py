"""What a remote or emulated Python needs to run our runners, and the job folder protocol.

The bundle is a folder of the project's own modules that the runners need (the runner
classes, the ``Artifact`` record, the profiler, ``remote_main``) under stub package
``__init__`` files, so the device's Python imports them without the model zoo (and
without torch, except for ``.pte`` programs: ExecuTorch's runtime links it).
The same runner code runs on the host and on the device: a parity difference is the
runtime's or the CPU's, never a second implementation's.

A job folder holds ``job.json``, the model file(s) under ``model/``, ``inputs.npz``;
``remote_main`` adds ``result.json`` and ``outputs.npz``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from device_tests.devices.base import Batch, DeviceError
from exporters.artifact import Artifact

_ROOT = Path(__file__).resolve().parents[2]
# The ExecuTorch runner and profiler take the method name, the version and the runtime's
# error capture from ``exporters.executorch``, whose module-level imports need these (all
# plain Python over torch; only imported when a ``.pte`` is run, so a device without torch
# still runs ONNX and TFLite).
EXECUTORCH_MODULES = ("device_tests/runners/executorch.py", "exporters/executorch.py", "exporters/executorch_taps.py",
                      "exporters/base.py", "exporters/fileio.py", "exporters/native_output.py",
                      "exporters/onnx.py", "exporters/layer_map.py", "models/cpu.py",
                      "models/layers.py", "models/registry.py", "models/shift.py",
                      "models/sparse_shift.py")
BUNDLE_MODULES = ("models/errors.py", "models/images.py", "models/util.py", "exporters/artifact.py",
                  "device_tests/profile.py",
                  "device_tests/runners/base.py", "device_tests/runners/onnxruntime.py",
                  "device_tests/runners/litert.py", "device_tests/devices/remote_main.py",
                  *EXECUTORCH_MODULES)
STUB_PACKAGES = ("models", "exporters", "device_tests", "device_tests/runners", "device_tests/devices")
# Run as a script, not ``-m``: sys.path[0] is then the bundle's own devices folder, never
# the remote working directory (which could shadow our packages).
ENTRY = "device_tests/devices/remote_main.py"


def build_bundle(dest: str | Path) -> Path:
    """Copy the runner modules into ``dest`` (a new folder to put on the remote PYTHONPATH)."""
    dest = Path(dest)
    for pkg in STUB_PACKAGES:
        (dest / pkg).mkdir(parents=True, exist_ok=True)
        (dest / pkg / "__init__.py").write_text('"""Stub package: mdeploy runner bundle."""\n')
    for rel in BUNDLE_MODULES:
        src = _ROOT / rel
        if src.exists():
            shutil.copyfile(src, dest / rel)
    return dest


def model_files(artifact: Artifact, root: str | Path) -> list[Path]:
    """The artifact's file and whatever its runtime reads beside it (``Runner.model_files``:
    the external-data file ONNX keeps beside the model)."""
    from device_tests.runners.base import runner_for
    try:
        runner = runner_for(artifact)
    except KeyError:               # no runner here: the file alone
        return [artifact.resolve(root)]
    return runner.model_files(artifact.resolve(root))


def prepare_job(job_dir: str | Path, artifact: Artifact, root: str | Path, job: dict[str, Any],
                batches: list[Batch] | None = None) -> dict[str, Any]:
    """Fill ``job_dir`` with the model, the inputs and ``job.json``; return the job dict."""
    job_dir = Path(job_dir)
    (job_dir / "model").mkdir(parents=True, exist_ok=True)
    files = model_files(artifact, root)
    if files[0].is_dir():                  # an .mlpackage
        raise DeviceError(f"{artifact.key}: a folder artifact cannot be sent to a device runner")
    for f in files:
        shutil.copyfile(f, job_dir / "model" / f.name)
    remote_art = Artifact.from_dict(artifact.to_dict())
    remote_art.path = f"model/{files[0].name}"
    job = dict(job, artifact=remote_art.to_dict())
    if batches is not None:
        job["batches"] = len(batches)
        np.savez(job_dir / "inputs.npz", **{f"{i}/{k}": np.asarray(v, np.float32)
                                            for i, b in enumerate(batches) for k, v in b.items()})
    (job_dir / "job.json").write_text(json.dumps(job))
    return job


def read_result(job_dir: str | Path, where: str, stderr: str = "") -> dict[str, Any]:
    path = Path(job_dir) / "result.json"
    if not path.exists():
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        raise DeviceError(f"{where}: the runner wrote no result{': ' + tail if tail else ''}")
    result = json.loads(path.read_text())
    if not result.get("ok"):
        raise DeviceError(f"{where}: {result.get('error')}\n{result.get('traceback', '')}".rstrip())
    return result


def read_outputs(job_dir: str | Path, n: int) -> list[Batch]:
    data = np.load(Path(job_dir) / "outputs.npz")
    out: list[Batch] = [{} for _ in range(n)]
    for key in data.files:
        i, name = key.split("/", 1)
        out[int(i)][name] = data[key]
    return out
