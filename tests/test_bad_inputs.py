"""A corpus of bad inputs to every command and the config file: each is refused with exit
code 2 and exactly one line on stderr naming the file or option, before any work, with
nothing written to ``--out`` and nothing that existed before changed.

Everything runs in-process (the ``cli`` fixture) on small shared fixtures built once: an
untrained MNIST checkpoint and its ONNX export. Every case is detected before heavy work,
so the whole file takes well under a minute and a half.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tests.parity_helpers import mnist_checkpoint


# -- shared fixtures ----------------------------------------------------------------------

def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width x height pixels with one tiny IDAT: Pillow's decompression-bomb
    check fires at open, so no 200-megapixel image has to be written or decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def _write_png(path: Path, value: int = 0, size: int = 28) -> Path:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path


def _resave(src: Path, dst: Path, **meta_changes) -> Path:
    """A copy of an mdeploy checkpoint with metadata fields changed (the weights as they are)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
    with safe_open(str(src), framework="np") as f:
        meta = json.loads(f.metadata()["mdeploy"])
    meta.update(meta_changes)
    save_file(load_file(str(src)), str(dst), metadata={"mdeploy": json.dumps(meta)})
    return dst


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> dict[str, Path]:
    from pipeline.cli import main
    root = tmp_path_factory.mktemp("bad_inputs")
    c: dict[str, Path] = {"root": root}
    c["ckpt"] = mnist_checkpoint(root / "ckpt" / "model.safetensors")
    c["exported"] = root / "export"
    assert main(["-q", "export", "--checkpoint", str(c["ckpt"]), "--out", str(c["exported"])]) == 0
    c["previous"] = root / "previous"                       # an earlier result: must not change
    shutil.copytree(c["exported"], c["previous"])
    data = root / "data"
    data.mkdir()
    c["file"] = data / "plain.txt"
    c["file"].write_text("a file, not a folder\n")
    c["bomb"] = _png_header_only(data / "bomb.png", 14000, 14000)
    c["bad_png"] = data / "broken.png"
    c["bad_png"].write_bytes(b"\x89PNG\r\n\x1a\n not really")
    np.savez(data / "pickled.npz", x=np.array([{"a": 1}, None], dtype=object))
    c["pickled"] = data / "pickled.npz"
    np.save(data / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    c["pickled_npy"] = data / "pickled.npy"
    np.save(data / "wrong_shape.npy", np.zeros((2, 1, 32, 32), np.float32))
    c["wrong_shape"] = data / "wrong_shape.npy"
    # image folders for train
    _write_png(data / "one_class" / "cat" / "a.png")
    _write_png(data / "one_class" / "cat" / "b.png", 255)
    c["one_class"] = data / "one_class"
    _write_png(data / "bombed" / "a" / "x.png")
    (data / "bombed" / "b").mkdir()
    shutil.copy(c["bomb"], data / "bombed" / "b" / "y.png")
    c["bombed"] = data / "bombed"
    (data / "empty_classes" / "a").mkdir(parents=True)
    (data / "empty_classes" / "b").mkdir()
    c["empty_classes"] = data / "empty_classes"
    nonutf = data / "nonutf"
    _write_png(nonutf / "ok" / "a.png")
    bad_dir = Path(bytes(nonutf).decode() + "/" + b"caf\xe9".decode("utf-8", "surrogateescape"))
    _write_png(bad_dir / "b.png", 255)
    c["nonutf"] = nonutf
    # checkpoints with bad metadata
    c["neg_classes"] = _resave(c["ckpt"], data / "neg_classes.safetensors", num_classes=-3)
    c["str_chans"] = _resave(c["ckpt"], data / "str_chans.safetensors", in_chans="three")
    c["kwargs_list"] = _resave(c["ckpt"], data / "kwargs_list.safetensors", model_kwargs=[1, 2])
    c["no_model"] = _resave(c["ckpt"], data / "no_model.safetensors", model=None)
    c["labels_nonutf"] = _resave(c["ckpt"], data / "labels_nonutf.safetensors",
                                 labels=[str(i) for i in range(9)] + ["caf\udce9"])
    c["garbage_ckpt"] = data / "garbage.safetensors"
    c["garbage_ckpt"].write_bytes(b"\x00" * 64)
    import torch
    c["pickle_pt"] = data / "pickle.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": Path("x")}, c["pickle_pt"])
    (data / "labels3.txt").write_text("a\nb\nc\n")
    c["labels3"] = data / "labels3.txt"
    # export folders with bad manifests (copies; the shared export stays as it is)
    for name, edit in _MANIFEST_EDITS.items():
        folder = root / f"manifest_{name}"
        shutil.copytree(c["exported"], folder)
        path = folder / "manifest.json"
        m = json.loads(path.read_text())
        edit(m)
        path.write_text(json.dumps(m) if name != "not_json" else "{ not json")
        c[f"manifest_{name}"] = folder
    only_pt = root / "only_pt"
    shutil.copytree(c["exported"], only_pt)
    m = json.loads((only_pt / "manifest.json").read_text())
    m["artifacts"] = [a for a in m["artifacts"] if a["format"] == "pt"]
    (only_pt / "manifest.json").write_text(json.dumps(m))
    c["only_pt"] = only_pt
    truncated = root / "truncated_tflite"
    shutil.copytree(c["exported"], truncated)
    m = json.loads((truncated / "manifest.json").read_text())
    onnx_art = next(a for a in m["artifacts"] if a["format"] == "onnx")
    m["artifacts"].append({**onnx_art, "path": "model_fp32.tflite", "format": "tflite", "sha256": ""})
    (truncated / "manifest.json").write_text(json.dumps(m))
    (truncated / "model_fp32.tflite").write_bytes(b"\x1c\x00\x00\x00TFL3" + b"\x00" * 40)
    c["truncated_tflite"] = truncated
    truncated_onnx = root / "truncated_onnx"
    shutil.copytree(c["exported"], truncated_onnx)
    data_onnx = (truncated_onnx / "model.onnx").read_bytes()
    (truncated_onnx / "model.onnx").write_bytes(data_onnx[: len(data_onnx) // 3])
    c["truncated_onnx"] = truncated_onnx
    # run configurations
    configs = root / "configs"
    configs.mkdir()
    for name, text in _CONFIGS.items():
        (configs / f"{name}.toml").write_text(text)
    c["configs"] = configs
    return c


_MANIFEST_EDITS: dict[str, Callable[[dict], None]] = {
    "input_size_str": lambda m: m["preprocessing"].update(input_size="28x28"),
    "input_size_neg": lambda m: m["preprocessing"].update(input_size=[-28, 28]),
    "mean_str": lambda m: m["preprocessing"].update(mean="zero"),
    "std_zero": lambda m: m["preprocessing"].update(std=[0.0]),
    "channel_order": lambda m: m["preprocessing"].update(channel_order="CMYK"),
    "labels_dict": lambda m: m.update(labels={"a": 1}),
    "path_escape": lambda m: m["artifacts"][1].update(path="../../../etc/passwd"),
    "path_absolute": lambda m: m["artifacts"][1].update(path="/etc/passwd"),
    "artifacts_str": lambda m: m.update(artifacts="model.onnx"),
    "shape_neg": lambda m: m["artifacts"][1]["inputs"][0].update(shape=[1, 1, -28, 28]),
    "no_preprocessing": lambda m: m.pop("preprocessing"),
    "not_json": lambda m: None,
}

_CONFIGS = {
    "name_escape": 'name = "x/../../.."\n',
    "name_dotdot": 'name = ".."\n',
    "unknown_key": 'nmae = "typo"\n',
    "not_toml": 'name = "unterminated\n',
    "opset": "[export]\nopset = 999\n",
    "formats": '[export]\nformats = ["onnx", "caffe"]\n',
    "precisions": '[export]\ntflite_precisions = ["int3"]\n',
    "epochs_zero": "[train]\nepochs = 0\n",
    "batch_zero": "[train]\nbatch_size = 0\n",
    "batch_huge": "[train]\nbatch_size = 1000000000\n",
    "input_size": "[train]\ninput_size = -5\n",
    "train_model": '[train]\nmodel = "no_such_net"\n',
    "method": '[quantize]\nmethod = "bogus"\n',
    "float_fixes": '[quantize]\nfloat_fixes = ["bogus"]\n',
    "tflite_inputs": '[quantize]\ntflite_inputs = ["uint4-pixels"]\n',
    "tflite_inputs_empty": '[quantize]\ntflite_inputs = []\n',
    "device": '[profile]\ndevices = ["ssh://-oProxyCommand=touch@host"]\n',
    "device_kind": '[profile]\ndevices = ["toaster"]\n',
    "runs": "[profile]\nruns = 0\n",
    "samples": "[verify]\nsamples = 0\n",
    "checkpoint": 'checkpoint = "/nonexistent/model.safetensors"\nstages = ["export"]\n',
    "stages": 'stages = ["train", "bake"]\n',
    "coreml_input": '[export]\ncoreml_input = "video"\n',
    "repvgg_models": '[repvgg]\nmodels = ["../../outside"]\n',
}


# -- the corpus -----------------------------------------------------------------------------
# (id, argv builder, text the error line must contain). {out} is a fresh folder per case.

Case = tuple[str, Callable[[dict, Path], list[str]], str]


class _Paths(dict):
    """Format values: the fixture's paths, ``out``; an unknown key is shown as itself."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def _cmd(*argv: str) -> Callable[[dict, Path], list[str]]:
    return lambda c, out: [a.format_map(_Paths({**{k: str(v) for k, v in c.items()}, "out": str(out)}))
                           for a in argv]


def _train(*extra: str) -> Callable[[dict, Path], list[str]]:
    return _cmd("train", "mobilenet_v2", "--out", "{out}", "--model-arg", "width_mult=0.35", *extra)


CASES: list[Case] = [
    # train
    ("train-unknown-model", _cmd("train", "no_such_net", "--out", "{out}"), "no_such_net"),
    ("train-epochs-0", _train("--epochs", "0"), "--epochs"),
    ("train-epochs-neg", _train("--epochs", "-3"), "--epochs"),
    ("train-batch-0", _train("--batch-size", "0"), "--batch-size"),
    ("train-batch-huge", _train("--batch-size", "1000000000000"), "--batch-size"),
    ("train-lr-0", _train("--lr", "0"), "--lr"),
    ("train-input-size-0", _train("--input-size", "0"), "--input-size"),
    ("train-input-size-neg", _train("--input-size", "-5"), "--input-size"),
    ("train-label-smoothing", _train("--label-smoothing", "1.5"), "--label-smoothing"),
    ("train-weight-decay", _train("--weight-decay", "-1"), "--weight-decay"),
    ("train-samples-0", _train("--train-samples", "0"), "--train-samples"),
    ("train-threads-0", _train("--threads", "0"), "--threads"),
    ("train-optimizer", _train("--optimizer", "rmsprop"), "--optimizer"),
    ("train-epochs-text", _train("--epochs", "many"), "--epochs"),
    ("train-model-arg", _train("--model-arg", "width_mult"), "--model-arg"),
    ("train-data-missing", _train("--data", "{root}/nowhere"), "nowhere"),
    ("train-data-file", _train("--data", "{file}"), "plain.txt"),
    ("train-data-one-class", _train("--data", "{one_class}"), "one_class"),
    ("train-data-empty-classes", _train("--data", "{empty_classes}"), "empty_classes"),
    ("train-data-bomb", _train("--data", "{bombed}"), "y.png"),
    ("train-data-non-utf8", _train("--data", "{nonutf}"), "nonutf"),
    ("train-out-under-file", _cmd("train", "mobilenet_v2", "--out", "{file}/sub"), "plain.txt"),
    ("train-out-proc", _cmd("train", "mobilenet_v2", "--out", "/proc/mdeploy-test"), "/proc"),
    ("train-out-existing", _cmd("train", "mobilenet_v2", "--out", "{previous}"), "--force"),
    # export
    ("export-nothing", _cmd("export", "--out", "{out}"), "MODEL"),
    ("export-unknown-model", _cmd("export", "no_such_net", "--out", "{out}"), "no_such_net"),
    ("export-format", _cmd("export", "--checkpoint", "{ckpt}", "--out", "{out}", "--formats", "onnx,caffe"), "--formats"),
    ("export-precision", _cmd("export", "--checkpoint", "{ckpt}", "--out", "{out}", "--formats", "tflite",
                              "--precisions", "int3"), "int3"),
    ("export-opset-999", _cmd("export", "--checkpoint", "{ckpt}", "--out", "{out}", "--opset", "999"), "--opset"),
    ("export-opset-6", _cmd("export", "--checkpoint", "{ckpt}", "--out", "{out}", "--opset", "6"), "--opset"),
    ("export-opset-0", _cmd("export", "--checkpoint", "{ckpt}", "--out", "{out}", "--opset", "0"), "--opset"),
    ("export-input-size-0", _cmd("export", "--checkpoint", "{ckpt}", "--out", "{out}", "--input-size", "0"), "--input-size"),
    ("export-input-size-neg", _cmd("export", "--checkpoint", "{ckpt}", "--out", "{out}", "--input-size", "-5"), "--input-size"),
    ("export-num-classes-0", _cmd("export", "mobilenet_v2", "--out", "{out}", "--num-classes", "0"), "--num-classes"),
    ("export-in-chans-0", _cmd("export", "mobilenet_v2", "--out", "{out}", "--in-chans", "0"), "--in-chans"),
    ("export-ckpt-missing", _cmd("export", "--checkpoint", "{root}/none.safetensors", "--out", "{out}"), "none.safetensors"),
    ("export-ckpt-garbage", _cmd("export", "--checkpoint", "{garbage_ckpt}", "--out", "{out}"), "garbage.safetensors"),
    ("export-ckpt-pickle", _cmd("export", "--checkpoint", "{pickle_pt}", "--out", "{out}"), "pickle.pt"),
    ("export-ckpt-neg-classes", _cmd("export", "--checkpoint", "{neg_classes}", "--out", "{out}"), "num_classes"),
    ("export-ckpt-str-chans", _cmd("export", "--checkpoint", "{str_chans}", "--out", "{out}"), "in_chans"),
    ("export-ckpt-kwargs", _cmd("export", "--checkpoint", "{kwargs_list}", "--out", "{out}"), "model_kwargs"),
    ("export-ckpt-no-model", _cmd("export", "--checkpoint", "{no_model}", "--out", "{out}"), "no_model.safetensors"),
    ("export-ckpt-labels-non-utf8", _cmd("export", "--checkpoint", "{labels_nonutf}", "--out", "{out}",
                                         "--formats", "onnx"), "UTF-8"),
    ("export-labels-missing", _cmd("export", "--checkpoint", "{ckpt}", "--out", "{out}", "--labels", "{root}/nolabels.txt"),
     "nolabels.txt"),
    ("export-labels-count", _cmd("export", "--checkpoint", "{ckpt}", "--out", "{out}", "--labels", "{labels3}"), "labels"),
    ("export-coreml-input", _cmd("export", "--checkpoint", "{ckpt}", "--out", "{out}", "--coreml-input", "video"),
     "--coreml-input"),
    ("export-tflite-layout", _cmd("export", "--checkpoint", "{ckpt}", "--out", "{out}", "--tflite-layout", "hwcn"),
     "--tflite-layout"),
    ("export-out-proc", _cmd("export", "--checkpoint", "{ckpt}", "--out", "/proc/mdeploy-test"), "/proc"),
    ("export-out-under-file", _cmd("export", "--checkpoint", "{ckpt}", "--out", "{file}/x"), "plain.txt"),
    ("export-out-existing", _cmd("export", "--checkpoint", "{ckpt}", "--out", "{previous}"), "--force"),
    # quantize
    ("quantize-missing-folder", _cmd("quantize", "{root}/nowhere", "--out", "{out}"), "nowhere"),
    ("quantize-target", _cmd("quantize", "{exported}", "--out", "{out}", "--target", "toaster"), "--target"),
    ("quantize-method", _cmd("quantize", "{exported}", "--out", "{out}", "--method", "bogus"), "--method"),
    ("quantize-tflite-input", _cmd("quantize", "{exported}", "--out", "{out}", "--tflite-input", "uint4"),
     "--tflite-input"),
    ("quantize-samples-0", _cmd("quantize", "{exported}", "--out", "{out}", "--samples", "0"), "--samples"),
    ("quantize-float-fixes", _cmd("quantize", "{exported}", "--out", "{out}", "--float-fixes", "bogus"), "bogus"),
    ("quantize-rounding", _cmd("quantize", "{exported}", "--out", "{out}", "--weight-rounding", "bogus"), "bogus"),
    ("quantize-rounding-samples", _cmd("quantize", "{exported}", "--out", "{out}", "--rounding-samples", "0"),
     "--rounding-samples"),
    ("quantize-eval-samples", _cmd("quantize", "{exported}", "--out", "{out}", "--eval-samples", "0"), "--eval-samples"),
    ("quantize-sqnr-nan", _cmd("quantize", "{exported}", "--out", "{out}", "--target-sqnr", "nan"), "--target-sqnr"),
    ("quantize-calib-missing", _cmd("quantize", "{exported}", "--out", "{out}", "--calib", "{root}/nocalib"), "nocalib"),
    ("quantize-calib-pickle", _cmd("quantize", "{exported}", "--out", "{out}", "--calib", "{pickled}"), "pickled.npz"),
    ("quantize-calib-bomb", _cmd("quantize", "{exported}", "--out", "{out}", "--calib", "{bomb}"), "bomb.png"),
    ("quantize-out-proc", _cmd("quantize", "{exported}", "--out", "/proc/mdeploy-test"), "/proc"),
    ("quantize-out-existing", _cmd("quantize", "{exported}", "--out", "{previous}"), "--force"),
    ("quantize-manifest", _cmd("quantize", "{manifest_input_size_str}", "--out", "{out}"), "input_size"),
    # verify
    ("verify-missing-folder", _cmd("verify", "{root}/nowhere"), "nowhere"),
    ("verify-samples-0", _cmd("verify", "{exported}", "--samples", "0"), "--samples"),
    ("verify-samples-text", _cmd("verify", "{exported}", "--samples", "lots"), "--samples"),
    ("verify-tolerance-key", _cmd("verify", "{exported}", "--tolerance", "atoll=1"), "atoll"),
    ("verify-tolerance-precision", _cmd("verify", "{exported}", "--tolerance", "int3:max_abs=1"), "int3"),
    ("verify-tolerance-value", _cmd("verify", "{exported}", "--tolerance", "max_abs=tiny"), "--tolerance"),
    ("verify-runners-unknown", _cmd("verify", "{exported}", "--runners", "onnxrun"), "--runners"),
    ("verify-runners-absent", _cmd("verify", "{exported}", "--runners", "litert"), "litert"),
    ("verify-only-reference", _cmd("verify", "{only_pt}"), "manifest.json"),
    ("verify-inputs-missing", _cmd("verify", "{exported}", "--inputs", "{root}/none.npz"), "none.npz"),
    ("verify-inputs-pickle", _cmd("verify", "{exported}", "--inputs", "{pickled}"), "pickled.npz"),
    ("verify-inputs-pickle-npy", _cmd("verify", "{exported}", "--inputs", "{pickled_npy}"), "pickled.npy"),
    ("verify-inputs-shape", _cmd("verify", "{exported}", "--inputs", "{wrong_shape}"), "wrong_shape.npy"),
    ("verify-inputs-bomb", _cmd("verify", "{exported}", "--inputs", "{bomb}"), "bomb.png"),
    ("verify-inputs-broken-png", _cmd("verify", "{exported}", "--inputs", "{bad_png}"), "broken.png"),
    ("verify-threads-0", _cmd("verify", "{exported}", "--threads", "0"), "--threads"),
    ("verify-batch-0", _cmd("verify", "{exported}", "--batch-size", "0"), "--batch-size"),
    ("verify-divergence-0", _cmd("verify", "{exported}", "--divergence-samples", "0"), "--divergence-samples"),
    ("verify-runner-option", _cmd("verify", "{exported}", "--runner-option", "dtype=float16"), "--runner-option"),
    ("verify-torch-dtype", _cmd("verify", "{exported}", "--runner-option", "torch.dtype=float16"), "torch.dtype"),
    ("verify-truncated-onnx", _cmd("verify", "{truncated_onnx}", "--samples", "2"), "model.onnx"),
    *[(f"verify-manifest-{name}", _cmd("verify", "{manifest_" + name + "}"), "manifest")
      for name in ("input_size_str", "input_size_neg", "mean_str", "std_zero", "channel_order", "labels_dict",
                   "artifacts_str", "shape_neg", "no_preprocessing", "not_json")],
    *[(f"verify-manifest-{name}", _cmd("verify", "{manifest_" + name + "}"), "path")
      for name in ("path_escape", "path_absolute")],
    # profile
    ("profile-missing-folder", _cmd("profile", "{root}/nowhere"), "nowhere"),
    ("profile-device-kind", _cmd("profile", "{exported}", "--device", "toaster"), "--device"),
    ("profile-ssh-host-option", _cmd("profile", "{exported}", "--device", "ssh://-oProxyCommand=x"), "ssh://"),
    ("profile-ssh-user-option", _cmd("profile", "{exported}", "--device", "ssh://-oProxyCommand=x@host"), "user"),
    ("profile-ssh-python-option", _cmd("profile", "{exported}", "--device", "ssh://pi@host?python=-c"), "python"),
    ("profile-ssh-port", _cmd("profile", "{exported}", "--device", "ssh://pi@host:99999"), "port"),
    ("profile-ssh-option-key", _cmd("profile", "{exported}", "--device", "ssh://pi@host?proxy=x"), "proxy"),
    ("profile-adb-serial-option", _cmd("profile", "{exported}", "--device", "adb://-d"), "serial"),
    ("profile-runs-0", _cmd("profile", "{exported}", "--runs", "0"), "--runs"),
    ("profile-warmup-neg", _cmd("profile", "{exported}", "--warmup", "-1"), "--warmup"),
    ("profile-artifacts", _cmd("profile", "{exported}", "--artifacts", "caffe"), "--artifacts"),
    ("profile-truncated-tflite", _cmd("profile", "{truncated_tflite}", "--runs", "1"), "model_fp32.tflite"),
    ("profile-truncated-onnx", _cmd("profile", "{truncated_onnx}", "--runs", "1"), "model.onnx"),
    ("profile-manifest", _cmd("profile", "{manifest_path_escape}"), "path"),
    # run
    ("run-name-escape", _cmd("run", "--out", "{out}", "--name", "x/../../..", "--stages", "train"), "--name"),
    ("run-name-dotdot", _cmd("run", "--out", "{out}", "--name", "..", "--stages", "train"), "--name"),
    ("run-name-option", _cmd("run", "--out", "{out}", "--name", "-rf", "--stages", "train"), "--name"),
    ("run-epochs-0", _cmd("run", "--out", "{out}", "--epochs", "0"), "--epochs"),
    ("run-epochs-neg", _cmd("run", "--out", "{out}", "--epochs", "-3"), "--epochs"),
    ("run-stages", _cmd("run", "--out", "{out}", "--stages", "train,bake"), "--stages"),
    ("run-no-train-no-ckpt", _cmd("run", "--out", "{out}", "--stages", "export"), "--stages"),
    ("run-config-missing", _cmd("run", "--out", "{out}", "--config", "{root}/none.toml"), "none.toml"),
    ("run-out-proc", _cmd("run", "--out", "/proc/mdeploy-runs", "--stages", "train"), "/proc"),
    ("run-out-is-file", _cmd("run", "--out", "{file}", "--stages", "train"), "plain.txt"),
    ("run-out-under-file", _cmd("run", "--out", "{file}/runs", "--stages", "train"), "plain.txt"),
    *[(f"run-config-{name}", _cmd("run", "--out", "{out}", "--config", "{configs}/" + name + ".toml"), f"{name}.toml")
      for name in _CONFIGS],
    # models, doctor
    ("models-input-size", _cmd("models", "--input-size", "0"), "--input-size"),
    ("models-num-classes", _cmd("models", "--num-classes", "-1"), "--num-classes"),
    ("models-pattern", _cmd("models", "no_such_*"), "no_such_"),
    ("doctor-fix", _cmd("doctor", "--fix", "windows"), "--fix"),
    ("unknown-command", _cmd("deploy"), "deploy"),
]


def _hashes(*folders: Path) -> dict[str, str]:
    out = {}
    for folder in folders:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[str(p)] = "dir"
    return out


def test_the_corpus_is_large_and_covers_every_command():
    commands = {build({}, Path("/o"))[0] for _, build, _ in CASES}
    assert len(CASES) >= 80 and len({c[0] for c in CASES}) == len(CASES)
    assert {"train", "export", "quantize", "verify", "profile", "run", "models", "doctor"} <= commands


@pytest.mark.parametrize("name,build,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, build, needle, ctx, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)                    # a default ./runs would land here, and be seen
    out = tmp_path / "out"
    watched = _hashes(ctx["root"])
    code, stdout, stderr = cli("-q", *build(ctx, out))
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, (name, code, stderr[-2000:])
    assert len(lines) == 1, (name, stderr[-2000:])
    assert "Traceback" not in stderr
    assert needle in lines[0], (name, lines[0])
    assert not out.exists(), f"{name}: wrote {out}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [], f"{name}: wrote {list(tmp_path.iterdir())}"
    assert _hashes(ctx["root"]) == watched, f"{name}: changed an earlier file"


def test_a_full_disk_names_the_out_folder_not_only_a_staging_file():
    """ENOSPC inside a staging folder: the one line names the file and the ``--out`` the
    command was writing (the staging folder's name alone says nothing to a user)."""
    import errno
    from pipeline.cli import environment_error_line
    exc = OSError(errno.ENOSPC, "No space left on device", "/data/.app.123.staging/model.onnx")
    line = environment_error_line(exc, "/data/app")
    assert line.startswith("/data/.app.123.staging/model.onnx: No space left on device")
    assert "--out /data/app" in line and "\n" not in line
    assert environment_error_line(OSError(errno.EROFS, "Read-only file system"), None) == \
        "output: Read-only file system"
