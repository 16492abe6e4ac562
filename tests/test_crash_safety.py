"""Crash safety with real kills: ``mdeploy`` is SIGKILLed at a chosen ``rename`` (by the
kernel through strace's syscall fault injection, or, in the many-kill tests, by itself just
before the rename: see "a kill at every rename" below), then the same command is rerun with
no manual cleanup. What must hold (DESIGN.md: a failed stage leaves no half-written artifact
and never loses a previous result): the rerun succeeds, the previous result is never lost,
and nothing hidden is left beside ``--out``.

The sweeps that kill a command at every one of its renames are marked ``sweep`` and run in
``make test-zoo``; ``make test`` kills the same commands at one rename of each kind (a
scratch file in TMPDIR, a file into the staging folder, the old result aside, the new one
in, and for ``run`` a stage folder, its marker and the ``latest`` link)."""
from __future__ import annotations

import json
import os
import re
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


def _mdeploy(tmp: Path, *args: str, kill_at_rename: int | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process; with ``kill_at_rename=N`` the kernel delivers SIGKILL
    at its N-th rename (the process dies before the rename happens)."""
    cmd = [sys.executable, "-B", "-m", "pipeline.cli", *args]
    if kill_at_rename is not None:
        cmd = [STRACE, "-f", "-qq", "-o", os.devnull, "-e", f"trace={RENAMES}",
               "-e", f"inject={RENAMES}:signal=SIGKILL:when={kill_at_rename}", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp), timeout=300)


def _killed(proc: subprocess.CompletedProcess) -> bool:
    """strace re-raises the tracee's fatal signal on itself, so SIGKILL shows as -9 (or 137)."""
    return proc.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


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


def test_export_killed_during_force_swap_keeps_a_complete_result(zygote, tmp_path):
    """``export --force`` over a previous export: killed between moving the old folder
    aside and renaming the new one in (the moment ``--out`` does not exist). The next start
    puts the old folder back (a rerun without ``--force`` refuses to overwrite it, its
    files intact), and a rerun with ``--force`` completes."""
    ckpt_dir = tmp_path / "ckpt"
    proc = zygote(*TINY_TRAIN, "--out", str(ckpt_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "exports" / "app"
    args = ("export", "--checkpoint", str(ckpt_dir / "model.safetensors"), "--formats", "onnx",
            "--out", str(out), "-q")
    made = zygote(*args)
    assert made.returncode == 0, made.stderr[-2000:]
    first = {p.name: p.read_bytes() for p in out.iterdir()}

    # the --force run renames as many times, plus once to move the old folder aside first:
    # the last rename is staging -> --out; die there
    proc = zygote(*args, "--force", kill_at_rename=len(made.renames) + 1)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    assert not out.exists()
    hidden = _hidden(out.parent)
    assert any(".old" in h for h in hidden) and any(h.endswith(".staging") for h in hidden), hidden

    proc = zygote(*args)                                    # no --force: the old result is back
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert _hidden(out.parent) == []

    proc = zygote(*args, "--force")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(first)
    assert _hidden(out.parent) == []
    zygote.close_and_check_renames()


def test_quantize_killed_at_each_stage_of_its_force_swap_keeps_a_complete_result(zygote, tmp_path):
    """``quantize --force`` over a previous result, killed (1) midway, before the swap, and
    (2) at the swap's last rename, when ``--out`` does not exist. Each time
    the rerun without ``--force`` finds the previous result intact (and refuses to replace
    it), a rerun with ``--force`` completes, and no debris is left beside ``--out``."""
    export_dir = _tiny_export(zygote, tmp_path)
    out = tmp_path / "quantized"
    args = ("quantize", str(export_dir), "--out", str(out), *QUANTIZE_TINY)
    made = zygote(*args)
    assert made.returncode == 0, made.stderr[-2000:]
    renames = len(made.renames)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert renames >= 3 and "model_qnn_w8a8.onnx" in first

    # die at rename 2 (a scratch file in TMPDIR), then at the last one (staging -> --out)
    for when in (2, renames + 1):
        proc = zygote(*args, "--force", kill_at_rename=when)
        assert proc.returncode == -signal.SIGKILL, (when, proc.returncode, proc.stderr[-2000:])
        proc = zygote(*args)                                # no --force: the previous result is there
        assert proc.returncode == 2 and "--force" in proc.stderr, (when, proc.stderr[-2000:])
        assert {p.name: p.read_bytes() for p in out.iterdir()} == first, when
        assert _hidden(out.parent) == [], (when, _hidden(out.parent))
    proc = zygote(*args, "--force")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(first) and _hidden(out.parent) == []
    assert list((tmp_path / "tmpdir").iterdir()) == []      # no scratch files of the killed runs
    zygote.close_and_check_renames()


def test_run_killed_midway_then_rerun_completes_and_latest_moves_only_then(zygote, tmp_path):
    """``mdeploy run`` killed after its train stage (at the next rename: the train stage's
    resume marker): no run folder appears, ``latest`` still names the previous run; the same command
    rerun completes, ``latest`` moves to it, and the killed run's staging folder is gone."""
    args, runs = _tiny_runs(tmp_path)
    train_renames = len(zygote(*TINY_TRAIN, "--out", str(tmp_path / "alone")).renames)
    proc = zygote(*args, kill_at_rename=train_renames + 1)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith(".")) == ["latest", "previous"]
    assert os.readlink(runs / "latest") == "previous"

    proc = zygote(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = [p for p in runs.iterdir() if p.name not in ("latest", "previous") and not p.name.startswith(".")]
    assert os.readlink(runs / "latest") == run_dir.name and _hidden(runs) == []
    assert (run_dir / "train" / "model.safetensors").is_file() and (run_dir / "export" / "model.onnx").is_file()
    zygote.close_and_check_renames()


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


def test_run_killed_in_export_resumes_without_training_again_and_reruns_what_changed(zygote, tmp_path):
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
    train_renames = len(zygote(*TINY_TRAIN, "--out", str(tmp_path / "alone")).renames)
    # + 1: the train stage's marker (run_cache.mark_done); + 2: the export stage's first rename
    proc = zygote(*args, "-q", kill_at_rename=train_renames + 2)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    (killed,) = [p for p in runs.iterdir() if p.name.endswith(".staging")]
    trained = (killed / "train" / "model.safetensors").read_bytes()
    assert not (killed / "export").exists()

    proc = zygote(*args, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming from {killed.name}" in proc.stdout + proc.stderr and "train: reused" in proc.stdout
    assert "export: reused" not in proc.stdout
    run_dir = runs / os.readlink(runs / "latest")
    assert (run_dir / "train" / "model.safetensors").read_bytes() == trained
    assert (run_dir / "export" / "model.onnx").is_file() and _hidden(runs) == []
    assert str(killed) not in (run_dir / "export" / "manifest.json").read_text()

    proc = zygote(*args, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train: reused" in proc.stdout and "export: reused" in proc.stdout

    cfg.write_text(base.replace('formats = ["onnx"]', 'formats = ["onnx"]\ncoreml_input = "tensor"'))
    proc = zygote(*args, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train: reused" in proc.stdout and "export: reused" not in proc.stdout

    cfg.write_text(base.replace("epochs = 1", "epochs = 2"))
    proc = zygote(*args, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reused" not in proc.stdout
    zygote.close_and_check_renames()


def test_run_resume_reuses_the_quantize_stage_until_its_section_changes(cli, tmp_path):
    """A finished run with a quantize stage, rerun with ``--resume``: train, export and
    quantize are all copied (the quantized files byte for byte, its report section read
    back from its ``quantization_report.json``); only verify reruns. A changed quantize
    section reruns quantize alone."""
    cfg = tmp_path / "q.toml"
    base = ('name = "q"\nstages = ["train", "export", "quantize", "report"]\n[train]\nmodel = "mobilenet_v2"\n'
            'model_kwargs = { width_mult = 0.35 }\ndata = "digits"\ninput_size = 16\nepochs = 1\n'
            'train_samples = 256\n[export]\nformats = ["onnx"]\n[quantize]\nsamples = 32\neval_samples = 32\n'
            'weight_rounding = ["rtn"]\ntarget_sqnr = "off"\nsensitivity = false\nplain_baseline = false\n'
            'tflite_inputs = ["int8-io"]\ntflite_int8w = false\n')
    cfg.write_text(base)
    runs = tmp_path / "runs"
    args = ("run", "--config", str(cfg), "--out", str(runs))
    code, out, err = cli(*args)
    assert code == 0, err[-2000:]
    first = runs / os.readlink(runs / "latest")
    made = {p.name: p.read_bytes() for p in (first / "quantized").iterdir() if p.suffix in (".onnx", ".tflite")}
    assert set(made) == {"model_qnn_w8a8.onnx", "model_qnn_w8a16.onnx", "model_int8-io.tflite"}
    quant_first = json.loads((first / "report.json").read_text())["quantize"]

    code, out, err = cli(*args, "--resume")
    assert code == 0, err[-2000:]
    assert all(f"{s}: reused" in err + out for s in ("train", "export", "quantize")), err[-2000:]
    again = runs / os.readlink(runs / "latest")
    assert again != first
    assert {p: (again / "quantized" / p).read_bytes() for p in made} == made
    quant_again = json.loads((again / "report.json").read_text())["quantize"]
    assert quant_again["folder"] == str(again / "quantized")
    assert {k: v for k, v in quant_again.items() if k != "folder"} == \
        {k: v for k, v in quant_first.items() if k != "folder"}
    assert str(first) not in (again / "quantized" / "manifest.json").read_text()

    cfg.write_text(base.replace("eval_samples = 32", "eval_samples = 16"))
    code, out, err = cli(*args, "--resume")
    assert code == 0, err[-2000:]
    assert "export: reused" in err + out and "quantize: reused" not in err + out


DEMOS_RUN = ('name = "demos"\nstages = ["train", "repvgg", "sparse_shift", "report"]\n[train]\n'
             'model = "mobilenet_v2"\nmodel_kwargs = { width_mult = 0.35 }\ndata = "digits"\ninput_size = 16\n'
             'epochs = 1\ntrain_samples = 256\n[repvgg]\nepochs = 1\ntrain_samples = 256\ninput_size = 16\n'
             'eval_samples = 64\ncalibration_samples = 32\n[sparse_shift]\nepochs = 1\ntrain_samples = 256\n'
             'freeze_shifts_after = 0\nformats = ["onnx"]\neval_samples = 32\n')


@pytest.mark.slow
def test_run_resume_reuses_the_demonstrations_until_their_sections_change(cli, tmp_path):
    """The two demonstrations, rerun with ``--resume``: both copied (every file byte for byte
    but the JSON files naming the run folder, which name the new one), their report sections
    rebuilt from their ``summary.json`` equal to the first run's but for the folder. A changed
    ``[sparse_shift]`` section reruns sparse_shift alone. A saved result whose checks failed,
    or that cannot be read, is not reused: that stage runs again."""
    cfg = tmp_path / "demos.toml"
    cfg.write_text(DEMOS_RUN)
    runs = tmp_path / "runs"
    args = ("run", "--config", str(cfg), "--out", str(runs))
    code, out, err = cli(*args)
    assert code == 0, err[-2000:]
    first = runs / os.readlink(runs / "latest")
    assert "reused" not in out + err

    code, out, err = cli(*args, "--resume")
    assert code == 0, err[-2000:]
    assert all(f"{s}: reused" in out + err for s in ("train", "repvgg", "sparse_shift")), out[-3000:]
    assert "repvgg_tiny: training" not in out + err and "fe_net_tiny (lambda" not in out + err
    again = runs / os.readlink(runs / "latest")
    assert again != first
    reports = [json.loads((r / "report.json").read_text()) for r in (first, again)]
    for stage in ("repvgg", "sparse_shift"):
        made, copied = (_files(r / stage) for r in (first, again))
        assert sorted(made) == sorted(copied) and ".stage.json" in made and "summary.json" in made
        for name, data in made.items():
            expected = data.replace(str(first).encode(), str(again).encode())
            assert copied[name] == expected, (stage, name)
            assert name.endswith(".json") or data == expected, (stage, name)      # only JSON names the run
        section = reports[1][stage]
        assert section["folder"] == str(again / stage) and str(first) not in json.dumps(section)
        assert section == json.loads(json.dumps(reports[0][stage]).replace(str(first), str(again)))
        assert section == json.loads((again / stage / "summary.json").read_text())
        trained = [v["train"] for v in section["variants"]] if stage == "repvgg" else [section["train"]]
        assert all(Path(t["checkpoint"]).is_file() and str(again) in t["checkpoint"] for t in trained)

    cfg.write_text(DEMOS_RUN.replace("eval_samples = 32", "eval_samples = 16"))
    code, out, err = cli(*args, "--resume")
    assert code == 0, err[-2000:]
    assert "train: reused" in out + err and "repvgg: reused" in out + err
    assert "sparse_shift: reused" not in out + err
    third = runs / os.readlink(runs / "latest")
    assert json.loads((third / "report.json").read_text())["sparse_shift"]["verify"]["samples"] == 16

    # what --resume would adopt, spoiled: a failed check (measured again, not carried over)
    # and a summary that is not JSON (nothing to rebuild the result from)
    summary = json.loads((third / "repvgg" / "summary.json").read_text())
    summary["variants"][0]["fp32_parity"]["passed"] = False
    (third / "repvgg" / "summary.json").write_text(json.dumps(summary))
    (third / "sparse_shift" / "summary.json").write_text("{")
    code, out, err = cli(*args, "--resume")
    assert code == 0, err[-2000:]
    assert "train: reused" in out + err and "repvgg: reused" not in out + err
    assert "sparse_shift: reused" not in out + err
    last = runs / os.readlink(runs / "latest")
    assert json.loads((last / "report.json").read_text())["repvgg"]["passed"]


def test_resume_of_a_run_that_is_not_there_is_one_line(cli, tmp_path):
    (tmp_path / "runs").mkdir()
    code, _, err = cli("run", "--out", str(tmp_path / "runs"), "--resume", "../elsewhere")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--resume" in err


_ADOPT = """
import sys
from pathlib import Path
from pipeline.commands.run_cache import adopt
adopt(Path(sys.argv[1]), "quantized", Path(sys.argv[2]))
"""


@needs_strace
def test_resume_killed_while_copying_a_stage_leaves_nothing_a_later_resume_would_take(tmp_path):
    """``--resume`` copies a finished stage, marker included, into the new run. Killed after
    the marker's copy but before the rest, the new run's staging folder must not hold a
    stage folder with that marker: the next ``--resume`` (which looks at killed runs too)
    would reuse a stage with missing files. The kernel kills the copy at each file's
    ``sendfile`` in turn and at the final rename."""
    from pipeline.commands.run_cache import MARKER, mark_done, reusable
    previous = tmp_path / "previous"
    stage = previous / "quantized"
    stage.mkdir(parents=True)
    mark_done(stage, "quantized", "k", {"path": str(stage / "model.onnx")}, 1.0)
    for i in range(4):
        (stage / f"model_{i}.onnx").write_bytes(os.urandom(4096))
    files = len(list(stage.iterdir()))
    for when, call in [*((k, "sendfile") for k in range(1, files + 1)), (1, RENAMES)]:
        run = tmp_path / f"run_{call[:6]}_{when}"
        run.mkdir()
        proc = subprocess.run([STRACE, "-f", "-qq", "-o", os.devnull, "-e", f"trace={call}",
                               "-e", f"inject={call}:signal=SIGKILL:when={when}",
                               sys.executable, "-B", "-c", _ADOPT, str(previous), str(run)],
                              capture_output=True, text=True, env=_env(tmp_path), timeout=120)
        assert _killed(proc), (call, when, proc.returncode, proc.stderr[-1500:])
        assert not (run / "quantized").exists(), (call, when)
        assert reusable(run, "quantized", "k") is None
    done = tmp_path / "run_whole"
    done.mkdir()
    proc = subprocess.run([sys.executable, "-B", "-c", _ADOPT, str(previous), str(done)],
                          capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert _hidden(done) == [] and sorted(p.name for p in (done / "quantized").iterdir()) == sorted(
        p.name for p in stage.iterdir())
    marker = reusable(done, "quantized", "k")
    assert marker is not None and marker["record"]["path"] == str(done / "quantized" / "model.onnx")
    assert (done / "quantized" / MARKER).read_bytes() != (stage / MARKER).read_bytes()



# -------------------------------------------------------------------------- a kill at every rename
#
# ``_mdeploy(kill_at_rename=N)`` has strace stop the process at every system call (its
# seccomp-bpf mode, which stops at the traced calls alone, cannot deliver an injected signal
# with strace 6.1), which makes a killed run about 3x slower, and every fresh interpreter
# pays about 3 s of imports. Sweeps over many renames therefore fork each run from a
# "zygote": one interpreter that has imported the pipeline and its libraries (and run
# nothing), reads one command per line and forks a child for it. The child is a real process
# with its own pid; with ``kill_at`` N it sends itself SIGKILL just before its N-th
# ``os.rename``/``os.replace``: the rename does not happen and no cleanup code runs, the state
# strace's injection leaves. The zygote runs under strace in tracing mode (cheap with
# --seccomp-bpf), and each test checks that the kernel saw exactly the renames the children
# counted, so no rename escapes the sweep. The kill tests above that need a few kills use it
# too; ``test_train_killed_between_checkpoint_and_log_reruns_cleanly`` keeps the kernel's.


def _kills(each_kind: tuple[int, ...]) -> list:
    """The renames to kill at: ``each_kind`` (one of each kind, ``make test``), or every one
    (``None``, the ``sweep`` that ``make test-zoo`` runs)."""
    return [pytest.param(each_kind, id="each-kind"), pytest.param(None, id="every", marks=pytest.mark.sweep)]

_ZYGOTE = r"""
import json, os, signal, sys, tempfile, traceback
# imports write files in TMPDIR (onnxruntime: .ses), which a CLI run puts in its own scratch
# folder: keep the zygote's apart from the TMPDIR its children get
children_tmpdir = os.environ["TMPDIR"]
os.environ["TMPDIR"] = sys.argv[1]
import pipeline.cli, pipeline.commands.run, pipeline.commands.train, pipeline.commands.export
import pipeline.commands.quantize, pipeline.stages.train, pipeline.stages.export, pipeline.stages.quantize
import onnx, onnxruntime, onnxruntime.quantization, onnxscript, quantize.onnx_ptq, sklearn.datasets, torch.onnx
from exporters.base import exporter_classes
exporter_classes()
os.environ["TMPDIR"], tempfile.tempdir = children_tmpdir, None
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        for fd, name in ((1, "out"), (2, "err")):
            f = os.open(req["log"] + "." + name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        seen = []

        def hooked(call):
            def rename(src, dst, *a, **k):
                seen.append(1)
                with open(req["log"] + ".renames", "a") as fh:
                    fh.write(f"{os.fspath(src)} -> {os.fspath(dst)}\n")
                if len(seen) == req["kill_at"]:
                    os.kill(os.getpid(), signal.SIGKILL)
                return call(src, dst, *a, **k)
            return rename
        os.rename, os.replace = hooked(os.rename), hooked(os.replace)
        code = 1
        try:
            code = pipeline.cli.main(req["argv"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(int(code or 0))
    _, status = os.waitpid(pid, 0)
    print(json.dumps([pid, os.waitstatus_to_exitcode(status)]), flush=True)
"""


class _Forked:
    """One child's result: ``returncode`` (-9 when killed), its output, its renames
    (``src -> dst``, the one it was killed at last)."""

    def __init__(self, pid: int, returncode: int, log: Path):
        self.pid, self.returncode = pid, returncode
        self.stdout = Path(f"{log}.out").read_text()
        self.stderr = Path(f"{log}.err").read_text()
        renames = Path(f"{log}.renames")
        self.renames = renames.read_text().splitlines() if renames.exists() else []


class _Zygote:
    def __init__(self, tmp: Path):
        self.logs = tmp / "logs"
        self.logs.mkdir()
        (tmp / "zygote-tmp").mkdir()
        self.trace = tmp / "zygote-renames.txt"
        self.runs: list[_Forked] = []
        self.killed = 0
        cmd = [sys.executable, "-B", "-c", _ZYGOTE, str(tmp / "zygote-tmp")]
        if STRACE is not None:
            cmd = [STRACE, "-f", "--seccomp-bpf", "-qq", "-o", str(self.trace), "-e", f"trace={RENAMES}", *cmd]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=_env(tmp), cwd=tmp)
        assert self.proc.stdout.readline().strip() == "ready"

    def __call__(self, *args: str, kill_at_rename: int = 0) -> _Forked:
        log = self.logs / str(len(self.runs))
        self.proc.stdin.write(json.dumps({"argv": list(args), "kill_at": kill_at_rename, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        pid, code = json.loads(self.proc.stdout.readline())
        run = _Forked(pid, code, log)
        self.runs.append(run)
        self.killed += bool(kill_at_rename) and code == -signal.SIGKILL
        return run

    def close_and_check_renames(self) -> None:
        """Every rename the kernel saw is one a child counted (a killed child's last one
        never happened)."""
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0
        if STRACE is not None:
            seen = len([line for line in self.trace.read_text().splitlines() if "rename" in line])
            assert seen == sum(len(r.renames) for r in self.runs) - self.killed


@pytest.fixture
def zygote(tmp_path):
    z = _Zygote(tmp_path)
    yield z
    if z.proc.poll() is None:                  # a failed test: end the zygote (EOF on its stdin)
        z.proc.stdin.close()
        try:
            z.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            z.proc.kill()
            z.proc.wait()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _complete_export(folder: Path, names: list[str]) -> None:
    """``folder`` holds exactly ``names``, every artifact matching its manifest's hash."""
    from exporters.artifact import Manifest, sha256_of
    assert sorted(p.name for p in folder.iterdir()) == names
    manifest = Manifest.load(folder)
    assert manifest.artifacts and all(a.sha256 for a in manifest.artifacts)
    for art in manifest.artifacts:
        assert sha256_of(art.resolve(folder)) == art.sha256, art.path


def _targets(renames: list[str]) -> list[str]:
    return [Path(r.split(" -> ")[1]).name for r in renames]


def _kill_at_renames(zygote: _Zygote, tmp: Path, args: tuple[str, ...], out: Path, targets: list[str],
                     complete, whens: tuple[int, ...] | None = None) -> None:
    """``args`` (with ``--force``) first makes a result in ``out``, renaming to ``targets``
    in turn; then, over that result (one more rename: the old result aside before the last),
    is killed at each rename of ``whens`` (default: every one), each kill followed by the
    same command. After a kill the previous result is intact: in place, or (killed between
    the swap's two renames) aside as the dead process's ``.NAME.old<pid>``, whole. After each
    rerun: success, a complete result, nothing hidden beside ``out``, TMPDIR scratch empty."""
    scratch = tmp / "tmpdir"
    first = zygote(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert _targets(first.renames) == targets, first.renames
    complete(out)
    renames = len(targets) + 1
    previous = _files(out)
    for n in whens or range(1, renames + 1):
        proc = zygote(*args, kill_at_rename=n)
        assert proc.returncode == -signal.SIGKILL, (n, proc.returncode, proc.stderr[-2000:])
        died_at = proc.renames[-1]
        if n < renames:
            assert _files(out) == previous, (n, died_at)
        else:                                               # at staging -> out: the old one aside
            old = out.parent / f".{out.name}.old{proc.pid}"
            assert not out.exists() and proc.renames[-2] == f"{out} -> {old}", (n, proc.renames[-2:])
            assert _files(old) == previous, n
        rerun = zygote(*args)                               # the same command, no cleanup
        assert rerun.returncode == 0, (n, died_at, rerun.stderr[-2000:])
        complete(out)
        assert _hidden(out.parent) == [], (n, died_at, _hidden(out.parent))
        assert list(scratch.iterdir()) == [], (n, died_at, list(scratch.iterdir()))
        previous = _files(out)
    zygote.close_and_check_renames()


def test_train_killed_at_every_rename_of_a_force_run_then_reruns(zygote, tmp_path):
    """``train --force`` over an earlier result, SIGKILLed at each of its 4 renames (the
    checkpoint and the log into the staging folder, the old result aside, the new one in);
    after each, the same command succeeds with no cleanup."""
    out = tmp_path / "ckpts" / "tiny"

    def complete(folder: Path) -> None:
        assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "train_log.json"]
        assert json.loads((folder / "train_log.json").read_text())

    _kill_at_renames(zygote, tmp_path, (*TINY_TRAIN, "--out", str(out), "--force"), out,
                     ["model.safetensors", "train_log.json", "tiny"], complete)


def _tiny_export(zygote: _Zygote, tmp: Path) -> Path:
    ckpt, export_dir = tmp / "ckpt", tmp / "export"
    proc = zygote(*TINY_TRAIN, "--out", str(ckpt))
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = zygote("export", "--checkpoint", str(ckpt / "model.safetensors"), "--formats", "onnx",
                  "--out", str(export_dir), "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return export_dir


@pytest.mark.parametrize("whens", _kills((2, 4, 5)))
def test_export_killed_at_every_rename_of_a_force_run_then_reruns(zygote, tmp_path, whens):
    """``export --force`` over an earlier export, SIGKILLed at each of its 5 renames (three
    files into the staging folder, the old result aside, the new one in)."""
    ckpt = tmp_path / "ckpt"
    assert zygote(*TINY_TRAIN, "--out", str(ckpt)).returncode == 0
    out = tmp_path / "exports" / "app"
    args = ("export", "--checkpoint", str(ckpt / "model.safetensors"), "--formats", "onnx",
            "--out", str(out), "-q", "--force")
    names = ["manifest.json", "model.onnx", "model.safetensors"]
    _kill_at_renames(zygote, tmp_path, args, out, ["model.safetensors", "model.onnx", "manifest.json", "app"],
                     lambda folder: _complete_export(folder, names), whens)


QUANTIZE_TINY = ("--samples", "16", "--rounding-samples", "16", "--eval-samples", "40", "--no-sensitivity",
                 "--no-tflite", "--no-plain-baseline", "-q")


@pytest.mark.parametrize("whens", _kills((1, 4, 7, 11, 12, 13)))
def test_quantize_killed_at_every_rename_of_a_force_run_then_reruns(zygote, tmp_path, whens):
    """``quantize --force`` over an earlier result makes 13 renames: (1) the weight-rounded
    float model, (2) the same graph with the unrounded weights swapped in (the default
    ``--target-sqnr`` searches' raised layers take their weights from it), (3) the calibration
    ranges, (4, 5) each default search's one measured model (this model's w8a8 and w8a16 already
    meet their default targets) in its TMPDIR scratch folder; into the staging folder (6) the
    w8a8 QDQ model (``atomic_path``), (7) its encodings (``atomic_write_text``), (8, 9) the same
    two for w8a16, (10) the report, (11) the manifest; (12) the old result aside, (13) the new
    one in. It is killed at each of the 13 in turn (about 5 minutes on two cores; ``make test``
    at 1, 4, 7, 11, 12 and 13); after each kill the same command succeeds with no cleanup."""
    export_dir = _tiny_export(zygote, tmp_path)
    out = tmp_path / "quantized" / "q"
    targets = ["model.onnx", "original.onnx", "ranges_minmax.json", "step0.onnx", "step0.onnx", "model_qnn_w8a8.onnx",
               "model_qnn_w8a8.encodings.json", "model_qnn_w8a16.onnx", "model_qnn_w8a16.encodings.json",
               "quantization_report.json", "manifest.json", "q"]
    names = sorted(["model.safetensors", *targets[5:-1]])
    _kill_at_renames(zygote, tmp_path, ("quantize", str(export_dir), "--out", str(out), *QUANTIZE_TINY, "--force"),
                     out, targets, lambda folder: _complete_export(folder, names), whens)


TINY_RUN = ('name = "tiny"\nstages = ["train", "export"]\n[train]\nmodel = "mobilenet_v2"\n'
            'model_kwargs = { width_mult = 0.35 }\ndata = "digits"\ninput_size = 16\nepochs = 1\n'
            'train_samples = 256\n[export]\nformats = ["onnx"]\n')


def _tiny_runs(tmp: Path) -> tuple[tuple[str, ...], Path]:
    """The ``mdeploy run`` arguments of a tiny train + export run, and its ``--out`` holding
    an earlier run ``previous`` that ``latest`` points at."""
    cfg = tmp / "tiny.toml"
    cfg.write_text(TINY_RUN)
    runs = tmp / "runs"
    runs.mkdir()
    (runs / "previous").mkdir()
    (runs / "previous" / "kept.txt").write_text("an earlier run\n")
    (runs / "latest").symlink_to("previous")
    return ("run", "--config", str(cfg), "--out", str(runs), "-q"), runs


def _complete_runs(runs: Path, train_names: list[str], export_names: list[str]) -> None:
    """Every run folder under ``runs`` is whole, ``latest`` names one, the earlier run is
    untouched and nothing hidden is left."""
    assert (runs / "previous" / "kept.txt").read_text() == "an earlier run\n"
    assert (runs / os.readlink(runs / "latest")).is_dir()
    for run_dir in runs.iterdir():
        if run_dir.name not in ("latest", "previous"):
            assert sorted(p.name for p in (run_dir / "train").iterdir()) == train_names, run_dir
            _complete_export(run_dir / "export", export_names)
    assert _hidden(runs) == []


@pytest.mark.parametrize("whens", _kills((2, 3, 4, 8, 12, 13)))
def test_run_killed_at_every_rename_then_reruns(zygote, tmp_path, whens):
    """``mdeploy run`` (train, export) makes 13 renames: into the train stage's staging
    folder (1) the checkpoint, (2) the log; (3) that folder into the run's staging folder;
    (4) the stage's resume marker; (5-7) the export's three files, (8) its folder, (9) its
    marker; (10, 11) the manifest and the train marker rewritten to name the final run folder
    (in the order the file system lists them); (12) the run folder into place; (13) the new
    ``latest`` link. It is killed at each of the 13 in turn (over 3 minutes on two cores;
    ``make test`` at 2, 3, 4, 8, 12 and 13). After
    each kill: the earlier runs are untouched and ``latest`` has not moved; the same command
    then succeeds with no cleanup, ``latest`` names its run, every run folder is whole (a
    run killed at 13 was complete: it stays, as a run ``latest`` does not name), nothing
    hidden is left (a kill at 13 used to leave ``.latest.<pid>``) and TMPDIR scratch is
    empty."""
    args, runs = _tiny_runs(tmp_path)
    counted = zygote(*args)
    assert counted.returncode == 0, counted.stderr[-2000:]
    first = runs / os.readlink(runs / "latest")
    targets = _targets(counted.renames)
    assert targets[:10] + targets[11:] == ["model.safetensors", "train_log.json", "train", ".stage.json",
                                           "model.safetensors", "model.onnx", "manifest.json", "export",
                                           ".stage.json", targets[9], first.name, "latest"], targets
    assert sorted(targets[9:11]) == [".stage.json", "manifest.json"], targets
    train_names = sorted(p.name for p in (first / "train").iterdir())
    export_names = sorted(p.name for p in (first / "export").iterdir())
    assert ".stage.json" in train_names and "model.onnx" in export_names
    _complete_runs(runs, train_names, export_names)
    for n in whens or range(1, len(targets) + 1):
        before = {p.name: _files(p) for p in runs.iterdir() if not p.name.startswith(".") and p.name != "latest"}
        latest = os.readlink(runs / "latest")
        proc = zygote(*args, kill_at_rename=n)
        assert proc.returncode == -signal.SIGKILL, (n, proc.returncode, proc.stderr[-2000:])
        died_at = proc.renames[-1]
        assert os.readlink(runs / "latest") == latest, (n, died_at)
        assert {name: _files(runs / name) for name in before} == before, (n, died_at)
        rerun = zygote(*args)
        assert rerun.returncode == 0, (n, died_at, rerun.stderr[-2000:])
        assert os.readlink(runs / "latest") not in before, (n, died_at)
        _complete_runs(runs, train_names, export_names)
        assert list((tmp_path / "tmpdir").iterdir()) == [], (n, died_at)
    zygote.close_and_check_renames()


# -------------------------------------------------------------------------- full disk at a chosen write


def _cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-B", "-m", "pipeline.cli", *args]


def _main_thread_writes(tmp: Path, *args: str) -> list[str]:
    """Run ``args`` once (it must succeed); the file each write of its main thread went to,
    in order. Only the main thread's: strace's ``when=N`` counts each thread's calls on their
    own, so N is the main thread's N-th write. --seccomp-bpf: the process stops at the traced
    calls only (error injection works so; signal injection does not)."""
    trace = tmp / "writes.txt"
    proc = subprocess.run([STRACE, "-f", "--seccomp-bpf", "-qq", "-y", "-o", str(trace),
                           "-e", "trace=execve,write,pwrite64", *_cli_cmd(*args)],
                          capture_output=True, text=True, env=_env(tmp), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = trace.read_text().splitlines()
    main = lines[0].split()[0]                              # the pid of the first line: its execve
    return [m.group(1) for m in (re.match(rf"{main}\s+p?write(?:64)?\(\d+<([^>]*)>", line) for line in lines) if m]


def _with_enospc_at(tmp: Path, n: int, *args: str) -> subprocess.CompletedProcess:
    """``args`` with the kernel answering ENOSPC to the N-th write of each thread: never a
    traceback; exit 0, or exit 2 with one line on stderr."""
    proc = subprocess.run([STRACE, "-f", "--seccomp-bpf", "-qq", "-o", os.devnull, "-e", "trace=write,pwrite64",
                           "-e", f"inject=write,pwrite64:error=ENOSPC:when={n}", *_cli_cmd(*args)],
                          capture_output=True, text=True, env=_env(tmp), timeout=300)
    assert "Traceback" not in proc.stderr, (n, proc.stderr[-3000:])
    assert proc.returncode in (0, 2), (n, proc.returncode, proc.stderr[-2000:])
    if proc.returncode == 2:
        assert len(proc.stderr.strip().splitlines()) == 1, (n, proc.stderr)
    return proc


def _enospc_spread(writes: list[str]) -> list[int]:
    """The first, middle and last write, and the first and last into a staging folder (the
    result's own files: the first, middle and last alone may all miss them)."""
    staged = [i + 1 for i, path in enumerate(writes) if re.search(r"/\.[^/]+\.\d+\.[^/.]*\.staging/", path)]
    assert len(writes) > 3 and staged, writes
    return sorted({1, len(writes) // 2, len(writes), staged[0], staged[-1]})


@needs_strace
def test_train_with_enospc_at_a_write_fails_cleanly_then_reruns(tmp_path):
    """``train --force`` over an earlier result with ENOSPC at the first, middle and last
    write of its main thread and at the first and last into its staging folder (here that is
    all five: a joblib probe, a semaphore, the checkpoint, the log, the line on stdout), as
    ``test_export_with_enospc_at_each_write...``: never a traceback; exit 0, or exit 2 with
    one line; ``--out`` holds the earlier result or a whole new one, never a mix; nothing
    hidden beside it, TMPDIR scratch empty; a plain rerun works."""
    from models.checkpoint import load_checkpoint
    out = tmp_path / "ckpts" / "tiny"
    args = (*TINY_TRAIN, "--out", str(out), "--force")
    writes = _main_thread_writes(tmp_path, *args)
    for n in _enospc_spread(writes):
        before = _files(out)
        _with_enospc_at(tmp_path, n, *args)
        assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "train_log.json"], n
        if _files(out) != before:                           # a new result: whole
            log = json.loads((out / "train_log.json").read_text())
            _, meta = load_checkpoint(out / "model.safetensors")
            assert log and meta["model"] == "mobilenet_v2", n
        assert _hidden(out.parent) == [] and list((tmp_path / "tmpdir").iterdir()) == [], n
    proc = _mdeploy(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]


@needs_strace
def test_quantize_with_enospc_at_a_write_fails_cleanly_then_reruns(tmp_path):
    """``quantize --force`` over an earlier result with ENOSPC at the first, middle and last
    write of its main thread and at the first and last into its staging folder: never a
    traceback; exit 0, or exit 2 with one line; ``--out`` holds the earlier result or a new
    one whose files all match its manifest, never a mix; nothing hidden beside it, TMPDIR
    scratch empty; a plain rerun works."""
    ckpt, export_dir = tmp_path / "ckpt", tmp_path / "export"
    assert _mdeploy(tmp_path, *TINY_TRAIN, "--out", str(ckpt)).returncode == 0
    proc = _mdeploy(tmp_path, "export", "--checkpoint", str(ckpt / "model.safetensors"), "--formats", "onnx",
                    "--out", str(export_dir), "-q")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "quantized" / "q"
    args = ("quantize", str(export_dir), "--out", str(out), *QUANTIZE_TINY, "--force")
    writes = _main_thread_writes(tmp_path, *args)
    names = sorted(p.name for p in out.iterdir())
    for n in _enospc_spread(writes):
        before = _files(out)
        _with_enospc_at(tmp_path, n, *args)
        if _files(out) != before:
            _complete_export(out, names)
        assert sorted(p.name for p in out.iterdir()) == names, n
        assert _hidden(out.parent) == [] and list((tmp_path / "tmpdir").iterdir()) == [], n
    proc = _mdeploy(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _complete_export(out, names)


@needs_strace
def test_run_with_enospc_at_a_write_fails_cleanly_then_reruns(tmp_path):
    """``mdeploy run`` (train, export) with ENOSPC at the first, middle and last write of
    its main thread and at the first and last into its staging folder: never a traceback;
    exit 0, or exit 2 with one line; every run folder under ``--out`` is whole (a failed run
    leaves none), ``latest`` names one, the earlier run is untouched, nothing hidden is
    left, TMPDIR scratch is empty; a plain rerun works."""
    args, runs = _tiny_runs(tmp_path)
    writes = _main_thread_writes(tmp_path, *args)
    first = runs / os.readlink(runs / "latest")
    train_names = sorted(p.name for p in (first / "train").iterdir())
    export_names = sorted(p.name for p in (first / "export").iterdir())
    for n in _enospc_spread(writes):
        _with_enospc_at(tmp_path, n, *args)
        _complete_runs(runs, train_names, export_names)
        assert list((tmp_path / "tmpdir").iterdir()) == [], n
    proc = _mdeploy(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _complete_runs(runs, train_names, export_names)
