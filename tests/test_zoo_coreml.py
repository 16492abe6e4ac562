"""Every registered model through PyTorch -> Core ML (ML Program), fp32 and fp16, run by
the NumPy MIL interpreter against PyTorch; and the MIL ops of every zoo program against
the interpreter's op table. ``make test-zoo`` (marker ``zoo``).

Each model is built at its registered small input size, 3 channels, 10 classes, with
the trained-like random weights of every zoo sweep (``tests.zoo_checks.trained_like``:
none left at zero, BatchNorm statistics and affine terms away from their (0, 1)
defaults, so a wrong epsilon or a mis-folded BatchNorm shows), in eval mode; the
tensor-input variant is converted (the image variant adds two elementwise ops, tested in
``tests/test_coreml_export.py``).

Tolerances are verify's rows (``device_tests/compare.py``): fp32 max |d| on the logits
<= 1e-5 + 1e-5 x max |logit|, fp16 SNR >= 40 dB and top-1 agreement >= 0.99. Where a
model rounds beyond them in PyTorch itself, a miss is judged as verify's float64 check
judges it: fp32 within 2x of PyTorch's own fp32 distance from float64
(``fp32_parity_failure``), fp16 (computed in fp16 here) within 2x (6 dB) of PyTorch's own
fp16 forward (``fp16_parity_failure``; random-weight MobileNetV2 is at 39.2 dB in PyTorch
fp16 and 39.7 dB in Core ML). The measured errors are printed by ``test_report`` (run
with ``-s`` to see them).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from device_tests.compare import error_metrics
from device_tests.mil_interpreter import OP_TABLE, MILInterpreter
from device_tests.mil_program import load_program
from exporters.artifact import ModelCard, Preprocessing
from exporters.coreml import export_coreml
from models import create_model, list_models, model_entry
from models.reparam import is_reparameterizable, reparameterize_model
from tests.zoo_checks import fp16_parity_failure, fp32_parity_failure, trained_like

pytestmark = pytest.mark.zoo

SAMPLES = 4
_RESULTS: dict[str, dict[str, float]] = {}
_OPS: dict[str, list[str]] = {}


@functools.lru_cache(maxsize=None)
def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = trained_like(create_model(name, num_classes=10, in_chans=3), model_entry(name).small_input_size)
    # what `mdeploy export` ships: the deploy form (sparse shifts only export in it)
    return reparameterize_model(model) if is_reparameterizable(model) else model


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("zoo_coreml")


def _converted(name: str, root: Path) -> dict[str, Path]:
    """fp32 and fp16 packages of ``name`` (converted once per session)."""
    out = root / name
    paths = {p: out / f"{name}_{p}_tensor.mlpackage" for p in ("fp32", "fp16")}
    if not all(p.exists() for p in paths.values()):
        size = model_entry(name).small_input_size
        pre = Preprocessing([size, size], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], "RGB")
        export_coreml(_model(name), out, ["fp32", "fp16"], preprocessing=pre, input_kind="tensor",
                      card=ModelCard(name))
        for prec, p in paths.items():
            assert p.exists(), f"{name}: no {prec} package written"
    return paths


@pytest.mark.parametrize("name", list_models())
def test_op_coverage(name, zoo_dir):
    """Every MIL op of the zoo program is one the interpreter implements."""
    ops: set[str] = set()
    for path in _converted(name, zoo_dir).values():
        ops |= set(load_program(path).op_types())
    _OPS[name] = sorted(ops)
    missing = sorted(op for op in ops if op not in OP_TABLE)
    assert not missing, f"{name}: MIL ops the interpreter lacks: {missing}"


@pytest.mark.parametrize("name", list_models())
def test_fp32_and_fp16_parity(name, zoo_dir):
    size = model_entry(name).small_input_size
    x = np.random.default_rng(0).standard_normal((SAMPLES, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        ref = _model(name)(torch.from_numpy(x)).numpy()
    scale = max(1.0, float(np.abs(ref).max()))
    res: dict[str, float] = {"max_logit": scale}
    outs = {}
    for prec, path in _converted(name, zoo_dir).items():
        interp = MILInterpreter(load_program(path))
        outs[prec] = np.concatenate([interp.run({"input": x[i:i + 1]})["logits"] for i in range(SAMPLES)])
        m = error_metrics(ref, outs[prec])
        res[f"{prec}_max_abs"] = m["max_abs"]
        res[f"{prec}_snr_db"] = m["snr_db"] if m["snr_db"] is not None else float("inf")
    res["fp16_top1"] = float((outs["fp16"].argmax(1) == ref.argmax(1)).mean())
    _RESULTS[name] = res
    assert np.abs(ref).max() > 0, f"{name}: all-zero logits prove nothing"
    failure = fp32_parity_failure(_model(name), x, outs["fp32"], name)
    assert failure is None, failure
    failure = fp16_parity_failure(_model(name), x, outs["fp16"], name)
    assert failure is None, failure


def test_report(capsys, zoo_dir):
    """The measured errors per model (a table on stdout with ``-s``): one complete row per
    measured model, every figure a number, every MIL op listed one the interpreter runs.
    Run alone, it measures a small model itself so it always has a row to check."""
    if not _RESULTS:
        name = "squeezenet1_1"
        test_op_coverage(name, zoo_dir)
        test_fp32_and_fp16_parity(name, zoo_dir)
    keys = ("max_logit", "fp32_max_abs", "fp16_max_abs", "fp16_snr_db", "fp16_top1")
    lines = [f"{'model':24s} {'max|logit|':>10s} {'fp32 max|d|':>12s} {'fp16 max|d|':>12s} "
             f"{'fp16 SNR dB':>11s} {'fp16 top1':>9s}"]
    for name, r in sorted(_RESULTS.items()):
        assert set(keys) <= set(r) and not any(np.isnan(r[k]) for k in keys), f"{name}: incomplete row {r}"
        assert 0.0 <= r["fp16_top1"] <= 1.0 and r["fp32_max_abs"] <= r["max_logit"], f"{name}: {r}"
        lines.append(f"{name:24s} {r['max_logit']:10.3g} {r['fp32_max_abs']:12.3g} {r['fp16_max_abs']:12.3g} "
                     f"{r['fp16_snr_db']:11.1f} {r['fp16_top1']:9.2f}")
    ops = sorted({op for v in _OPS.values() for op in v})
    assert ops and set(ops) <= set(OP_TABLE), f"ops without an interpreter: {sorted(set(ops) - set(OP_TABLE))}"
    lines.append(f"MIL ops in the zoo programs ({len(ops)}): {', '.join(ops)}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert len(lines) == len(_RESULTS) + 2 and all(name in "\n".join(lines) for name in _RESULTS)
