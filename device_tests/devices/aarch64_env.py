"""The emulated aarch64 environment: a Python, the runtimes' aarch64 wheels, a counter plugin.

Everything lives in one cache folder (``$MDEPLOY_CACHE/aarch64``, default
``~/.cache/mdeploy/aarch64``) and is built by ``provision()`` (``make arm-env`` or
``mdeploy doctor --fix arm``) from Debian and PyPI only, without root inside the
emulator and without a chroot:

* ``rootfs/``: Debian bookworm arm64 ``minbase`` + ``python3`` (Python 3.11, matching
  the host's cp311 wheels), whose ``.deb`` files ``debootstrap --download-only`` fetches
  and ``dpkg-deb -x`` unpacks; ``qemu-aarch64 -L rootfs`` runs it.
* ``site/``: the aarch64 manylinux wheels of the host's exact onnxruntime,
  ai-edge-litert, numpy, torch and executorch versions (and their dependencies,
  constrained by ``requirements.txt``), installed by the host pip with
  ``--platform``/``--target``. ExecuTorch's Python runtime (``executorch.runtime``, the
  ``_portable_lib`` binding an app's C++ runtime is built from) links ``libtorch``, so
  ``.pte`` programs need torch in the guest. PyPI's aarch64 torch wheel is a CUDA 13
  build: its shared objects link cuBLAS, cuDNN, NCCL, ... and only load with NVIDIA's
  aarch64 library wheels beside them (no GPU is used; download.pytorch.org's ``+cpu``
  aarch64 wheel would avoid them but is not a PyPI file). Measured here: ``site/`` is
  4.9 GB instead of 0.18 GB (2.7 GB of wheels downloaded) and building it took 1 min 56 s,
  against 45 s for the whole environment without torch; kept in the default environment
  because ExecuTorch is a default export format.
* ``plugin/libinsn_count.so``: ``insn_count.c`` compiled against ``qemu-plugin.h``
  from the Debian source package of the installed qemu (fetched with a private apt
  sources folder, so the system's apt configuration is untouched).
* ``cpus/<cpu>/``: a prefix per emulated CPU whose ``proc/cpuinfo`` describes that
  CPU (qemu-user 7.2 shows the host's x86 ``/proc/cpuinfo`` to the guest, and the
  runtimes' CPU detection crashes on it); qemu's ``-L`` lookup finds that file first.
  Its MIDR part number is the CPU's and its feature list is read from the HWCAP bits
  qemu itself reports for that model, so the two never disagree.

Never ``-cpu max``: its SVE/SME paths gave wrong int8 results here.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

SUITE = "bookworm"                      # its python3 is 3.11, like the pinned host wheels
MIRROR = os.environ.get("MDEPLOY_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# Installed with their dependencies. torchao, ruamel.yaml and tabulate are what
# executorch.runtime imports beyond torch (requirements-nodeps.txt: its wheel's own
# dependency list is test-only and x86-only packages).
WHEELS = ("onnxruntime", "ai-edge-litert", "numpy", "torch", "torchao", "ruamel.yaml", "tabulate")
NODEPS_WHEELS = ("executorch",)
# NVIDIA's aarch64 library wheels that torch pulls in are tagged 2_25 (CUPTI) and 2_18 (NCCL).
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_25_aarch64",
             "manylinux_2_18_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
FIX_COMMAND = "make arm-env"
SYSTEM_PACKAGES = ("qemu-user", "debootstrap", "gcc", "xz-utils")

# (implementer, part) of the CPUs qemu-aarch64 7.2 models; "max" deliberately absent.
CPUS: dict[str, tuple[int, int]] = {
    "cortex-a35": (0x41, 0xD04), "cortex-a53": (0x41, 0xD03), "cortex-a57": (0x41, 0xD07),
    "cortex-a72": (0x41, 0xD08), "cortex-a76": (0x41, 0xD0B), "neoverse-n1": (0x41, 0xD0C),
    "a64fx": (0x46, 0x001),
}
HWCAP_NAMES = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
               "jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc "
               "flagm ssbs sb paca pacg").split()

Log = Callable[[str], None]


def cache_dir() -> Path:
    base = os.environ.get("MDEPLOY_CACHE") or Path.home() / ".cache" / "mdeploy"
    return Path(base) / "aarch64"


def qemu_binary() -> str | None:
    """The dynamic ``qemu-aarch64`` (the ``-static`` build cannot load plugins)."""
    return shutil.which("qemu-aarch64")


def pins() -> dict[str, str]:
    """The host's versions of the guest's wheels. A local version label is dropped: the
    host's ``torch 2.13.0+cpu`` is PyPI's ``torch 2.13.0`` for aarch64 (same sources, a
    different build)."""
    out = {}
    for dist in WHEELS + NODEPS_WHEELS:
        try:
            out[dist] = metadata.version(dist).split("+", 1)[0]
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class EnvStatus:
    cache: Path
    qemu: str | None
    rootfs: bool
    python: str | None            # e.g. "3.11"
    wheels: dict[str, str]        # installed in site/
    wheels_ok: bool
    plugin: bool
    missing_tools: list[str]

    @property
    def ready(self) -> bool:
        return bool(self.qemu) and self.rootfs and self.wheels_ok and self.plugin

    def problems(self) -> list[str]:
        out = []
        if not self.qemu:
            out.append("qemu-aarch64 not found")
        if not self.rootfs:
            out.append(f"no aarch64 Python under {self.cache / 'rootfs'}")
        if not self.wheels_ok:
            want = pins()
            out.append(f"aarch64 wheels {self.wheels or 'missing'} != host {want}")
        if not self.plugin:
            out.append("instruction-count plugin not built")
        return out


def rootfs_python(cache: Path) -> str | None:
    link = cache / "rootfs" / "usr" / "bin" / "python3"
    try:
        name = os.readlink(link)            # "python3.11"
    except OSError:
        return None
    return name.replace("python", "") if (link.parent / name).exists() else None


def _site_stamp(cache: Path) -> dict[str, str]:
    stamp = cache / "site" / ".mdeploy-wheels"
    if not stamp.exists():
        return {}
    return dict(line.split("==", 1) for line in stamp.read_text().split() if "==" in line)


def status(cache: Path | None = None) -> EnvStatus:
    cache = cache or cache_dir()
    wheels = _site_stamp(cache)
    tools = [t for t, exe in (("qemu-user", "qemu-aarch64"), ("debootstrap", "debootstrap"),
                              ("gcc", "gcc"), ("xz-utils", "xz"))
             if not shutil.which(exe) and not Path("/usr/sbin", exe).exists()]
    return EnvStatus(cache=cache, qemu=qemu_binary(), rootfs=rootfs_python(cache) is not None,
                     python=rootfs_python(cache), wheels=wheels,
                     wheels_ok=bool(wheels) and wheels == pins(),
                     plugin=(cache / "plugin" / "libinsn_count.so").exists(), missing_tools=tools)


# -- provisioning ----------------------------------------------------------------

def _run(cmd: list[str], log: Log, **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-10:])
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{tail}")
    return proc


def _debootstrap() -> str:
    return shutil.which("debootstrap") or "/usr/sbin/debootstrap"


def provision_rootfs(cache: Path, log: Log) -> None:
    """Download the arm64 .debs of minbase + python3 and unpack them (about 85 MB, 177 MB)."""
    if rootfs_python(cache):
        log(f"rootfs: present ({cache / 'rootfs'})")
        return
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".rootfs-") as tmp:
        dl = Path(tmp) / "dl"
        # --download-only needs no chroot and runs no maintainer scripts; it does need root.
        _run([_debootstrap(), "--arch=arm64", "--variant=minbase", "--include=python3",
              "--download-only", SUITE, str(dl), MIRROR], log)
        debs = sorted((dl / "var" / "cache" / "apt" / "archives").glob("*.deb"))
        if not debs:
            raise RuntimeError("debootstrap downloaded no packages")
        staged = Path(tmp) / "rootfs"
        staged.mkdir()
        log(f"unpacking {len(debs)} packages")
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(staged)], lambda m: None)
        if not (staged / "usr" / "bin" / "python3").exists():
            raise RuntimeError("the unpacked rootfs has no usr/bin/python3")
        target = cache / "rootfs"
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)


def provision_wheels(cache: Path, log: Log) -> None:
    want = pins()
    if _site_stamp(cache) == want and want:
        log(f"wheels: present ({', '.join(f'{k}=={v}' for k, v in want.items())})")
        return
    py = rootfs_python(cache) or "3.11"
    abi = "cp" + py.replace(".", "")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".site-") as tmp:
        staged = Path(tmp) / "site"
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-warn-conflicts",
               "--disable-pip-version-check", "--only-binary=:all:", "--python-version", py,
               "--implementation", "cp", "--abi", abi, "--target", str(staged)]
        for plat in PLATFORMS:
            cmd += ["--platform", plat]
        constraints = Path(__file__).resolve().parents[2] / "requirements.txt"
        if constraints.exists():
            cmd += ["-c", str(constraints)]
        with_deps = [f"{k}=={v}" for k, v in want.items() if k not in NODEPS_WHEELS]
        no_deps = [f"{k}=={v}" for k, v in want.items() if k in NODEPS_WHEELS]
        _run(cmd + with_deps, log)
        if no_deps:
            # A second pip into the same target: the executorch wheel holds only its own
            # package folder, so nothing the first one installed is replaced.
            _run(cmd + ["--no-deps"] + no_deps, log)
        (staged / ".mdeploy-wheels").write_text("".join(f"{k}=={v}\n" for k, v in want.items()))
        target = cache / "site"
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)


def _qemu_source_version() -> str:
    """Debian source version of the installed qemu-user (e.g. ``1:7.2+dfsg-7+deb12u18``)."""
    out = subprocess.run(["dpkg-query", "-W", "-f=${source:Version}", "qemu-user"],
                         capture_output=True, text=True)
    return out.stdout.strip()


def _fetch_plugin_header(cache: Path, log: Log) -> Path:
    """``qemu-plugin.h`` from the qemu source package, via a private apt sources folder."""
    inc = cache / "plugin" / "include"
    header = inc / "qemu-plugin.h"
    if header.exists():
        return inc
    src = cache / "plugin" / "src"
    apt = cache / "plugin" / "apt"
    for d in (src, apt / "parts", apt / "lists" / "partial"):
        d.mkdir(parents=True, exist_ok=True)
    key = "/usr/share/keyrings/debian-archive-keyring.gpg"
    signed = f"[signed-by={key}] " if Path(key).exists() else ""
    (apt / "sources.list").write_text(
        f"deb-src {signed}{MIRROR} {SUITE} main\n"
        f"deb-src {signed}{MIRROR} {SUITE}-updates main\n"
        f"deb-src {signed}{MIRROR.replace('/debian', '/debian-security')} {SUITE}-security main\n")
    opts = [f"-o=Dir::Etc::SourceList={apt / 'sources.list'}", f"-o=Dir::Etc::SourceParts={apt / 'parts'}",
            f"-o=Dir::State::Lists={apt / 'lists'}", "-o=Debug::NoLocking=1", "-q"]
    _run(["apt-get", *opts, "update"], log)
    version = _qemu_source_version()
    spec = f"qemu={version}" if version else "qemu"
    try:
        _run(["apt-get", *opts, "source", "--download-only", spec], log, cwd=src)
    except RuntimeError:
        _run(["apt-get", *opts, "source", "--download-only", "qemu"], log, cwd=src)
    tarballs = sorted(src.glob("qemu_*.orig.tar.*"))
    if not tarballs:
        raise RuntimeError("apt-get source fetched no qemu orig tarball")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        _run(["tar", "-xf", str(tarballs[-1]), "-C", tmp, "--wildcards", "*/include/qemu/qemu-plugin.h"], log)
        found = next(Path(tmp).rglob("qemu-plugin.h"))
        inc.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found, header)
    shutil.rmtree(src, ignore_errors=True)           # 24 MB of source and 20 MB of apt lists
    shutil.rmtree(apt, ignore_errors=True)
    return inc


def provision_plugin(cache: Path, log: Log) -> None:
    so = cache / "plugin" / "libinsn_count.so"
    source = Path(__file__).with_name("insn_count.c")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    stamp = so.with_suffix(".src")
    if so.exists() and stamp.exists() and stamp.read_text() == digest:
        log(f"plugin: present ({so})")
        return
    inc = _fetch_plugin_header(cache, log)
    tmp = so.with_name(f".{so.name}.tmp")
    _run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", f"-I{inc}", "-o", str(tmp), str(source)], log)
    os.replace(tmp, so)
    stamp.write_text(digest)


def provision(cache: Path | None = None, log: Log = lambda m: None) -> EnvStatus:
    """Build whatever is missing; idempotent. System tools must already be installed."""
    cache = cache or cache_dir()
    st = status(cache)
    if st.missing_tools:
        raise RuntimeError(f"missing system packages {', '.join(st.missing_tools)}: "
                           f"apt-get install -y {' '.join(SYSTEM_PACKAGES)}")
    cache.mkdir(parents=True, exist_ok=True)
    provision_rootfs(cache, log)
    provision_wheels(cache, log)
    provision_plugin(cache, log)
    return status(cache)


# -- per-CPU prefix with a matching /proc/cpuinfo ------------------------------------

def _hwcaps(cache: Path, cpu: str) -> int:
    """AT_HWCAP that qemu reports for ``cpu``, read by the emulated Python itself."""
    code = "import ctypes;l=ctypes.CDLL(None);l.getauxval.restype=ctypes.c_ulong;print(l.getauxval(16))"
    rootfs = cache / "rootfs"
    out = subprocess.run([qemu_binary() or "qemu-aarch64", "-L", str(rootfs), "-cpu", cpu,
                          str(rootfs / "usr" / "bin" / "python3"), "-I", "-S", "-c", code],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"probing HWCAP for {cpu} failed: {out.stderr.strip()[-300:]}")
    return int(out.stdout.strip())


def cpuinfo_text(cpu: str, hwcap: int, ncpu: int) -> str:
    implementer, part = CPUS[cpu]
    features = " ".join(n for i, n in enumerate(HWCAP_NAMES) if hwcap >> i & 1)
    block = (f"BogoMIPS\t: 50.00\nFeatures\t: {features}\nCPU implementer\t: {implementer:#04x}\n"
             f"CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: {part:#05x}\nCPU revision\t: 0\n")
    return "".join(f"processor\t: {i}\n{block}\n" for i in range(ncpu))


# Only what the guest Python needs. qemu's -L lookup prefers any path that exists under
# the prefix, so a /tmp or /root there would shadow the host folders the jobs live in.
PREFIX_ENTRIES = ("bin", "etc", "lib", "sbin", "usr")


def cpu_prefix(cpu: str, cache: Path | None = None) -> Path:
    """A ``-L`` prefix for ``cpu``: the rootfs's system folders as symlinks, plus its
    own ``proc/cpuinfo``. Built once per CPU model."""
    cache = cache or cache_dir()
    if cpu not in CPUS:
        raise KeyError(cpu)
    prefix = cache / "cpus" / cpu
    cpuinfo = prefix / "proc" / "cpuinfo"
    if cpuinfo.exists():
        return prefix
    rootfs = cache / "rootfs"
    staged = Path(tempfile.mkdtemp(dir=cache, prefix=f".cpu-{cpu}-"))
    try:
        for name in PREFIX_ENTRIES:
            if (rootfs / name).exists():
                (staged / name).symlink_to(rootfs / name)
        (staged / "proc").mkdir()
        (staged / "proc" / "cpuinfo").write_text(cpuinfo_text(cpu, _hwcaps(cache, cpu),
                                                              len(os.sched_getaffinity(0))))
        prefix.parent.mkdir(parents=True, exist_ok=True)
        if prefix.exists():
            shutil.rmtree(prefix)
        os.replace(staged, prefix)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    return prefix
