"""Crash safety with real kills: ``mdeploy`` is SIGKILLed by the kernel at a chosen
``rename`` (strace's syscall fault injection), then the same command is rerun with no
manual cleanup. What must hold (DESIGN.md: a failed stage leaves no half-written artifact
and never loses a previous result): the rerun succeeds, the previous result is never
lost, and nothing hidden is left beside ``--out``."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STRACE = shutil.which("strace")
RENAMES = "rename,renameat,renameat2"
TINY_TRAIN = ("train", "mobilenet_v2", "--model-arg", "width_mult=0.35", "--data", "digits",
              "--input-size", "16", "--epochs", "1", "--train-samples", "256", "--threads", "1", "-q")

needs_strace = pytest.mark.skipif(STRACE is None, reason="strace (syscall fault injection) not installed")


def _env(tmp: Path) -> dict[str, str]:
    """No .pyc writes (they are renames too, and would shift the count); a private TMPDIR
    so the test can see what a killed process leaves there."""
    tmpdir = tmp / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
            "TMPDIR": str(tmpdir), "TF_CPP_MIN_LOG_LEVEL": "3"}


def _mdeploy(tmp: Path, *args: str, kill_at_rename: int | None = None, trace: Path | None = None
             ) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process; with ``kill_at_rename=N`` the kernel delivers SIGKILL
    at its N-th rename (the process dies before the rename happens); with ``trace`` the
    renames are only recorded."""
    cmd = [sys.executable, "-B", "-m", "pipeline.cli", *args]
    if kill_at_rename is not None:
        cmd = [STRACE, "-f", "-qq", "-o", os.devnull, "-e", f"trace={RENAMES}",
               "-e", f"inject={RENAMES}:signal=SIGKILL:when={kill_at_rename}", *cmd]
    elif trace is not None:
        cmd = [STRACE, "-f", "-qq", "-o", str(trace), "-e", f"trace={RENAMES}", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp), timeout=300)


def _killed(proc: subprocess.CompletedProcess) -> bool:
    """strace re-raises the tracee's fatal signal on itself, so SIGKILL shows as -9 (or 137)."""
    return proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _renames(tmp: Path, *args: str) -> int:
    """How many renames a successful run of ``args`` makes (strace records them)."""
    trace = tmp / "renames.txt"
    proc = _mdeploy(tmp, *args, trace=trace)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return len([line for line in trace.read_text().splitlines() if "rename" in line])


@needs_strace
def test_train_killed_between_checkpoint_and_log_reruns_cleanly(tmp_path):
    """The old failure: a kill after ``model.safetensors`` and before ``train_log.json``
    left a checkpoint without its log in ``--out`` and the rerun refused the folder."""
    out = tmp_path / "runs" / "tiny"
    args = (*TINY_TRAIN, "--out", str(out))
    # rename 1 puts model.safetensors in place (in the staging folder); die at rename 2
    proc = _mdeploy(tmp_path, *args, kill_at_rename=2)
    assert _killed(proc), (proc.returncode, proc.stderr[-2000:])
    assert not out.exists()                                 # nothing half-written under --out
    (staging,) = _hidden(out.parent)                        # the dead process's staging folder
    assert staging.endswith(".staging") and (out.parent / staging / "model.safetensors").is_file()
    assert any((tmp_path / "tmpdir").iterdir())             # its scratch folder in TMPDIR

    proc = _mdeploy(tmp_path, *args)                        # same command, no cleanup, no --force
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "train_log.json"]
    assert _hidden(out.parent) == []                        # debris of the killed run removed
    assert list((tmp_path / "tmpdir").iterdir()) == []      # and its scratch files


