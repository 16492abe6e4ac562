"""``adb://SERIAL``: an Android phone, profiled with TFLite/LiteRT's ``benchmark_model``.

No registry ships ``benchmark_model`` for Android, so the user supplies it: a local
binary (``adb://SERIAL?benchmark_model=/path/to/android_aarch64_benchmark_model``, pushed
to the device) or one already on the device (``/data/local/tmp/mdeploy/benchmark_model``
or ``/data/local/tmp/benchmark_model``). The model is pushed under a name made from its
hash, run with the options people use (threads, GPU / NNAPI / XNNPACK delegates, op
profiling), and the tool's output is parsed into a ``Profile`` (``benchmark_model.py``).

Parity on Android needs a Python-free tool that dumps outputs for given inputs, which
``benchmark_model`` is not; ``run_batches`` says that parity on this device was not run
rather than pretending.

``adb shell`` joins its arguments and hands them to the device's shell, so the remote
command is built from ``shlex.quote``-d arguments; the device-side names are our own.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from device_tests.devices.base import Batch, Device, DeviceError, DeviceUnavailable, check_word
from device_tests.devices.benchmark_model import BenchmarkOutput, parse_benchmark_output
from device_tests.profile import Profile, build_profile
from exporters.artifact import Artifact, sha256_of, size_of

REMOTE_DIR = "/data/local/tmp/mdeploy"
_SERIAL = re.compile(r"^[A-Za-z0-9_.:\[\]%-]+$")         # USB serials and host:port of adb over TCP
ON_DEVICE_CANDIDATES = (f"{REMOTE_DIR}/benchmark_model", "/data/local/tmp/benchmark_model")
_PROP = re.compile(r"^\[([^\]]+)\]: \[(.*)\]$")
DESCRIBE_PROPS = {"model": "ro.product.model", "manufacturer": "ro.product.manufacturer",
                  "soc": "ro.soc.model", "soc_manufacturer": "ro.soc.manufacturer",
                  "hardware": "ro.hardware", "board": "ro.product.board",
                  "android": "ro.build.version.release", "sdk": "ro.build.version.sdk",
                  "abi": "ro.product.cpu.abi"}


def _flag(value: bool) -> str:
    return "true" if value else "false"


class AdbDevice(Device):
    kind = "adb"

    def __init__(self, serial: str, *, benchmark_model: str | None = None, adb: str | None = None,
                 timeout: float = 1800) -> None:
        # the serial follows -s, and paths go to adb push: a leading '-' would be an option
        self.serial = check_word(serial, "serial", f"adb://{serial}", _SERIAL)  # type: ignore[assignment]
        self.benchmark_model = str(Path(benchmark_model).expanduser()) if benchmark_model else None
        self.adb = adb
        self.timeout = timeout
        self._props: dict[str, str] | None = None

    @property
    def spec(self) -> str:
        return f"adb://{self.serial}"

    # -- plumbing ------------------------------------------------------------------
    def _adb_path(self) -> str:
        exe = self.adb or shutil.which("adb")
        if not exe:
            raise DeviceUnavailable(self.spec, "the adb client", "not installed",
                                    fix="apt-get install -y adb")
        return exe

    def _call(self, args: list[str], what: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [self._adb_path(), "-s", self.serial, *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"{self.spec}: {what} gave no answer in {self.timeout:.0f} s") from None
        if check and proc.returncode != 0:
            raise DeviceError(f"{self.spec}: {what} failed ({proc.returncode}): "
                              f"{' '.join((proc.stderr or proc.stdout).split())[:300]}")
        return proc

    def shell(self, argv: list[str], what: str = "adb shell", check: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` on the device, each argument quoted for the device's shell."""
        return self._call(["shell", " ".join(shlex.quote(a) for a in argv)], what, check)

    def check(self) -> None:
        proc = self._call(["get-state"], "get-state", check=False)
        if proc.returncode != 0 or proc.stdout.strip() != "device":
            raise DeviceUnavailable(self.spec, "an attached device in state 'device'",
                                    " ".join((proc.stderr or proc.stdout).split())[:200] or "not attached",
                                    fix="connect it with USB debugging on and check `adb devices`")

    def properties(self) -> dict[str, str]:
        if self._props is None:
            out = self.shell(["getprop"], "getprop").stdout
            self._props = {m.group(1): m.group(2) for m in map(_PROP.match, out.splitlines()) if m}
        return self._props

    def describe(self) -> dict[str, Any]:
        props = self.properties()
        info = {k: props[p] for k, p in DESCRIBE_PROPS.items() if props.get(p)}
        return {"kind": self.kind, "serial": self.serial, **info}

    def _binary(self) -> str:
        """Path of ``benchmark_model`` on the device, pushing the user's binary if given."""
        if self.benchmark_model:
            local = Path(self.benchmark_model)
            if not local.is_file():
                raise DeviceUnavailable(self.spec, "a benchmark_model binary", f"no file {local}")
            self.shell(["mkdir", "-p", REMOTE_DIR], "mkdir")
            self._call(["push", str(local.resolve()), ON_DEVICE_CANDIDATES[0]], "pushing benchmark_model")
            self.shell(["chmod", "755", ON_DEVICE_CANDIDATES[0]], "chmod")
            return ON_DEVICE_CANDIDATES[0]
        for path in ON_DEVICE_CANDIDATES:
            if self.shell(["ls", path], "looking for benchmark_model", check=False).returncode == 0:
                return path
        raise DeviceUnavailable(self.spec, "a benchmark_model binary (LiteRT's Android build)",
                                f"none given and none at {' or '.join(ON_DEVICE_CANDIDATES)}",
                                fix="adb://SERIAL?benchmark_model=/path/to/android_aarch64_benchmark_model")

    # -- Device ---------------------------------------------------------------------
    def run_batches(self, runner_kind: str, artifact: Artifact, root: str | Path,
                    batches: list[Batch], **runner_options: Any) -> list[Batch]:
        raise DeviceUnavailable(self.spec, "a Python-free tool on the device that returns outputs "
                                "for given inputs", "none: parity on this device was not run "
                                "(benchmark_model times a model, it does not return its outputs)")

    def benchmark_args(self, remote_model: str, *, runs: int, warmup: int, threads: int | None,
                       op_profile: bool, use_gpu: bool = False, use_nnapi: bool = False,
                       use_xnnpack: bool | None = None, extra_args: list[str] | None = None) -> list[str]:
        args = [f"--graph={remote_model}", f"--num_runs={runs}", "--min_secs=0",
                f"--warmup_runs={warmup}", "--warmup_min_secs=0"]
        if threads:
            args.append(f"--num_threads={threads}")
        args += [f"--use_gpu={_flag(use_gpu)}", f"--use_nnapi={_flag(use_nnapi)}"]
        if use_xnnpack is not None:
            args.append(f"--use_xnnpack={_flag(use_xnnpack)}")
        args.append(f"--enable_op_profiling={_flag(op_profile)}")
        return args + list(extra_args or [])

    def profile(self, artifact: Artifact, root: str | Path, *, runs: int = 50, warmup: int = 5,
                threads: int | None = None, op_profile: bool = True, use_gpu: bool = False,
                use_nnapi: bool = False, use_xnnpack: bool | None = None,
                extra_args: list[str] | None = None) -> Profile:
        if artifact.format != "tflite":
            raise DeviceUnavailable(self.spec, "a .tflite artifact (benchmark_model runs LiteRT)",
                                    f"format {artifact.format!r}")
        self.check()
        path = artifact.resolve(root)          # absolute: never read as an adb option
        binary = self._binary()
        remote_model = f"{REMOTE_DIR}/{sha256_of(path)[:16]}.tflite"
        self.shell(["mkdir", "-p", REMOTE_DIR], "mkdir")
        self._call(["push", str(path), remote_model], "pushing the model")
        try:
            args = self.benchmark_args(remote_model, runs=runs, warmup=warmup, threads=threads,
                                       op_profile=op_profile, use_gpu=use_gpu, use_nnapi=use_nnapi,
                                       use_xnnpack=use_xnnpack, extra_args=extra_args)
            proc = self.shell([binary, *args], "benchmark_model", check=False)
        finally:
            self.shell(["rm", "-f", remote_model], "cleanup", check=False)
        parsed = parse_benchmark_output(proc.stdout + "\n" + proc.stderr)
        if parsed.failed or proc.returncode != 0 or parsed.runs is None:
            why = "; ".join(parsed.errors) or " ".join((proc.stderr or proc.stdout).split())[-300:]
            raise DeviceError(f"{self.spec}: benchmark_model failed: {why}")
        return self._to_profile(artifact, parsed, runs=runs, warmup=warmup, threads=threads,
                                size=size_of(path), delegate=_delegate_label(use_gpu, use_nnapi, use_xnnpack))

    def _to_profile(self, artifact: Artifact, parsed: BenchmarkOutput, *, runs: int, warmup: int,
                    threads: int | None, size: int, delegate: str) -> Profile:
        info = self.describe()
        what = ", ".join(x for x in (info.get("soc") or info.get("hardware"),
                                     f"Android {info['android']}" if info.get("android") else "") if x)
        raw = parsed.as_raw()
        raw["runtime"] = f"benchmark_model ({delegate})"
        raw["op_profile_note"] = ("benchmark_model --enable_op_profiling: per-node avg ms x times called"
                                  if parsed.ops_by_node else "op profiling off")
        prof = build_profile(artifact, raw, device=self.spec,
                             measured_on=f"adb device {info.get('model', self.serial)}"
                                         + (f" ({what})" if what else ""),
                             runs=int(parsed.runs.get("count", runs)) if parsed.runs else runs,
                             warmup=warmup, threads=threads or parsed.threads, size_bytes=size,
                             device_info=info)
        prof.latency = parsed.latency()
        prof.notes = ["benchmark_model reports min/avg/max/std (median in newer builds), "
                      "not p90/p99"] + [f"delegation: {d}" for d in parsed.delegation]
        return prof


def _delegate_label(use_gpu: bool, use_nnapi: bool, use_xnnpack: bool | None) -> str:
    parts = [n for n, on in (("GPU", use_gpu), ("NNAPI", use_nnapi)) if on]
    if use_xnnpack is not None:
        parts.append("XNNPACK" if use_xnnpack else "no XNNPACK")
    return ", ".join(parts) or "CPU, default delegates"
