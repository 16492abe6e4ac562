"""Issue 15: each security hole shown closed on the real CLI (in-process), with a test that
fails if its fix is reverted.

* code named by a data file's metadata is never imported (a marker file proves it);
* names that become paths stay inside ``--out``; ``latest`` points inside it;
* an ssh host, user or remote python starting with ``-`` is refused before ssh runs, and
  ``--`` precedes the destination on every ssh command line;
* paths with rich markup in them print literally;
* NaN/Inf outputs fail parity; a full disk is one line, exit 2.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.parity_helpers import mnist_checkpoint, write_external_model


EVIL_SOURCE = '''
from pathlib import Path
Path({marker!r}).write_text("imported")
import torch.nn as nn

def build():
    Path({marker!r}).write_text("built")
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
'''


def _resave(src: Path, dst: Path, **meta_changes) -> Path:
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
    with safe_open(str(src), framework="np") as f:
        meta = json.loads(f.metadata()["mdeploy"])
    meta.update(meta_changes)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(load_file(str(src)), str(dst), metadata={"mdeploy": json.dumps(meta)})
    return dst


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    from pipeline.cli import main
    root = tmp_path_factory.mktemp("security")
    ckpt = mnist_checkpoint(root / "ckpt" / "model.safetensors")
    exported = root / "export"
    assert main(["-q", "export", "--checkpoint", str(ckpt), "--out", str(exported)]) == 0
    marker = root / "PWNED"
    evil = root / "evil.py"
    evil.write_text(EVIL_SOURCE.format(marker=str(marker)))
    spec = f"{evil}:build"
    evil_ckpt = _resave(ckpt, root / "evil" / "model.safetensors", model=spec)
    evil_folder = root / "evil_export"
    shutil.copytree(exported, evil_folder)
    _resave(ckpt, evil_folder / "model.safetensors", model=spec)
    return {"root": root, "ckpt": ckpt, "exported": exported, "marker": marker, "spec": spec,
            "evil_ckpt": evil_ckpt, "evil_folder": evil_folder}


def _error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    return lines[0]


# -- code execution from a data file ----------------------------------------------------

@pytest.mark.parametrize("command", ["verify", "profile-estimate", "export", "quantize", "run"])
def test_metadata_naming_a_python_file_never_runs_it(command, base, tmp_path, cli):
    out = tmp_path / "out"
    folder, ckpt = str(base["evil_folder"]), str(base["evil_ckpt"])
    argv = {"verify": ["verify", folder, "--samples", "2"],
            "profile-estimate": ["profile", folder, "--artifacts", "onnx", "--runs", "1", "--estimate", "all"],
            "export": ["export", "--checkpoint", ckpt, "--out", str(out)],
            "quantize": ["quantize", folder, "--out", str(out), "--samples", "2"],
            "run": ["run", "--out", str(out), "--config", str(tmp_path / "cfg.toml")]}[command]
    (tmp_path / "cfg.toml").write_text(f'checkpoint = "{ckpt}"\nstages = ["export"]\n')
    code, _, err = cli("-q", *argv)
    assert not base["marker"].exists(), "the file named in the metadata was imported"
    assert code == 2
    line = _error(err)
    assert f"--model {base['spec']}" in line          # says what to pass to trust it
    if command != "run":
        assert not out.exists()


def test_the_user_naming_the_factory_runs_it(tmp_path, cli):
    """The legitimate route still works: the factory on the command line."""
    spec = write_external_model(tmp_path / "user")
    folder = tmp_path / "ext"
    assert cli("-q", "export", spec, "--input-size", "32", "--out", str(folder))[0] == 0
    code, _, err = cli("-q", "verify", str(folder), "--samples", "2", "--random-inputs")
    assert code == 2 and f"--model {Path(spec.rpartition(':')[0]).resolve()}:build" in _error(err)
    code, _, err = cli("-q", "verify", str(folder), "--samples", "2", "--random-inputs", "--model", spec)
    assert code == 0, err


# -- writes outside --out ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["x/../../..", "../escape", "..", "/abs", "a/b", "-rf"])
def test_run_name_cannot_leave_out(name, base, tmp_path, cli):
    out = tmp_path / "box" / "runs"
    cfg = tmp_path / "box" / "cfg.toml"
    cfg.parent.mkdir()
    cfg.write_text(f'checkpoint = "{base["ckpt"]}"\nstages = ["report"]\n')
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = cli("-q", "run", "--out", str(out), "--config", str(cfg), f"--name={name}")
    assert code == 2 and "--name" in _error(err)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before
    (tmp_path / "box" / "cfg2.toml").write_text(f'name = "{name}"\n' + cfg.read_text())
    code, _, err = cli("-q", "run", "--out", str(out), "--config", str(tmp_path / "box" / "cfg2.toml"))
    assert code == 2 and "cfg2.toml" in _error(err) and not out.exists()


def test_latest_points_inside_out(base, tmp_path, cli):
    out = tmp_path / "runs"
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'checkpoint = "{base["ckpt"]}"\nstages = ["report"]\n')
    code, _, err = cli("-q", "run", "--out", str(out), "--config", str(cfg), "--name", "ok-name")
    assert code == 0, err
    latest = out / "latest"
    assert latest.is_symlink() and not os.path.isabs(os.readlink(latest))
    assert latest.resolve().parent == out.resolve() and latest.resolve().name.endswith("-ok-name")


def test_manifest_paths_cannot_escape_the_folder(base, tmp_path, cli):
    folder = tmp_path / "f"
    shutil.copytree(base["exported"], folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["artifacts"][1]["path"] = "../../outside.onnx"
    (folder / "manifest.json").write_text(json.dumps(m))
    code, _, err = cli("-q", "verify", str(folder))
    assert code == 2 and "artifacts[1].path" in _error(err)


def test_run_name_validation_unit():
    from models.errors import InputError
    from models.util import path_component
    assert path_component("2026-run_1.b", "--name") == "2026-run_1.b"
    for bad in ("", ".", "..", "a/b", "a\\b", "-x", ".hidden", "a\0b", "x" * 200, None):
        with pytest.raises(InputError):
            path_component(bad, "--name")


# -- ssh / adb option injection -------------------------------------------------------

def _fake_tool(folder: Path, name: str, log: Path) -> Path:
    """An executable named like the real client that records its argv: whether it ran and
    what it was given (it is a stand-in for the ssh binary's argument parsing, not for
    any runtime's numbers)."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / name
    exe.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" >> {log}\necho ran >> {log}.ran\nexit 255\n")
    exe.chmod(0o755)
    return exe


