"""The memo around ONNX Runtime's per-channel quantizer arithmetic (quantize/ort_memo.py):
a write with it is the same file, byte for byte, as without it, the second write of the
same weights takes its per-channel results from the memo, and ORT's functions are
restored after each write."""
from __future__ import annotations

import contextlib

import numpy as np

from quantize.onnx_ptq import QNN_W8A8, QNN_W8A16, PtqSession
from quantize.ort_memo import QuantizerMemo
from tests.parity_helpers import exported_small_net


class _NoMemo:
    hits = misses = 0

    def installed(self):
        return contextlib.nullcontext()


def test_a_memoised_write_is_the_same_file_and_the_second_one_hits(tmp_path):
    from onnxruntime.quantization import base_quantizer, qdq_quantizer
    before = (qdq_quantizer.compute_data_quant_params, qdq_quantizer.quantize_onnx_initializer,
              base_quantizer.quantize_data, base_quantizer.quantize_nparray)
    _, art, x = exported_small_net(tmp_path, 32)
    with PtqSession(tmp_path / "model.onnx", x.astype(np.float32), qnn=True,
                    layer_map=art.extra["layer_map"]) as s:
        for profile in (QNN_W8A8, QNN_W8A16):
            raised = s.layers[:2]       # the search's kind of write: some layers at 16 bits
            s._memo = _NoMemo()
            s.write(profile, tmp_path / "plain.onnx", w16_layers=raised)
            s._memo = memo = QuantizerMemo()
            s.write(profile, tmp_path / "cold.onnx", w16_layers=raised)
            assert memo.misses > 0                # the per-channel calls went through the memo
            hits, misses = memo.hits, memo.misses
            s.write(profile, tmp_path / "warm.onnx", w16_layers=raised)
            assert memo.hits > hits and memo.misses == misses       # all answered from the memo
            plain = (tmp_path / "plain.onnx").read_bytes()
            assert (tmp_path / "cold.onnx").read_bytes() == plain
            assert (tmp_path / "warm.onnx").read_bytes() == plain
            # ORT's own functions are back once a write is over
            assert (qdq_quantizer.compute_data_quant_params, qdq_quantizer.quantize_onnx_initializer,
                    base_quantizer.quantize_data, base_quantizer.quantize_nparray) == before
