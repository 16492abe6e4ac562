"""``qemu-aarch64[:cpu]``: the real aarch64 builds of ONNX Runtime, LiteRT and ExecuTorch
(``.pte`` with its XNNPACK delegate), emulated.

What it is good for: parity on ARM kernels (XNNPACK, KleidiAI and MLAS take aarch64
NEON/dotprod paths that differ from x86), and an *instruction count* per inference
for a given CPU model, which is deterministic under emulation and therefore a cost
figure that compares models and precisions honestly. What it is not: a latency.
Emulated wall time depends on the host and is 25-340x slower than a device; it is never
reported as latency (``Profile.latency`` stays empty).

Counts are taken with ``threads=1`` (the plugin's counter is shared by all guest
threads, so only single-threaded work counts exactly); ONNX Runtime's telemetry is off
while counting (it otherwise adds a drifting few percent). A ``.pte`` process first
imports torch (ExecuTorch's runtime links it): about 35 s of emulation before the
model loads, not counted.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from device_tests.devices import aarch64_env as env
from device_tests.devices.base import Batch, Device, DeviceError, DeviceUnavailable
from device_tests.devices.bundle import ENTRY, build_bundle, prepare_job, read_outputs, read_result
from device_tests.profile import (MARK_INIT_BEGIN, MARK_INIT_END, MARK_RUN_BEGIN, MARK_RUN_END,
                                  InstructionCounts, Profile, build_profile)
from exporters.artifact import Artifact, size_of

DEFAULT_CPU = "cortex-a76"


class QemuDevice(Device):
    kind = "qemu-aarch64"

    def __init__(self, cpu: str = DEFAULT_CPU, *, cache: str | Path | None = None,
                 timeout: float = 3600, max_runs: int = 3) -> None:
        if cpu not in env.CPUS:
            raise DeviceUnavailable(f"qemu-aarch64:{cpu}", f"a CPU model among {', '.join(env.CPUS)}",
                                    repr(cpu) + (" ('max' gives wrong int8 results)" if cpu == "max" else ""))
        self.cpu = cpu
        self.cache = Path(cache) if cache else env.cache_dir()
        self.timeout = timeout
        self.max_runs = max_runs

    @property
    def spec(self) -> str:
        return f"qemu-aarch64:{self.cpu}"

    # -- plumbing ------------------------------------------------------------------
    def check(self) -> env.EnvStatus:
        st = env.status(self.cache)
        if not st.ready:
            raise DeviceUnavailable(self.spec, "a provisioned aarch64 environment",
                                    "; ".join(st.problems()), fix=env.FIX_COMMAND)
        return st

    def _execute(self, job_dir: Path, plugin_out: Path | None = None) -> tuple[str, float]:
        prefix = env.cpu_prefix(self.cpu, self.cache)
        bundle = build_bundle(job_dir / "bundle")
        cmd = [env.qemu_binary() or "qemu-aarch64", "-L", str(prefix), "-cpu", self.cpu]
        if plugin_out is not None:
            so = self.cache / "plugin" / "libinsn_count.so"
            cmd += ["-plugin", f"{so},outfile={plugin_out}"]
        cmd += [str(prefix / "usr" / "bin" / "python3"), str(bundle / ENTRY), str(job_dir)]
        # A clean environment: nothing of the host's venv may leak into the guest Python.
        guest_env = {"PYTHONPATH": f"{bundle}{os.pathsep}{self.cache / 'site'}",
                     "PATH": "/usr/bin:/bin", "HOME": str(job_dir), "LANG": "C.UTF-8",
                     "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=guest_env, capture_output=True, text=True,
                                  timeout=self.timeout, cwd=job_dir)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"{self.spec}: no result after {self.timeout:.0f} s") from None
        return proc.stderr, time.perf_counter() - t0

    # -- Device ---------------------------------------------------------------------
    def run_batches(self, runner_kind: str, artifact: Artifact, root: str | Path,
                    batches: list[Batch], **runner_options: Any) -> list[Batch]:
        self.check()
        with tempfile.TemporaryDirectory(prefix="mdeploy-qemu-") as tmp:
            job_dir = Path(tmp)
            prepare_job(job_dir, artifact, root, {"op": "run", "runner": runner_kind,
                                                  "runner_options": runner_options}, batches)
            stderr, _ = self._execute(job_dir)
            read_result(job_dir, self.spec, stderr)
            return read_outputs(job_dir, len(batches))

    def profile(self, artifact: Artifact, root: str | Path, *, runs: int = 3, warmup: int = 0,
                threads: int | None = 1, op_profile: bool = False) -> Profile:
        """Instruction counts of initialisation, the first inference and ``runs`` more."""
        st = self.check()
        notes = []
        if runs > self.max_runs:
            notes.append(f"runs capped at {self.max_runs} under emulation (asked {runs}); "
                         "counts are deterministic, so more runs add nothing")
            runs = self.max_runs
        if threads not in (None, 1):
            notes.append(f"counted with 1 thread (asked {threads}): the counter is exact only "
                         "for single-threaded work")
        with tempfile.TemporaryDirectory(prefix="mdeploy-qemu-") as tmp:
            job_dir = Path(tmp)
            prepare_job(job_dir, artifact, root, {"op": "profile", "runs": runs, "warmup": 0,
                                                  "threads": 1, "op_profile": False, "markers": True})
            counts_file = job_dir / "insn_counts.txt"
            stderr, wall = self._execute(job_dir, plugin_out=counts_file)
            result = read_result(job_dir, self.spec, stderr)
            if not counts_file.exists():
                raise DeviceError(f"{self.spec}: the instruction-count plugin wrote nothing\n{stderr[-500:]}")
            counts = parse_counts(counts_file.read_text(), self.cpu)
        raw = result["raw"]
        emulated_ms = (sum(raw.get("times_ms", [])) + (raw.get("first_inference_ms") or 0)) / (runs + 1)
        notes.append(f"emulated wall time {emulated_ms:.1f} ms per inference on this host "
                     "(not a device latency)")
        prof = build_profile(
            artifact, {"runtime": raw.get("runtime", ""),
                       "op_profile_note": "not profiled per op under emulation (time-based)"},
            device=self.spec, runs=runs, warmup=0, threads=1, size_bytes=size_of(artifact.resolve(root)),
            measured_on=f"qemu-aarch64 {self.cpu} (instruction counts; wall time not a device latency)",
            device_info={**self.describe(st), "guest": result.get("host", {}),
                         "guest_versions": result.get("versions", {})})
        prof.instructions = counts
        prof.memory_note = "not measured under emulation (qemu's own memory would be counted)"
        prof.notes = notes + [f"whole emulated process took {wall:.1f} s"]
        return prof

    def describe(self, st: env.EnvStatus | None = None) -> dict[str, Any]:
        st = st or env.status(self.cache)
        version = ""
        if st.qemu:
            out = subprocess.run([st.qemu, "--version"], capture_output=True, text=True)
            version = out.stdout.splitlines()[0] if out.stdout else ""
        return {"kind": self.kind, "cpu": self.cpu, "qemu": version,
                "rootfs": f"Debian {env.SUITE} arm64, Python {st.python}", "wheels": st.wheels}


def parse_counts(text: str, cpu: str) -> InstructionCounts:
    """Pair the plugin's marker snapshots into init / per-inference instruction counts."""
    marks = []
    for line in text.split("\n"):
        parts = line.split()
        if len(parts) == 2 and parts[0] != "total":
            marks.append((int(parts[0]), int(parts[1])))
    init = None
    runs: list[int] = []
    open_at: dict[int, int] = {}
    for code, count in marks:
        if code in (MARK_INIT_BEGIN, MARK_RUN_BEGIN):
            open_at[code] = count
        elif code == MARK_INIT_END and MARK_INIT_BEGIN in open_at:
            init = count - open_at.pop(MARK_INIT_BEGIN)
        elif code == MARK_RUN_END and MARK_RUN_BEGIN in open_at:
            runs.append(count - open_at.pop(MARK_RUN_BEGIN))
    if not runs:
        raise DeviceError(f"no inference markers in the instruction counts: {text[:200]!r}")
    return InstructionCounts(cpu=cpu, init=init, first_inference=runs[0], per_inference=runs[1:])