@needs_strace
def test_export_killed_during_force_swap_keeps_a_complete_result(tmp_path):
    """``export --force`` over a previous export: killed between moving the old folder
    aside and renaming the new one in (the moment ``--out`` does not exist). The next start
    puts the old folder back (a rerun without ``--force`` refuses to overwrite it, its
    files intact), and a rerun with ``--force`` completes."""
    ckpt_dir = tmp_path / "ckpt"
    proc = _mdeploy(tmp_path, *TINY_TRAIN, "--out", str(ckpt_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "exports" / "app"
    args = ("export", "--checkpoint", str(ckpt_dir / "model.safetensors"), "--formats", "onnx",
            "--out", str(out), "-q")
    renames = _renames(tmp_path, *args)
    first = {p.name: p.read_bytes() for p in out.iterdir()}

    # the --force run renames as many times, plus once to move the old folder aside first:
    # the last rename is staging -> --out; die there
    proc = _mdeploy(tmp_path, *args, "--force", kill_at_rename=renames + 1)
    assert _killed(proc), (proc.returncode, proc.stderr[-2000:])
    assert not out.exists()
    hidden = _hidden(out.parent)
    assert any(".old" in h for h in hidden) and any(h.endswith(".staging") for h in hidden), hidden

    proc = _mdeploy(tmp_path, *args)                        # no --force: the old result is back
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert _hidden(out.parent) == []

    proc = _mdeploy(tmp_path, *args, "--force")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(first)
    assert _hidden(out.parent) == []


@needs_strace
def test_quantize_killed_at_each_stage_of_its_force_swap_keeps_a_complete_result(tmp_path):
    """``quantize --force`` over a previous result, killed (1) while its staging folder is
    being filled and (2) at the swap's last rename, when ``--out`` does not exist. Each time
    the rerun without ``--force`` finds the previous result intact (and refuses to replace
    it), a rerun with ``--force`` completes, and no debris is left beside ``--out``."""
    ckpt_dir, export_dir = tmp_path / "ckpt", tmp_path / "export"
    assert _mdeploy(tmp_path, *TINY_TRAIN, "--out", str(ckpt_dir)).returncode == 0
    proc = _mdeploy(tmp_path, "export", "--checkpoint", str(ckpt_dir / "model.safetensors"), "--formats", "onnx",
                    "--out", str(export_dir), "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "quantized"
    args = ("quantize", str(export_dir), "--out", str(out), "--samples", "16", "--rounding-samples", "16",
            "--eval-samples", "40", "--no-sensitivity", "--no-tflite", "--no-plain-baseline", "-q")
    renames = _renames(tmp_path, *args)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert renames >= 3 and "model_qnn_w8a8.onnx" in first

    # die at a rename inside the staging folder, then at the last one (staging -> --out)
    for when in (2, renames + 1):
        proc = _mdeploy(tmp_path, *args, "--force", kill_at_rename=when)
        assert _killed(proc), (when, proc.returncode, proc.stderr[-2000:])
        proc = _mdeploy(tmp_path, *args)                    # no --force: the previous result is there
        assert proc.returncode == 2 and "--force" in proc.stderr, (when, proc.stderr[-2000:])
        assert {p.name: p.read_bytes() for p in out.iterdir()} == first, when
        assert _hidden(out.parent) == [], (when, _hidden(out.parent))
    proc = _mdeploy(tmp_path, *args, "--force")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(first) and _hidden(out.parent) == []
    assert list((tmp_path / "tmpdir").iterdir()) == []      # no scratch files of the killed runs


@needs_strace
def test_run_killed_midway_then_rerun_completes_and_latest_moves_only_then(tmp_path):
    """``mdeploy run`` killed after its train stage (at the next rename: the train stage's
    resume marker): no run folder appears, ``latest`` still names the previous run; the same command
    rerun completes, ``latest`` moves to it, and the killed run's staging folder is gone."""
    cfg = tmp_path / "tiny.toml"
    cfg.write_text('name = "tiny"\nstages = ["train", "export"]\n[train]\nmodel = "mobilenet_v2"\n'
                   'model_kwargs = { width_mult = 0.35 }\ndata = "digits"\ninput_size = 16\nepochs = 1\n'
                   'train_samples = 256\n[export]\nformats = ["onnx"]\n')
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "previous").mkdir()
    (runs / "latest").symlink_to("previous")
    args = ("run", "--config", str(cfg), "--out", str(runs), "-q")
    train_renames = _renames(tmp_path, *TINY_TRAIN, "--out", str(tmp_path / "alone"))
    proc = _mdeploy(tmp_path, *args, kill_at_rename=train_renames + 1)
    assert _killed(proc), (proc.returncode, proc.stderr[-2000:])
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith(".")) == ["latest", "previous"]
    assert os.readlink(runs / "latest") == "previous"

    proc = _mdeploy(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = [p for p in runs.iterdir() if p.name not in ("latest", "previous") and not p.name.startswith(".")]
    assert os.readlink(runs / "latest") == run_dir.name and _hidden(runs) == []
    assert (run_dir / "train" / "model.safetensors").is_file() and (run_dir / "export" / "model.onnx").is_file()


def test_recover_output_removes_debris_only_of_dead_processes(tmp_path):
    """The startup sweep: a dead process's swap is undone or finished, a live one's
    work in progress (here: this test's own pid) is left alone."""
    from exporters.fileio import recover_output
    dead = _dead_pid()
    out = tmp_path / "out"
    (tmp_path / f".out.old{dead}").mkdir()
    (tmp_path / f".out.old{dead}" / "kept").write_text("previous")
    (tmp_path / f".out.{dead}.abc.staging").mkdir()
    (tmp_path / f".out.{os.getpid()}.xyz.staging").mkdir()
    (tmp_path / ".outside.1.abc.staging").mkdir()               # another folder's name
    recover_output(out)
    assert (out / "kept").read_text() == "previous"
    assert _hidden(tmp_path) == [".out." + f"{os.getpid()}.xyz.staging", ".outside.1.abc.staging"]
    (tmp_path / f".out.old{dead}").mkdir()                       # NAME exists: the swap finished
    recover_output(out)
    assert not (tmp_path / f".out.old{dead}").exists() and (out / "kept").is_file()


def test_remove_dead_staging_sweeps_every_name_but_only_dead_processes(tmp_path):
    """A folder of runs: each run has a new name, so the sweep is by pattern, not by name;
    a live process's staging folder and anything that is not a staging folder stay."""
    from exporters.fileio import remove_dead_staging
    dead = _dead_pid()
    for name in (f".20260101-000000-a.{dead}.x1.staging", f".b.{os.getpid()}.x2.staging", "c", ".latest.1"):
        (tmp_path / name).mkdir()
    remove_dead_staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".b.{os.getpid()}.x2.staging", ".latest.1", "c"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_quantize_out_same_as_input_is_refused_and_input_untouched(cli, tmp_path):
    """``quantize DIR --out DIR --force`` used to swap the export folder away (its
    ``model.onnx`` deleted); ``--out`` inside or around the input is refused the same way."""
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    for name, data in (("model.onnx", b"onnx bytes"), ("manifest.json", b"{}")):
        (export_dir / name).write_bytes(data)
    before = {p.name: p.read_bytes() for p in export_dir.iterdir()}
    for out in (export_dir, export_dir / "q", tmp_path):
        code, _, err = cli("quantize", str(export_dir), "--out", str(out), "--force", "--random-inputs")
        assert code == 2 and err.strip().count("\n") == 0 and "--out" in err and "input" in err, err
    assert {p.name: p.read_bytes() for p in export_dir.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    # export: --out the folder holding the checkpoint would swap the checkpoint away
    ckpt = export_dir / "model.safetensors"
    ckpt.write_bytes(b"weights")
    code, _, err = cli("export", "--checkpoint", str(ckpt), "--out", str(export_dir), "--force")
    assert code == 2 and "--out" in err and "holding the input" in err, err
    assert ckpt.read_bytes() == b"weights" and (export_dir / "model.onnx").read_bytes() == b"onnx bytes"


def test_run_config_error_is_found_before_training(cli, tmp_path):
    """``formats = ["pdf"]`` is an export-section error: refused before the train stage,
    so no run folder is made and ``latest`` does not move."""
    cfg = tmp_path / "pdf.toml"
    cfg.write_text('[train]\nepochs = 1\n[export]\nformats = ["pdf"]\n')
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "previous").mkdir()
    (runs / "latest").symlink_to("previous")
    code, _, err = cli("run", "--config", str(cfg), "--out", str(runs))
    assert code == 2 and err.strip().count("\n") == 0 and "pdf" in err and "[export]" in err, err
    assert sorted(p.name for p in runs.iterdir()) == ["latest", "previous"]
    assert os.readlink(runs / "latest") == "previous"


def test_run_is_built_aside_and_renamed_into_place(cli, tmp_path):
    """``mdeploy run`` builds its folder in a staging sibling: when it is renamed into place
    every recorded path (report, manifest) names the run folder, not the staging one, and
    ``latest`` points at it (it moves only once the run is complete)."""
    cfg = tmp_path / "tiny.toml"
    cfg.write_text('name = "tiny"\nstages = ["train", "export", "report"]\n[train]\nmodel = "mobilenet_v2"\n'
                   'model_kwargs = { width_mult = 0.35 }\ndata = "digits"\ninput_size = 16\nepochs = 1\n'
                   'train_samples = 256\n[export]\nformats = ["onnx"]\n')
    runs = tmp_path / "runs"
    code, out, err = cli("run", "--config", str(cfg), "--out", str(runs), "-q", "--json")
    assert code == 0, err
    (run_dir,) = [p for p in runs.iterdir() if p.name != "latest"]
    assert os.readlink(runs / "latest") == run_dir.name and _hidden(runs) == []
    record = json.loads((run_dir / "report.json").read_text())
    assert record["run_dir"] == str(run_dir) and record["train"]["checkpoint"].startswith(str(run_dir))
    for text in (out, (run_dir / "report.json").read_text(), (run_dir / "export" / "manifest.json").read_text()):
        assert ".staging" not in text
    assert (Path(record["train"]["checkpoint"])).is_file()



# -------------------------------------------------------------------------- full disk


def _mount_tmpfs(where: Path, size: str) -> bool:
    """A small real tmpfs at ``where`` (needs CAP_SYS_ADMIN: root outside a locked-down
    container); False where the machine does not allow it."""
    mount = shutil.which("mount")
    if mount is None:
        return False
    proc = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    return proc.returncode == 0


def test_export_onto_a_full_disk_fails_in_one_line_and_leaves_the_disk_as_it_was(tmp_path, trained_mnist):
    """``--out`` on a real 256 KiB tmpfs, too small for the model (about 1.6 MB of ONNX): the
    write fails with ENOSPC inside the staging folder. What must hold: exit 2, one line on
    stderr saying the disk is full, the staged files removed (the disk holds exactly what it
    held before: a file a user put there), and the same export onto a roomy disk works."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _mount_tmpfs(disk, "256k"):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN); the strace ENOSPC test covers it")
    try:
        (disk / "keep.txt").write_text("a user's file\n")
        args = ("export", "--checkpoint", str(trained_mnist), "--formats", "onnx", "-q")
        proc = _mdeploy(tmp_path, *args, "--out", str(disk / "app"))
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0], proc.stderr
        assert sorted(p.name for p in disk.iterdir()) == ["keep.txt"]
        assert (disk / "keep.txt").read_text() == "a user's file\n"
        proc = _mdeploy(tmp_path, *args, "--out", str(tmp_path / "roomy"))
        assert proc.returncode == 0, proc.stderr[-2000:]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@needs_strace
def test_export_with_enospc_at_each_write_fails_cleanly_then_reruns(tmp_path, trained_mnist):
    """The kernel answers ENOSPC to the N-th ``write``/``pwrite64`` (strace fault injection:
    no mount needed) of ``export --force`` over an earlier result, for N at the first,
    middle and last write a successful run makes. Each time: never a traceback; exit 0,
    or exit 2 with one line; ``--out`` holds a complete result, the earlier one or a new
    one whose files all match its manifest's hashes (a write that failed after the swap,
    e.g. to the terminal, leaves the new result in place), never a mix; nothing hidden is
    left beside ``--out``; and a plain rerun with ``--force`` succeeds."""
    from exporters.artifact import Manifest, sha256_of
    out = tmp_path / "exports" / "app"
    args = ("export", "--checkpoint", str(trained_mnist), "--formats", "onnx", "--out", str(out), "-q")
    trace = tmp_path / "writes.txt"
    proc = subprocess.run([STRACE, "-f", "-qq", "-o", str(trace), "-e", "trace=write,pwrite64",
                           sys.executable, "-B", "-m", "pipeline.cli", *args],
                          capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    writes = len([line for line in trace.read_text().splitlines() if "write" in line])
    assert writes > 3
    for n in sorted({1, writes // 2, writes}):
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        proc = subprocess.run([STRACE, "-f", "-qq", "-o", os.devnull, "-e", "trace=write,pwrite64",
                               "-e", f"inject=write,pwrite64:error=ENOSPC:when={n}",
                               sys.executable, "-B", "-m", "pipeline.cli", *args, "--force"],
                              capture_output=True, text=True, env=_env(tmp_path), timeout=300)
        assert "Traceback" not in proc.stderr, (n, proc.stderr[-3000:])
        assert proc.returncode in (0, 2), (n, proc.returncode, proc.stderr[-2000:])
        if proc.returncode == 2:
            assert len(proc.stderr.strip().splitlines()) <= 1, (n, proc.stderr)
        assert sorted(p.name for p in out.iterdir()) == names, n
        if {p.name: p.read_bytes() for p in out.iterdir()} != before:
            manifest = Manifest.load(out)
            assert manifest.artifacts and all(a.sha256 for a in manifest.artifacts), n
            for art in manifest.artifacts:
                assert sha256_of(art.resolve(out)) == art.sha256, (n, art.path)
        assert _hidden(out.parent) == [], (n, _hidden(out.parent))
    proc = _mdeploy(tmp_path, *args, "--force")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == names


# -------------------------------------------------------------------------- resumable runs


def test_run_killed_in_export_resumes_without_training_again_and_reruns_what_changed(tmp_path):
    """``mdeploy run`` killed in its export stage (at the export's first rename, so after
    train was complete); ``run --resume`` copies the train stage of the killed run (the
    same checkpoint, byte for byte, and says so), runs export, and ends as a complete run
    with ``latest`` on it and no hidden debris. A second ``--resume`` reuses both stages;
    a changed export section reruns only export; a changed training section reruns both."""
    cfg = tmp_path / "tiny.toml"
    base = ('name = "tiny"\nstages = ["train", "export"]\n[train]\nmodel = "mobilenet_v2"\n'
            'model_kwargs = { width_mult = 0.35 }\ndata = "digits"\ninput_size = 16\nepochs = 1\n'
            'train_samples = 256\n[export]\nformats = ["onnx"]\n')
    cfg.write_text(base)
    runs = tmp_path / "runs"
    args = ("run", "--config", str(cfg), "--out", str(runs))
    train_renames = _renames(tmp_path, *TINY_TRAIN, "--out", str(tmp_path / "alone"))
    # + 1: the train stage's marker (run_cache.mark_done); + 2: the export stage's first rename
    proc = _mdeploy(tmp_path, *args, "-q", kill_at_rename=train_renames + 2)
    assert _killed(proc), (proc.returncode, proc.stderr[-2000:])
    (killed,) = [p for p in runs.iterdir() if p.name.endswith(".staging")]
    trained = (killed / "train" / "model.safetensors").read_bytes()
    assert not (killed / "export").exists()

    proc = _mdeploy(tmp_path, *args, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming from {killed.name}" in proc.stdout + proc.stderr and "train: reused" in proc.stdout
    assert "export: reused" not in proc.stdout
    run_dir = runs / os.readlink(runs / "latest")
    assert (run_dir / "train" / "model.safetensors").read_bytes() == trained
    assert (run_dir / "export" / "model.onnx").is_file() and _hidden(runs) == []
    assert str(killed) not in (run_dir / "export" / "manifest.json").read_text()

    proc = _mdeploy(tmp_path, *args, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train: reused" in proc.stdout and "export: reused" in proc.stdout

    cfg.write_text(base.replace('formats = ["onnx"]', 'formats = ["onnx"]\ncoreml_input = "tensor"'))
    proc = _mdeploy(tmp_path, *args, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train: reused" in proc.stdout and "export: reused" not in proc.stdout

    cfg.write_text(base.replace("epochs = 1", "epochs = 2"))
    proc = _mdeploy(tmp_path, *args, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reused" not in proc.stdout


def test_resume_of_a_run_that_is_not_there_is_one_line(cli, tmp_path):
    (tmp_path / "runs").mkdir()
    code, _, err = cli("run", "--out", str(tmp_path / "runs"), "--resume", "../elsewhere")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--resume" in err
