"""Every zoo model to an ExecuTorch ``.pte`` (XNNPACK), fp32 parity on ``executorch.runtime``.

Marked ``zoo`` (``make test-zoo``). Each model at its registered small input size, in its
deploy form where it has one (as ``mdeploy export`` ships it), with the zoo sweeps'
trained-like weights (``tests.zoo_checks.trained_like``), run on 3 inputs. The judgement
is verify's: ``1e-5 + 1e-5 * max|logit|``, or the float64 rule (``fp32_parity_failure``).
The manifest's op split must show the model inside XNNPACK (a portable-kernel op is where
a phone loses time, so it is reported, not failed).

A model that cannot be lowered is listed in ``KNOWN_FAILURES`` with the converter's message
(strict xfail: a fix shows as XPASS).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from device_tests.runners.executorch import ExecuTorchRunner
from exporters.executorch import export_executorch
from models import create_model, list_models, model_entry
from models.errors import InputError
from models.reparam import is_reparameterizable, reparameterize_model
from tests.zoo_checks import fp32_parity_failure, trained_like

pytestmark = pytest.mark.zoo

KNOWN_FAILURES: dict[str, str] = {}


def _params() -> list:
    return [pytest.param(n, marks=[pytest.mark.xfail(raises=InputError, strict=True, reason=KNOWN_FAILURES[n])]
                         if n in KNOWN_FAILURES else [], id=n) for n in list_models()]


@pytest.mark.parametrize("name", _params())
def test_zoo_model_lowers_to_xnnpack_with_fp32_parity(name, tmp_path, record_property):
    size = model_entry(name).small_input_size
    torch.manual_seed(0)
    model = trained_like(create_model(name, num_classes=10, in_chans=3), size)
    if is_reparameterizable(model):
        model = reparameterize_model(model)
    (art,) = export_executorch(model, tmp_path, ["fp32"], input_shape=(1, 3, size, size))
    split = art.extra["delegation"]
    record_property("delegated_ops", split["delegated_ops"])
    record_property("non_delegated", split["non_delegated"])
    assert split["delegated_ops"] > 0, f"{name}: nothing went to XNNPACK"
    x = np.random.default_rng(0).standard_normal((3, 3, size, size)).astype(np.float32)
    with ExecuTorchRunner() as r:
        r.load(art, tmp_path)
        out = r.infer({"input": x})["logits"]
    failure = fp32_parity_failure(model, x, out, name)
    assert failure is None, failure
