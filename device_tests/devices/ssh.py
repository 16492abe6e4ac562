"""``ssh://[user@]host[:port]``: an ARM Linux board (Raspberry Pi, Jetson, a Graviton box).

The job folder (model, inputs, the runner bundle) is copied with ``scp``, the real
runner runs there under the board's own Python (which needs numpy and the runtime:
``pip install onnxruntime ai-edge-litert``), and ``result.json``/``outputs.npz`` come
back. Latency, memory and per-op figures are measured on the board itself.

Every command is an argument list. ``ssh`` joins the remote command's arguments with
spaces and hands them to the remote shell, so each remote argument is quoted with
``shlex.quote``: a path or option from the user can never become shell syntax there.
Host keys are checked (``StrictHostKeyChecking=yes`` when a ``known_hosts`` file is
given; otherwise the user's ssh configuration decides), and ``BatchMode`` forbids
password prompts, so a missing key fails at once instead of hanging.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from device_tests.devices.base import Batch, Device, DeviceError, DeviceUnavailable, check_word
from models.errors import InputError

_HOST = re.compile(r"^[A-Za-z0-9_.:%-]+$")           # a name, IPv4 or IPv6 (with a zone)
_USER = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*$")
from device_tests.devices.bundle import ENTRY, build_bundle, prepare_job, read_outputs, read_result
from device_tests.profile import Profile, build_profile
from exporters.artifact import Artifact, size_of

_DESCRIBE = ("import json,os,platform;d={'machine':platform.machine(),'system':platform.system(),"
             "'release':platform.release(),'python':platform.python_version(),'cpus':os.cpu_count()}\n"
             "for p,k in (('/proc/device-tree/model','board'),):\n"
             " try: d[k]=open(p).read().strip('\\x00\\n ')\n except OSError: pass\n"
             "print(json.dumps(d))")


class SshDevice(Device):
    kind = "ssh"

    def __init__(self, host: str, *, user: str | None = None, port: int = 22, python: str = "python3",
                 identity: str | None = None, known_hosts: str | None = None,
                 ssh_options: list[str] | None = None, timeout: float = 1800,
                 ssh: str = "ssh", scp: str = "scp") -> None:
        spec = f"ssh://{host}"
        check_word(host, "host name", spec, _HOST)
        check_word(user, "user name", spec, _USER)
        check_word(python, "remote python path", spec)
        if isinstance(port, bool) or not 0 < int(port) < 65536:
            raise InputError(spec, "a port from 1 to 65535", repr(port))
        for what, path in (("identity file", identity), ("known_hosts file", known_hosts)):
            if path is not None and (not path or any(c.isspace() or ord(c) < 32 for c in path)):
                raise InputError(spec, f"an {what} path without spaces or control characters", repr(path)[:60])
        self.host, self.user, self.port, self.python = host, user, int(port), python
        self.identity = str(Path(identity).expanduser()) if identity else None
        self.known_hosts = str(Path(known_hosts).expanduser()) if known_hosts else None
        self.ssh_options = list(ssh_options or [])
        self.timeout = timeout
        self.ssh, self.scp = ssh, scp

    @property
    def spec(self) -> str:
        who = f"{self.user}@" if self.user else ""
        return f"ssh://{who}{self.host}" + (f":{self.port}" if self.port != 22 else "")

    @property
    def _dest(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" if self.user else host

    def _options(self) -> list[str]:
        opts = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=20"]
        if self.identity:
            opts += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            opts += ["-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes"]
        for o in self.ssh_options:
            opts += ["-o", o]
        return opts

    def _call(self, cmd: list[str], what: str) -> subprocess.CompletedProcess:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout,
                                  stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise DeviceUnavailable(self.spec, f"the {cmd[0]} client", "not installed",
                                    fix="apt-get install -y openssh-client") from None
        except subprocess.TimeoutExpired:
            raise DeviceError(f"{self.spec}: {what} gave no answer in {self.timeout:.0f} s") from None
        if proc.returncode == 255 and cmd[0] == self.ssh:
            raise DeviceUnavailable(self.spec, "a reachable ssh host that accepts our key",
                                    " ".join(proc.stderr.split())[:300] or "ssh exit 255")
        return proc

    def remote(self, argv: list[str], what: str = "remote command") -> subprocess.CompletedProcess:
        """Run ``argv`` on the host; each argument is quoted for the remote shell."""
        remote_cmd = " ".join(shlex.quote(a) for a in argv)
        # "--" before the destination: whatever the host says, ssh never reads it as an option
        return self._call([self.ssh, "-p", str(self.port), *self._options(), "--", self._dest,
                           remote_cmd], what)

    def _scp(self, sources: list[str], target: str, what: str) -> None:
        proc = self._call([self.scp, "-q", "-r", "-P", str(self.port), *self._options(),
                           "--", *sources, target], what)
        if proc.returncode != 0:
            raise DeviceError(f"{self.spec}: {what} failed: {' '.join(proc.stderr.split())[:300]}")

    def _job(self, job: dict[str, Any], artifact: Artifact, root: str | Path,
             batches: list[Batch] | None) -> tuple[dict[str, Any], list[Batch] | None]:
        """Send a job, run it remotely, fetch its result (and outputs)."""
        with tempfile.TemporaryDirectory(prefix="mdeploy-ssh-") as tmp_name:
            tmp = Path(tmp_name)
            local_job = tmp / "job"
            prepare_job(local_job, artifact, root, job, batches)
            build_bundle(local_job / "bundle")
            made = self.remote(["mktemp", "-d", "/tmp/mdeploy.XXXXXXXX"], "mktemp")
            remote_tmp = made.stdout.strip()
            if made.returncode != 0 or not remote_tmp.startswith("/tmp/mdeploy."):
                raise DeviceError(f"{self.spec}: could not make a remote folder: {made.stderr.strip()[:200]}")
            try:
                self._scp([str(local_job)], f"{self._dest}:{remote_tmp}/", "copying the job")
                rjob = f"{remote_tmp}/job"
                proc = self.remote(["env", f"PYTHONPATH={rjob}/bundle", self.python,
                                    f"{rjob}/bundle/{ENTRY}", rjob], "the runner")
                back = tmp / "back"
                back.mkdir()
                wanted = [f"{self._dest}:{rjob}/result.json"]
                if job["op"] == "run" and proc.returncode == 0:
                    wanted.append(f"{self._dest}:{rjob}/outputs.npz")
                try:
                    self._scp(wanted, str(back), "fetching the result")
                except DeviceError:
                    if not proc.returncode:
                        raise
            finally:
                self.remote(["rm", "-rf", "--", remote_tmp], "cleanup")
            result = read_result(back, self.spec, proc.stderr)
            outputs = read_outputs(back, len(batches)) if job["op"] == "run" and batches else None
            return result, outputs

    # -- Device ---------------------------------------------------------------------
    def run_batches(self, runner_kind: str, artifact: Artifact, root: str | Path,
                    batches: list[Batch], **runner_options: Any) -> list[Batch]:
        _, outputs = self._job({"op": "run", "runner": runner_kind, "runner_options": runner_options},
                               artifact, root, batches)
        return outputs or []

    def profile(self, artifact: Artifact, root: str | Path, *, runs: int = 50, warmup: int = 5,
                threads: int | None = None, op_profile: bool = True) -> Profile:
        result, _ = self._job({"op": "profile", "runs": runs, "warmup": warmup, "threads": threads,
                                  "op_profile": op_profile, "markers": False}, artifact, root, None)
        host = result.get("host", {})
        what = host.get("board") or host.get("cpu") or ""
        return build_profile(artifact, result["raw"], device=self.spec,
                             measured_on=f"{self.spec} ({host.get('machine', '?')}"
                                         + (f", {what}" if what else "") + ")",
                             runs=runs, warmup=warmup, threads=threads,
                             size_bytes=size_of(artifact.resolve(root)),
                             device_info={**host, "versions": result.get("versions", {})})

    def describe(self) -> dict[str, Any]:
        proc = self.remote([self.python, "-c", _DESCRIBE], "describe")
        if proc.returncode != 0:
            raise DeviceError(f"{self.spec}: {self.python} failed: {proc.stderr.strip()[-300:]}")
        return {"kind": self.kind, "spec": self.spec, **json.loads(proc.stdout)}
