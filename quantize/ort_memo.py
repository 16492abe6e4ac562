"""A memo for ONNX Runtime's quantizer arithmetic, for sessions that write the same model
many times.

Why: ``onnxruntime.quantization`` computes every per-channel weight scale and quantizes
every channel in a Python loop (``compute_data_quant_params``, ``quantize_data``,
``quantize_nparray``, once per output channel; ``quantize_onnx_initializer`` loops over them). A full write of EfficientNet-Lite2 makes
about 30,000 such calls, 1 of its 1.6 s; the mixed-precision search, the sensitivity
baselines and the final models write the same weights twenty-odd times in one session.
Those functions are pure (their results depend on their arguments only), so their
results are kept, keyed by the exact bytes of every array argument: a write gives the
same file with or without the memo, only sooner. The memo is installed around ORT's own
call and removed after it (``installed``), never left patched.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import numpy as np

# (module, attribute) pairs ORT's quantizers call through; each is the same function
# object as ``quant_utils``' own, imported by name into the module that loops over channels
_PATCHED = (("qdq_quantizer", "compute_data_quant_params"),
            ("qdq_quantizer", "quantize_onnx_initializer"),      # a whole weight, its channels in a loop
            ("base_quantizer", "quantize_data"),
            ("base_quantizer", "quantize_nparray"))


_PLAIN = (int, float, bool, str, type(None))


def _key_of(value: Any) -> Any:
    kind = type(value)
    if kind is np.ndarray:
        return (value.dtype.str, value.shape, value.tobytes())
    if kind in _PLAIN:
        return value
    if isinstance(value, np.generic):
        return (value.dtype.str, value.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_key_of(v) for v in value)
    import onnx
    if isinstance(value, onnx.TensorProto):
        return value.SerializeToString()
    return value        # hashable or not: a TypeError on lookup means no memo for that call


def _copied(value: Any) -> Any:
    kind = type(value)
    if kind is np.ndarray:
        return value.copy()
    if kind is tuple:
        return tuple(_copied(v) for v in value)
    import onnx
    if isinstance(value, onnx.TensorProto):
        out = onnx.TensorProto()
        out.CopyFrom(value)
        return out
    return value


class QuantizerMemo:
    """Results of ORT's per-channel quantization functions, by their arguments' bytes."""

    def __init__(self) -> None:
        self._results: dict[Any, Any] = {}
        self.hits = 0
        self.misses = 0

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def memoised(*args: Any, **kwargs: Any) -> Any:
            key = (name, tuple(map(_key_of, args)), tuple((k, _key_of(v)) for k, v in sorted(kwargs.items())))
            try:
                hit = self._results[key]
            except (KeyError, TypeError):       # TypeError: an argument that cannot be a key
                self.misses += 1
                result = fn(*args, **kwargs)
                with contextlib.suppress(TypeError):
                    self._results[key] = _copied(result)
                return result
            self.hits += 1
            return _copied(hit)
        return memoised

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """ORT's quantizer modules call the memoised functions for the duration."""
        import importlib
        saved = []
        for module_name, attr in _PATCHED:
            module = importlib.import_module(f"onnxruntime.quantization.{module_name}")
            fn = getattr(module, attr, None)
            if fn is None:          # another ORT layout: quantize without the memo
                continue
            saved.append((module, attr, fn))
            setattr(module, attr, self._wrap(attr, fn))
        try:
            yield
        finally:
            for module, attr, fn in saved:
                setattr(module, attr, fn)


__all__ = ["QuantizerMemo"]
