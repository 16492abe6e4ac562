"""The pure helpers every layer shares (``models.util``)."""
from __future__ import annotations

import math

import numpy as np

from models.util import db, error_line, first_line, layout_for_ndim, one_line, pct, snr_db


def test_exception_text_is_one_line():
    exc = RuntimeError("\x1b[31mfirst line\x1b[0m\n  second   line\n")
    assert first_line(exc) == "first line"
    assert one_line(exc) == "first line second line"
    assert error_line(exc) == "RuntimeError: first line"
    assert error_line(ValueError()) == "ValueError" and first_line(KeyError()) == "KeyError"
    assert one_line(OSError()) == "OSError" and one_line("") == ""
    assert len(first_line("x" * 500)) == 200 and len(one_line("y " * 500, 40)) == 40
    assert error_line(KeyError("k")) == "KeyError: 'k'"


def test_layout_metrics_and_percentages():
    assert [layout_for_ndim(n) for n in (4, 2, 3, 1)] == ["NCHW", "NC", "ANY", "ANY"]
    r = np.array([1.0, -2.0, 3.0, 0.0])
    assert snr_db(r, r) is None                                       # identical: infinite
    assert snr_db(r, r + 0.5) == 10 * math.log10(14 / 1.0)
    assert snr_db(np.zeros(3), np.ones(3)) == -math.inf
    assert db(1.0, 0.0) is None and db(100.0, 1.0) == 20.0
    assert pct(0.12345) == "12.35%" and pct(0.5, 1) == "50.0%" and pct(None) == "" and pct(None, missing="-") == "-"
