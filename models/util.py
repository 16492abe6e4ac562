"""Small pure helpers every layer may import (numpy and the standard library only, so
the device runner bundle carries this module too).

* error text: ``first_line`` / ``one_line`` / ``error_line`` / ``error_line_with_cause``
  turn an exception into the one line that goes into an ``InputError`` or a report;
* tensor layout from rank: ``layout_for_ndim``;
* metrics: ``snr_db`` (and ``db`` for any power ratio);
* formatting: ``pct``.
"""
from __future__ import annotations

import math
import re

import numpy as np

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# -- error text ---------------------------------------------------------------

def first_line(exc: BaseException | str, limit: int = 200) -> str:
    """The first line of an exception's message (colour codes stripped), at most ``limit``
    characters; the exception type's name when the message is empty."""
    text = _ANSI.sub("", str(exc)).strip()
    if not text:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    return text.splitlines()[0][:limit]


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    """The whole message of an exception on one line (whitespace runs collapsed), at most
    ``limit`` characters; the exception type's name when the message is empty."""
    text = " ".join(_ANSI.sub("", str(exc)).split())
    if not text:
        return type(exc).__name__ if isinstance(exc, BaseException) else ""
    return text[:limit]


def error_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line`` of an exception, or ``Type`` when its message is empty."""
    text = _ANSI.sub("", str(exc)).strip()
    return f"{type(exc).__name__}: {first_line(text, limit)}" if text else type(exc).__name__


def error_line_with_cause(exc: BaseException) -> str:
    """``Type: first line`` of an exception and of its cause (a converter's own error is
    often a wrapper; the cause says why)."""
    cause = exc.__cause__ or exc.__context__
    return error_line(exc) + (f" (cause: {error_line(cause)})" if cause is not None else "")


# -- names that become paths -------------------------------------------------

_NAME_CHARS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@,-]{0,99}$")


def path_component(value: object, source: str) -> str:
    """A user-given name that becomes one file or folder name (a run name, a label, a
    model name): one path component of plain characters, never ``..``, a separator or a
    leading ``-``/``.``, so joining it under an output folder cannot land outside it.
    Anything else is an ``InputError`` naming ``source`` (the option or config field)."""
    from models.errors import InputError
    text = value if isinstance(value, str) else None
    if text is None or not _NAME_CHARS.match(text):
        raise InputError(source, "a plain name (letters, digits, . _ - + = @ ,; no path separators or '..')",
                         repr(value)[:60])
    return text


# -- layout -------------------------------------------------------------------

def is_utf8(text: str) -> bool:
    """``text`` encodes as UTF-8: a name read from a non-UTF-8 file system arrives as lone
    surrogates, which JSON, safetensors and the TFLite/Core ML metadata writers reject
    deep inside, after minutes of converting."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def layout_for_ndim(ndim: int, image_layout: str = "NCHW") -> str:
    """The layout a float tensor of rank ``ndim`` is recorded with: images ``image_layout``
    (NCHW unless the file says otherwise), logits NC."""
    return {4: image_layout, 2: "NC"}.get(ndim, "ANY")


# -- metrics ------------------------------------------------------------------

def db(num: float, den: float) -> float | None:
    """``10 log10(num / den)``: None when ``den`` is 0 (identical: infinite), -inf when ``num`` is 0."""
    if den == 0.0:
        return None
    if num == 0.0:
        return -math.inf
    return 10.0 * math.log10(num / den)


def snr_db(ref: np.ndarray, out: np.ndarray) -> float | None:
    """Signal-to-noise ratio of ``out`` against ``ref`` in dB: ``10 log10(sum ref^2 /
    sum (out - ref)^2)`` in float64; None when identical, -inf when ``ref`` is all zero."""
    r = np.asarray(ref, np.float64)
    d = np.asarray(out, np.float64).reshape(r.shape) - r
    return db(float((r * r).sum()), float((d * d).sum()))


# -- formatting ---------------------------------------------------------------

def pct(x: float | None, digits: int = 2, missing: str = "") -> str:
    """A fraction as a percentage (``0.1234 -> "12.34%"``); ``missing`` for None."""
    return missing if x is None else f"{100 * x:.{digits}f}%"
