"""SshDevice against a real OpenSSH server the test starts on 127.0.0.1 (a free port).

The "remote" is this machine: the test's own key, a known_hosts file it writes (so
StrictHostKeyChecking=yes is exercised), and the venv's Python as the remote Python,
running the real ONNX Runtime runner copied over as the bundle. Needs Debian's
openssh-server (`apt-get install -y openssh-server`; `make test-deps` installs it);
without sshd the test skips and says so.
"""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests import device_helpers as h

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
pytestmark = pytest.mark.skipif(SSHD is None or shutil.which("ssh") is None,
                                reason="needs OpenSSH (fix: apt-get install -y openssh-server "
                                       "openssh-client, or `make test-deps`)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "user.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\nLogLevel ERROR\n")
    if os.geteuid() == 0 and not Path("/run/sshd").is_dir():
        Path("/run/sshd").mkdir(mode=0o755, parents=True)   # sshd's privilege-separation folder
    host_key = (d / "host.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 20
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited: {proc.stdout.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    yield {"port": port, "dir": d}
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def device(sshd):
    from device_tests.devices.ssh import SshDevice
    return SshDevice("127.0.0.1", user=getpass.getuser(), port=sshd["port"], python=sys.executable,
                     identity=str(sshd["dir"] / "user"), known_hosts=str(sshd["dir"] / "known_hosts"))


@pytest.fixture(scope="module")
def onnx_art(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    return h.tiny_onnx(folder), folder


def test_spec_round_trip(sshd):
    from device_tests.devices import parse_device
    spec = f"ssh://{getpass.getuser()}@127.0.0.1:{sshd['port']}"
    dev = parse_device(spec + f"?python={sys.executable}&identity={sshd['dir'] / 'user'}"
                              f"&known_hosts={sshd['dir'] / 'known_hosts'}")
    assert dev.spec == spec
    info = dev.describe()
    assert info["machine"] == os.uname().machine and info["python"]


def test_remote_runner_matches_local(device, onnx_art):
    from device_tests.devices.local import LocalDevice
    art, folder = onnx_art
    batches = [h.sample_input(0), h.sample_input(1)]
    remote = device.run_batches("onnxruntime", art, folder, batches)
    local = LocalDevice().run_batches("onnxruntime", art, folder, batches)
    assert len(remote) == 2
    for r, l in zip(remote, local):
        # Same machine, same ORT build, same runner code: the numbers must be identical.
        np.testing.assert_array_equal(r["logits"], l["logits"])
    assert not np.array_equal(remote[0]["logits"], remote[1]["logits"])


def test_remote_profile(device, onnx_art):
    art, folder = onnx_art
    p = device.profile(art, folder, runs=5, warmup=1, threads=1)
    assert p.device == device.spec and p.measured_on.startswith(device.spec)
    assert p.latency is not None and p.latency.count == 5
    assert 0 < p.latency.min_ms <= p.latency.p50_ms <= p.latency.p99_ms
    assert p.init_ms > 0 and p.first_inference_ms > 0 and p.peak_memory_bytes is not None
    assert p.artifact_size_bytes == art.size_bytes
    assert {o.op_type for o in p.ops_by_type} >= {"Conv"}
    assert p.device_info["versions"]["onnxruntime"]


def test_hostile_path_stays_an_argument(device, tmp_path):
    """A file name with shell syntax reaches the remote as one quoted argument."""
    evil = tmp_path / "x; touch pwned"
    proc = device.remote(["ls", "-d", str(evil)])
    assert proc.returncode != 0                     # no such file: ls got the whole name
    assert not Path.home().joinpath("pwned").exists() and not Path("pwned").exists()


def test_unreachable_host_is_one_line_error(tmp_path):
    from device_tests.devices.base import DeviceUnavailable
    from device_tests.devices.ssh import SshDevice
    dev = SshDevice("127.0.0.1", port=_free_port(), known_hosts=str(tmp_path / "kh"))
    with pytest.raises(DeviceUnavailable, match="reachable ssh host"):
        dev.describe()