@pytest.mark.parametrize("spec", ["ssh://-oProxyCommand=touch%20{marker}",
                                  "ssh://-oProxyCommand=touch%20{marker}@host",
                                  "ssh://pi@host?python=-c",
                                  "ssh://pi@-oProxyCommand=x",
                                  "adb://-H"])
def test_device_specs_that_would_be_options_are_refused_before_running(spec, base, tmp_path, cli, monkeypatch):
    log = tmp_path / "argv.log"
    bin_dir = tmp_path / "bin"
    for tool in ("ssh", "scp", "adb"):
        _fake_tool(bin_dir, tool, log)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    marker = tmp_path / "marker"
    code, _, err = cli("-q", "profile", str(base["exported"]), "--device", spec.format(marker=marker))
    assert code == 2, err
    _error(err)
    assert not marker.exists() and not (tmp_path / "argv.log.ran").exists(), "the client was run"


def test_ssh_puts_double_dash_before_the_destination(tmp_path):
    from device_tests.devices.ssh import SshDevice
    log = tmp_path / "argv.log"
    exe = _fake_tool(tmp_path / "bin", "ssh", log)
    dev = SshDevice("board.local", user="pi", port=2222, ssh=str(exe))
    with pytest.raises(Exception):
        dev.remote(["echo", "hi"])                  # exit 255: unavailable, after recording argv
    argv = log.read_text().splitlines()
    assert argv.index("--") == argv.index("pi@board.local") - 1
    assert all(not a.startswith("-") for a in argv[argv.index("--") + 1:])


def test_ssh_and_adb_constructors_validate():
    from device_tests.devices.adb import AdbDevice
    from device_tests.devices.ssh import SshDevice
    from models.errors import InputError
    for kw in ({"host": "-oProxyCommand=x"}, {"host": "h", "user": "-l"}, {"host": "h", "port": 0},
               {"host": "h", "python": "-c"}, {"host": "h", "identity": "a b"}, {"host": "a b"}):
        with pytest.raises(InputError):
            SshDevice(**kw)
    for serial in ("-s", "a b", ""):
        with pytest.raises(InputError):
            AdbDevice(serial)
    assert AdbDevice("192.168.1.5:5555").serial == "192.168.1.5:5555"


# -- markup injection ----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ckpt[best].safetensors", "x[/red].safetensors", "[bold]b[/bold].safetensors",
                                  ":smile:.safetensors"])
