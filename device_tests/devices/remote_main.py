"""Entry point run by the device's own Python (ssh) or the emulated aarch64 Python (qemu).

    PYTHONPATH=BUNDLE python3 BUNDLE/device_tests/devices/remote_main.py JOB_DIR

It reads ``JOB_DIR/job.json``, runs the real runner (``run``) or the profiler
(``profile``) on the model copied into ``JOB_DIR``, and writes ``result.json`` (and
``outputs.npz``). It imports only what ``bundle.py`` copies next to it (numpy, the
runtimes, and the project's runner/profile modules), never the model zoo, and torch only
for a ``.pte`` (ExecuTorch's runtime links it).

Markers: with ``"markers": true`` it issues ``lseek(-1, MARK_MAGIC + code, SEEK_SET)``
around initialisation and around each inference. The call fails at once with EBADF and
does nothing else; the qemu instruction-count plugin recognises it and records the
instruction counter there, which is how per-inference counts are taken.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

MARK_MAGIC = 0x6D64_7000          # "mdp" << 8; the low byte carries the marker code


def _marker(code: int) -> None:
    try:
        os.lseek(-1, MARK_MAGIC + code, os.SEEK_SET)
    except OSError:
        pass


def _versions() -> dict[str, str]:
    from importlib import metadata
    out = {}
    for dist in ("numpy", "onnxruntime", "ai-edge-litert", "torch", "executorch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _run(job: dict, job_dir: Path) -> dict:
    import importlib

    import numpy as np

    from device_tests.runners.base import runner_class
    from exporters.artifact import Artifact
    kind = job["runner"]
    importlib.import_module(f"device_tests.runners.{kind}")
    artifact = Artifact.from_dict(job["artifact"])
    data = np.load(job_dir / "inputs.npz")
    outputs = {}
    with runner_class(kind)(**job.get("runner_options", {})) as runner:
        runner.load(artifact, job_dir)
        for i in range(job["batches"]):
            prefix = f"{i}/"
            batch = {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}
            for name, value in runner.infer(batch).items():
                outputs[f"{i}/{name}"] = value
        label = runner.label
    np.savez(job_dir / "outputs.npz", **outputs)
    return {"runner_label": label}


def _profile(job: dict, job_dir: Path) -> dict:
    import dataclasses

    from device_tests.profile import measure
    from exporters.artifact import Artifact
    artifact = Artifact.from_dict(job["artifact"])
    raw = measure(artifact.format, str(artifact.resolve(job_dir)), runs=job["runs"],
                  warmup=job["warmup"], threads=job.get("threads"),
                  op_profile=job.get("op_profile", True),
                  marker=_marker if job.get("markers") else None)
    raw["ops_by_type"] = [dataclasses.asdict(o) for o in raw.get("ops_by_type", [])]
    raw["ops_by_node"] = [dataclasses.asdict(o) for o in raw.get("ops_by_node", [])]
    return {"raw": raw}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job_dir = Path(argv[0])
    result: dict = {"ok": False}
    try:
        job = json.loads((job_dir / "job.json").read_text())
        result.update(_run(job, job_dir) if job["op"] == "run" else _profile(job, job_dir))
        from device_tests.profile import host_description
        result.update(ok=True, host=host_description(), versions=_versions())
    except BaseException as exc:   # reported to the host, which raises DeviceError
        result.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    tmp = job_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, job_dir / "result.json")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
