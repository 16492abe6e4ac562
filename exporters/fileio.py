"""Atomic writes: a failed stage leaves no half-written file and overwrites nothing.

Everything the pipeline writes goes to a temporary name in the same folder and is
renamed into place (``os.replace`` is atomic on POSIX within one filesystem).
Whole output folders are built in a temporary sibling and swapped in at the end.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from models.errors import InputError


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a tool that writes files itself
    (``torch.save``, ``onnx.save``, ``mlmodel.save``); renamed into place on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def check_writable_output(out_dir: str | Path, force: bool) -> None:
    """Refuse to touch an existing, non-empty output folder unless ``force``.

    Also runs ``recover_output`` first, so a result a killed ``--force`` swap left aside
    is back in place before it is judged (and protected without ``--force``)."""
    out = Path(out_dir)
    check_output_location(out)
    recover_output(out)        # a previous kill's debris first: a restored result counts
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise InputError(out, "a new or empty output folder (or --force)",
                         "an existing folder with results in it")


_PSEUDO_FS = (Path("/proc"), Path("/sys"), Path("/dev"))


def check_output_location(out_dir: str | Path) -> None:
    """An output folder must be creatable: not under a file, not on a kernel pseudo file
    system (``/proc``, ``/sys``, ``/dev``), its nearest existing ancestor a writable folder.
    Checked before any work, so the failure is one line, not an ``OSError`` at the end."""
    out = Path(out_dir)
    resolved = out.resolve()
    if any(resolved == p or p in resolved.parents for p in _PSEUDO_FS):
        raise InputError(out, "an output folder on a real file system", f"a path under /{resolved.parts[1]}")
    if out.exists() and not out.is_dir():
        raise InputError(out, "an output folder", "a file")
    ancestor = resolved
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(out, "an output folder", f"a path under the file {ancestor}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(out, "an output folder you can write", f"no write permission in {ancestor}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a staging folder of a live process is its work
    in progress, not debris)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:        # someone else's live process
        return True
    return True


_OLD_RE = re.compile(r"\.old(\d+)$")
_STAGING_RE = re.compile(r"\.(\d+)\.[^.]*\.staging$")


def recover_output(out_dir: str | Path) -> None:
    """Undo what a killed process left beside ``out_dir``, before anything else looks at it.

    A kill between the two renames of a ``--force`` swap leaves no ``NAME`` and the previous
    result as ``.NAME.old<pid>``: it is renamed back, so the previous result is never lost. A
    kill after the swap leaves ``NAME`` (complete) and the old copy: the copy is deleted.
    Staging folders ``.NAME.<pid>.*.staging`` of dead processes are deleted. Anything of a
    live process is left alone (it may be mid-swap)."""
    out = Path(out_dir)
    parent = out.parent
    if not parent.is_dir():
        return
    prefix = f".{out.name}."
    try:
        entries = [e for e in parent.iterdir() if e.name.startswith(prefix)]
    except OSError:
        return
    for entry in sorted(entries):
        rest = entry.name[len(out.name) + 1:]
        old, staging = _OLD_RE.fullmatch(rest), _STAGING_RE.fullmatch(rest)
        match = old or staging
        if match is None or pid_alive(int(match.group(1))):
            continue
        if old and not os.path.lexists(out):
            os.replace(entry, out)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()


_ANY_STAGING_RE = re.compile(r"\..+\.(\d+)\.[^.]*\.staging")


def remove_dead_staging(parent: str | Path, keep: str | Path | None = None) -> None:
    """Delete the staging folders of dead processes in ``parent``, whatever output they were
    for. ``recover_output`` only sweeps those of one name; a folder of runs needs this
    too, since every ``mdeploy run`` picks a new name (a killed run's staging folder would
    otherwise stay for ever). A live process's folder is its work in progress: left alone,
    and so is ``keep`` (the killed run ``mdeploy run --resume`` is about to reuse)."""
    folder = Path(parent)
    try:
        entries = list(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        return
    for entry in entries:
        match = _ANY_STAGING_RE.fullmatch(entry.name)
        if keep is not None and entry == Path(keep):
            continue
        if match and entry.is_dir() and not entry.is_symlink() and not pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def check_distinct_from_inputs(out_dir: str | Path, *inputs: str | Path | None,
                               flag: str = "--out") -> None:
    """``--out`` may not be, contain, or lie inside an input folder (or be or contain an
    input file): swapping it in with ``--force`` would delete the input (``quantize DIR
    --out DIR --force`` lost ``model.onnx``), and an output inside an input folder would be
    read back as input. Inputs that are not existing paths (``mnist``) are skipped."""
    out = Path(out_dir).resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        src = Path(given).resolve()
        if out == src:
            how = "the input"
        elif out in src.parents:
            how = "a folder holding the input"
        elif src.is_dir() and src in out.parents:
            how = "inside the input folder"
        else:
            continue
        raise InputError(flag, "an output folder apart from the inputs", f"{out_dir}: {how} {given}")


@contextlib.contextmanager
def scratch_tempdir() -> Iterator[Path]:
    """Point this process's temporary files (``tempfile``, and ``TMPDIR`` for the tools it
    starts) at one folder ``mdeploy-<pid>-*`` that is removed at exit, and first remove
    such folders of dead processes: a killed export otherwise leaves converter scratch
    files in ``$TMPDIR`` that nothing ever deletes."""
    base = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for entry in base.iterdir():
            m = re.fullmatch(r"mdeploy-(\d+)-[^/]*", entry.name)
            if m and entry.is_dir() and not entry.is_symlink() and not pid_alive(int(m.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"mdeploy-{os.getpid()}-", dir=base))
    saved_dir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(scratch)
    os.environ["TMPDIR"] = str(scratch)
    try:
        yield scratch
    finally:
        tempfile.tempdir = saved_dir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def staged_output_dir(out_dir: str | Path, force: bool = False) -> Iterator[Path]:
    """Build an output folder in a temporary sibling; swap it in only on success.

    On failure the previous folder (if any) is untouched and the staging folder removed.
    The one helper every command that writes a folder uses (export, quantize, train, run).
    Crash safety: the staging folder is named ``.NAME.<pid>.*.staging`` and a replaced
    folder is first renamed to ``.NAME.old<pid>``, then the new one renamed in, then the
    old one deleted; a process killed at any point leaves either the old or the new folder
    complete, and ``recover_output`` (run first here and by ``check_writable_output``)
    puts things right on the next start.
    """
    out = Path(out_dir)
    check_writable_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".staging", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)    # the folder a user gets, not mkdtemp's private 0700
    try:
        yield stage
        _fsync_dir(out.parent)
        if not force and out.is_dir() and any(out.iterdir()):
            # filled by someone else while this command worked: still not ours to replace
            raise InputError(out, "a new or empty output folder (or --force)",
                             "an existing folder with results in it (written while this command ran)")
        if os.path.lexists(out):
            old = out.parent / f".{out.name}.old{os.getpid()}"
            os.replace(out, old)
            os.replace(stage, out)
            _fsync_dir(out.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, out)
            _fsync_dir(out.parent)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (a power cut must not undo the swap's order)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
