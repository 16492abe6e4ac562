"""Class folders are matched to the model's labels by name; where they do not match, a
one-line note says which folders and which labels, and the accuracy column is left out
(never silently empty). Real ONNX Runtime on a tiny exported model with word labels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.images import match_class_folders

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]

NET = '''
import torch
import torch.nn as nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 12)).eval()
'''


def test_names_match_wherever_they_sort():
    mapping, note = match_class_folders(["nine", "one", "zero"], WORDS)
    assert mapping.tolist() == [9, 1, 0] and note is None


def test_torchvision_numbered_folders_are_class_indices_with_a_note():
    folders = sorted(str(i) for i in range(12))          # '0', '1', '10', '11', '2', ...
    mapping, note = match_class_folders(folders, WORDS)
    assert mapping.tolist() == [int(f) for f in folders], "10/ is class 10, not the third folder"
    assert "numbers, not label names" in note and "0/ = 'zero'" in note


def test_numbered_folders_without_labels_are_indices_not_sort_positions():
    mapping, note = match_class_folders(["0", "1", "10", "2"], None, num_classes=12)
    assert mapping.tolist() == [0, 1, 10, 2] and note is None
    mapping, note = match_class_folders(["0", "12"], None, num_classes=12)
    assert mapping is None and "'12'" in note and "12 classes" in note


def test_one_typo_drops_the_ground_truth_and_says_which():
    folders = [w for w in WORDS if w != "seven"] + ["sevn"]
    mapping, note = match_class_folders(sorted(folders), WORDS)
    assert mapping is None
    assert "'sevn'" in note and "'seven'" in note and "by name" in note and "accuracy not measured" in note
    assert "\n" not in note


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    from pipeline.cli import main
    tmp = tmp_path_factory.mktemp("labels")
    (tmp / "net.py").write_text(NET)
    (tmp / "labels.txt").write_text("\n".join(WORDS) + "\n")
    out = tmp / "export"
    assert main(["-q", "export", f"{tmp / 'net.py'}:build", "--input-size", "16", "--labels",
                 str(tmp / "labels.txt"), "--out", str(out)]) == 0
    return out


def _trust(exported: Path) -> tuple[str, str]:
    """The factory named on the command line: a folder never imports the file it records."""
    return "--model", f"{exported.parent / 'net.py'}:build"


def _folder(root: Path, classes: list[str]) -> Path:
    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_verify_explains_a_mismatch_and_drops_the_accuracy_column(exported, tmp_path, cli):
    imgs = _folder(tmp_path / "imgs", ["one", "sevn", "two"])
    code, out, err = cli("verify", str(exported), "--inputs", str(imgs), "--json", *_trust(exported))
    assert code == 0, err
    doc = json.loads(out)
    assert not doc["inputs"]["labels"] and doc["pairs"][0]["accuracy_reference"] is None
    notes = [n for n in doc["notes"] if "accuracy not measured" in n]
    assert len(notes) == 1 and "'sevn'" in notes[0] and "'seven'" in notes[0], doc["notes"]
    code, out, err = cli("verify", str(exported), "--inputs", str(imgs), *_trust(exported))
    assert code == 0
    assert "accuracy" not in out.split("parity against PyTorch", 1)[1].splitlines()[2], "no accuracy column"
    assert "'sevn'" in out + err


def test_verify_measures_accuracy_when_names_match(exported, tmp_path, cli):
    imgs = _folder(tmp_path / "imgs", ["one", "seven", "two"])
    code, out, err = cli("verify", str(exported), "--inputs", str(imgs), "--json", *_trust(exported))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["inputs"]["labels"] and doc["pairs"][0]["accuracy_reference"] is not None
    assert not [n for n in doc["notes"] if "accuracy not measured" in n]


def test_quantize_report_explains_and_drops_accuracy(exported, tmp_path, cli):
    imgs = _folder(tmp_path / "imgs", ["0", "1", "sevn"])        # mixed: neither names nor indices
    np.save(tmp_path / "calib.npy", np.random.default_rng(1).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    code, out, err = cli("quantize", str(exported), *_trust(exported), "--target", "generic",
                         "--calib", str(tmp_path / "calib.npy"),
                         "--samples", "8", "--eval", str(imgs), "--no-tflite", "--no-sensitivity",
                         "--no-plain-baseline", "--weight-rounding", "rtn", "--out", str(tmp_path / "q"))
    assert code == 0, err
    header = next(line for line in out.splitlines() if "artifact" in line and "SNR" in line)
    assert "accuracy" not in header and "change" not in header
    assert "'sevn'" in out and "accuracy not measured" in out
