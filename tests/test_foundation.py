"""Foundation pieces: data sets, checkpoints, complexity counting, atomic files, the CLI basics."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from exporters.fileio import atomic_write_text, staged_output_dir
from models.checkpoint import build_model, checkpoint_bytes, load_checkpoint
from models.complexity import count_complexity
from models.datasets import load_dataset, to_model_input
from models.errors import InputError


# -- data ------------------------------------------------------------------------------
def test_bundled_mnist_split_is_stratified_disjoint_and_fixed():
    tr, te = load_dataset("mnist", "train"), load_dataset("mnist", "test")
    assert tr.images.shape == (4000, 28, 28, 1) and te.images.shape == (1000, 28, 28, 1)
    assert tr.images.dtype == np.uint8
    assert np.bincount(te.labels).tolist() == [100] * 10          # stratified 80/20 of 500 a class
    # disjoint: no test image appears in train
    train_rows = {r.tobytes() for r in tr.images}
    assert sum(r.tobytes() in train_rows for r in te.images) <= 2  # MNIST has a few exact duplicates
    assert np.array_equal(load_dataset("mnist", "test").labels, te.labels)   # same split every call


def test_image_folder_and_bad_folders(tmp_path):
    from PIL import Image
    for cls in ("cat", "dog"):
        (tmp_path / "ds" / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(np.full((10, 12, 3), i * 20, np.uint8)).save(tmp_path / "ds" / cls / f"{i}.png")
    s = load_dataset(tmp_path / "ds", "all")
    assert s.images.shape == (10, 10, 12, 3) and s.classes == ["cat", "dog"]
    assert len(load_dataset(tmp_path / "ds", "train")) + len(load_dataset(tmp_path / "ds", "test")) == 10
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(InputError, match="no images"):
        load_dataset(tmp_path / "empty", "all")
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="readable image"):
        load_dataset(tmp_path / "bad", "all")
    with pytest.raises(InputError, match="no such file"):
        load_dataset(tmp_path / "missing")


def test_to_model_input_normalises_and_converts_channels():
    img = np.full((2, 4, 4, 1), 255, np.uint8)
    x = to_model_input(img, 4, (0.5,), (0.25,))
    assert x.shape == (2, 1, 4, 4) and np.allclose(x, 2.0)
    x3 = to_model_input(img, 8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x3.shape == (2, 3, 8, 8) and np.allclose(x3, 1.0, atol=1e-6)


# -- checkpoints -------------------------------------------------------------------------
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_checkpoint_roundtrip_and_factory_file(tmp_path):
    model = _Tiny()
    (tmp_path / "net.py").write_text(
        "import torch.nn as nn\n"
        "class _Tiny(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(1, 4, 3)\n"
        "        self.fc = nn.Linear(4, 2)\n"
        "    def forward(self, x):\n"
        "        return self.fc(self.conv(x).mean((2, 3)))\n"
        "def make():\n    return _Tiny()\n")
    ckpt = tmp_path / "w.safetensors"
    ckpt.write_bytes(checkpoint_bytes(model, {"labels": ["a", "b"]}))
    state, meta = load_checkpoint(ckpt)
    assert meta == {"labels": ["a", "b"]} and torch.equal(state["fc.weight"], model.fc.weight)
    rebuilt, meta = build_model(f"{tmp_path / 'net.py'}:make", ckpt)
    x = torch.randn(1, 1, 6, 6)
    assert torch.equal(rebuilt(x), model.eval()(x))
    # a .pt with DDP's "module." prefix, loaded weights-only
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "w.pt")
    rebuilt2, _ = build_model(f"{tmp_path / 'net.py'}:make", tmp_path / "w.pt")
    assert torch.equal(rebuilt2(x), model(x))


def test_checkpoint_errors_are_one_line(tmp_path):
    (tmp_path / "net.py").write_text("import torch.nn as nn\ndef make():\n    return nn.Linear(3, 2)\n")
    torch.save({"weight": torch.zeros(2, 3)}, tmp_path / "missing.pt")
    with pytest.raises(InputError, match=r"1 missing \(bias\)"):
        build_model(f"{tmp_path / 'net.py'}:make", tmp_path / "missing.pt")
    torch.save({"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}, tmp_path / "shape.pt")
    with pytest.raises(InputError, match="weight of shape"):
        build_model(f"{tmp_path / 'net.py'}:make", tmp_path / "shape.pt")

    class Evil:                                       # a pickle that would run code
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(InputError, match="weights-only"):
        load_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "trunc.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(InputError, match="safetensors"):
        load_checkpoint(tmp_path / "trunc.safetensors")


# -- complexity ---------------------------------------------------------------------------
def test_complexity_counts_grouped_depthwise_and_linear_by_hand():
    m = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten(), nn.Linear(8 * 5 * 5, 10))
    c = count_complexity(m, 5)
    # by hand: out elems x (in/groups) x k*k
    grouped = 8 * 25 * (4 // 2) * 9
    depthwise = 8 * 25 * 1 * 9
    linear = 200 * 10
    assert c.macs == grouped + depthwise + linear
    assert c.params == (8 * 2 * 9 + 8) + 16 + (8 * 9 + 8) + (200 * 10 + 10)   # BN affine counted
    per_layer = {layer.name: layer.macs for layer in c.layers}
    assert per_layer == {"0": grouped, "1": 0, "2": 0, "3": depthwise, "4": 0, "5": linear}


def test_complexity_sees_functional_matmul():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 5))

        def forward(self, x):
            return x.flatten(1) @ self.w.T.repeat(3 * 2 * 2 // 5 + 1, 1)[:12]

    assert count_complexity(M(), (3, 2, 2)).macs == 12 * 6


# -- files ---------------------------------------------------------------------------------
def test_staged_output_dir_leaves_nothing_on_failure_and_refuses_overwrite(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_output_dir(out) as stage:
            atomic_write_text(stage / "a.txt", "half")
            raise RuntimeError("stage failed")
    assert not out.exists() and not any(tmp_path.iterdir())
    with staged_output_dir(out) as stage:
        atomic_write_text(stage / "a.txt", "first")
    with pytest.raises(InputError, match="--force"):
        with staged_output_dir(out) as stage:
            pass
    assert (out / "a.txt").read_text() == "first"
    with staged_output_dir(out, force=True) as stage:
        atomic_write_text(stage / "b.txt", "second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- CLI ------------------------------------------------------------------------------------
def test_cli_bad_arguments_are_one_line_exit_2(cli):
    code, out, err = cli("train", "no_such_model", "--out", "/tmp/x-never-written")
    assert code == 2 and err.count("\n") == 1 and "no_such_model" in err
    code, out, err = cli("frobnicate")
    assert code == 2 and err.count("\n") == 1
    code, out, err = cli("train", "mobilenet_v2", "--out", "/tmp/x-never-written", "--epochs", "0")
    assert code == 2 and "epochs" in err and err.count("\n") == 1


def test_doctor_json_reports_versions_and_capabilities(cli):
    code, out, _ = cli("doctor", "--json")
    report = json.loads(out)
    names = {c["name"]: c for c in report["checks"]}
    assert code == 0 and names["python package torch"]["detail"].startswith("2.13")
    core_ml = names["Core ML prediction"]
    assert core_ml["ok"] == (report["platform"].split()[0] == "Darwin")
    assert all(c["fix"] for c in report["checks"] if not c["ok"])   # every gap names its fix