def test_paths_print_literally_in_errors(name, tmp_path, cli):
    code, _, err = cli("-q", "export", "--checkpoint", str(tmp_path / name), "--out", str(tmp_path / "o"))
    assert code == 2
    assert f"{tmp_path / name}: expected a checkpoint file" in _error(err)


def test_paths_print_literally_in_results(base, tmp_path, cli):
    ckpt = tmp_path / "ckpt[best].safetensors"
    shutil.copy(base["ckpt"], ckpt)
    out = tmp_path / "out[/red][bold]"
    code, stdout, err = cli("export", "--checkpoint", str(ckpt), "--out", str(out))
    assert code == 0, err
    assert f"to {out}" in stdout                       # the result line
    code, stdout, err = cli("verify", str(out), "--samples", "2")
    assert code == 0, err
    assert "Traceback" not in err


def test_ui_escapes_every_string_but_markup(capsys):
    from rich.table import Table

    from pipeline.ui import UI, Markup, esc
    ui = UI()
    ui.info("a [/red] b")
    ui.warn("[bold]w[/bold]")
    ui.result(Markup(f"[bold]{esc('p[x]')}[/bold]"))
    t = Table(title="t[/x]")
    t.add_column("c[/c]")
    t.add_row("cell[/y]")
    ui.table(t)
    out = capsys.readouterr()
    assert "a [/red] b" in out.err and "[bold]w[/bold]" in out.err
    assert "p[x]" in out.out and "[bold]" not in out.out
    assert "t[/x]" in out.out and "c[/c]" in out.out and "cell[/y]" in out.out


# -- parity that passes on NaN ----------------------------------------------------------

def test_nan_outputs_fail_parity(base, tmp_path, cli):
    """The PyTorch reference with one NaN weight: every output is NaN, every comparison with
    NaN is False, so before the fix the tolerance check saw nothing wrong ("pass")."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
    folder = tmp_path / "f"
    shutil.copytree(base["exported"], folder)
    ref = folder / "model.safetensors"
    with safe_open(str(ref), framework="np") as f:
        meta = f.metadata()
    state = load_file(str(ref))
    last_bias = [k for k in state if k.endswith("bias")][-1]
    state[last_bias] = np.full_like(state[last_bias], np.nan)
    save_file(state, str(ref), metadata=meta)
    code, stdout, err = cli("verify", str(folder), "--samples", "3", "--json", "--no-divergence")
    assert code == 1, err
    pair = json.loads(stdout)["pairs"][0]
    assert not pair["passed"] and any("reference output not finite" in f for f in pair["failures"])
    code, stdout, err = cli("verify", str(folder), "--samples", "3", "--no-divergence")
    assert code == 1 and "not finite" in stdout and "0/1 pairs pass" in stdout


def test_nan_inputs_are_bad_input(base, tmp_path, cli):
    np.save(tmp_path / "nan.npy", np.full((3, 1, 28, 28), np.nan, np.float32))
    code, _, err = cli("-q", "verify", str(base["exported"]), "--inputs", str(tmp_path / "nan.npy"))
    assert code == 2 and "nan.npy" in _error(err)


def test_non_finite_outputs_are_a_failure_of_their_own():
    from device_tests.compare import RunResults, Tolerance, compare
    ref = np.zeros((2, 10), np.float32)
    for bad in (np.nan, np.inf):
        out = ref.copy()
        out[0, 3] = bad
        res = RunResults(outputs={"ref": {"logits": ref}, "t": {"logits": out}}, seconds={})
        pair = compare(res, "ref", "t", Tolerance(max_abs=1e30))
        assert not pair.passed and "target output not finite" in pair.failures[0]


def test_unknown_runner_and_empty_comparison_are_errors(base, cli):
    code, _, err = cli("-q", "verify", str(base["exported"]), "--runners", "onnxrun")
    assert code == 2 and "--runners" in _error(err)
    code, _, err = cli("-q", "verify", str(base["exported"]), "--runners", "litert")
    assert code == 2 and "litert" in _error(err)


# -- crash safety: a full disk ------------------------------------------------------------

def test_full_disk_is_one_line_exit_2(base, tmp_path, cli):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.decode().strip()}")
    try:
        code, _, err = cli("-q", "export", "--checkpoint", str(base["ckpt"]), "--out", str(mnt / "out"))
        assert code == 2
        assert "No space left on device" in _error(err)
        assert list(mnt.iterdir()) == [], "no half-written files left"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
