"""``mdeploy run --resume``: reuse the finished stages of an earlier or killed run.

Why: training and quantizing are most of a run's time, and a run killed in a later stage
(or rerun with only its verify settings changed) used to train again from scratch. Each
reusable stage (train, export, quantize, and the two demonstrations repvgg and
sparse_shift) writes a marker when its folder is complete: ``<folder>/.stage.json`` with
the stage's **key**, the hash of everything its result depends on (its config section, the
key of the stage before it, the user's model factory), and its record for the report
(quantize's report is its own ``quantization_report.json``, a demonstration's its
``summary.json``, read back). The demonstrations train their own models from their own
section alone, so that section is their whole key: they are reused whatever the main
chain did, and a demonstration whose checks failed is run again rather than reused.
``--resume`` looks at the newest run of the same name, finished or killed (a killed run's
staging folder: each stage inside it was renamed into place only when complete, so a
stage folder there is whole), copies each stage whose key is unchanged into the new run,
and runs the rest. A stage whose key changed is rerun, and so is every stage of the train ->
export -> quantize chain after it.

The marker is JSON read with a size bound; it names nothing that is imported or executed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from models.errors import InputError

MARKER = ".stage.json"
MARKER_VERSION = 1
MAX_MARKER_BYTES = 5_000_000
REUSABLE = ("train", "export", "quantized", "repvgg", "sparse_shift")     # stage folders


def stage_key(stage: str, *parts: Any) -> str:
    """The hash of what a stage's result depends on (JSON of ``parts``, keys sorted)."""
    text = json.dumps([MARKER_VERSION, stage, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _run_names(name: str) -> re.Pattern[str]:
    stamp = r"\d{8}-\d{6}-" + re.escape(name) + r"(?:-\d+)?"
    return re.compile(rf"(?:{stamp}|\.{stamp}\.\d+\.[^.]*\.staging)")


def find_previous(parent: Path, name: str, chosen: str | None = None) -> Path | None:
    """The run folder to resume from: ``chosen`` (a folder name under ``parent``), else the
    newest run of this ``name`` there, finished or left by a killed run (its staging
    folder). None when there is none."""
    if chosen:
        path = parent / chosen
        if Path(chosen).name != chosen or not path.is_dir() or path.is_symlink():
            raise InputError("--resume", f"the name of a run folder in {parent}", repr(chosen))
        return path
    pattern = _run_names(name)
    try:
        runs = [p for p in parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return None
    return max(runs, key=lambda p: p.stat().st_mtime, default=None)


def mark_done(folder: Path, stage: str, key: str, record: dict[str, Any], seconds: float) -> None:
    """Record that ``folder`` holds the complete result of ``stage`` for ``key``."""
    from exporters.fileio import atomic_write_text
    atomic_write_text(folder / MARKER, json.dumps({"version": MARKER_VERSION, "stage": stage, "key": key,
                                                   "seconds": seconds, "record": record}, indent=1))


def reusable(previous: Path | None, stage: str, key: str) -> dict[str, Any] | None:
    """The marker of ``previous/stage`` when it was made for ``key``, else None."""
    if previous is None:
        return None
    data = read_stage_json(previous / stage / MARKER)
    ok = isinstance(data, dict) and data.get("version") == MARKER_VERSION and data.get("stage") == stage \
        and data.get("key") == key and isinstance(data.get("record"), dict)
    return data if ok else None


def read_stage_json(path: Path) -> Any:
    """The JSON in ``path`` (a regular file, not a link, at most ``MAX_MARKER_BYTES``), or
    None when it is not there or not readable: the stage then runs again."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_MARKER_BYTES:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def relocate_files(stage: Path, old_dir: Path, new_dir: Path) -> None:
    """The JSON files the stages wrote in ``stage`` (manifests, summaries) name the folder
    they were written in, ``old_dir`` (a run's staging folder, or the run a stage is adopted
    from); rewrite them (atomically) to name the run folder ``new_dir``."""
    from exporters.fileio import atomic_write_text
    old, new = str(old_dir), str(new_dir)
    for path in stage.rglob("*.json"):
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 50_000_000:
            continue
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
        if old in text:
            atomic_write_text(path, text.replace(old + os.sep, new + os.sep).replace(f'"{old}"', f'"{new}"'))


def adopt(previous: Path, stage: str, run_dir: Path) -> Path:
    """Copy ``previous/stage`` into ``run_dir`` (symlinks kept as links, never followed) and
    rewrite the JSON files in it that name the previous folder.

    Why through a hidden folder: the copy carries the stage's marker, and a run killed
    half-way through a copy straight into ``run_dir/stage`` would leave a stage folder with
    its marker but without all its files, which the next ``--resume`` would take as whole.
    The copy and its rewrite happen in ``run_dir/.<stage>.adopting``, renamed into place
    (one atomic rename) only when complete."""
    dest = run_dir / stage
    work = run_dir / f".{stage}.adopting"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(previous / stage, work, symlinks=True)
    for old, new in ((previous.resolve(), run_dir.resolve()), (previous, run_dir)):
        relocate_files(work, old, new)
    os.replace(work, dest)
    return dest


__all__ = ["MARKER", "REUSABLE", "adopt", "find_previous", "mark_done", "read_stage_json", "relocate_files", "reusable",
           "stage_key"]
