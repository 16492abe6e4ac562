"""The NumPy MIL interpreter against independent references, op by op.

Programs are written with coremltools' own MIL builder and saved as real ML Programs
(``coremltools.convert`` with the empty pass pipeline, so each op is kept as written);
the interpreter then reads them back from the ``.mlpackage``. References are PyTorch's
functional ops (convolution, pooling, GELU, normalisations, padding) or NumPy indexing,
never the interpreter's own helpers. fp32 ops must agree to 1e-5 of the value range
(float32 rounding of sums of a few hundred products; measured ~1e-7).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from device_tests.mil_interpreter import OP_TABLE, MILInterpreter, UnsupportedOpError
from device_tests.mil_program import BlobFile, decode_raw, load_program
from models.errors import InputError

RTOL = 1e-5


def _ct():
    from exporters.coreml import _ct as ct
    return ct()


def _save(prog, path, precision: str = "fp32"):
    """fp32: the empty pass pipeline keeps every op as written; fp16 needs the default
    pipeline (its ``add_fp16_cast`` pass is what makes an fp16 program)."""
    ct = _ct()
    from exporters.coreml import quiet_coremltools
    with quiet_coremltools():
        pipeline = ct.PassPipeline.EMPTY if precision == "fp32" else ct.PassPipeline.DEFAULT
        ml = ct.convert(prog, convert_to="mlprogram", pass_pipeline=pipeline,
                        minimum_deployment_target=ct.target.iOS17, skip_model_load=True,
                        compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16)
        ml.save(str(path))
    return path


def _close(got, want, what: str) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max()) if want.size else 0.0
    assert err <= RTOL * scale, f"{what}: max abs error {err:.3g} (range {scale:.3g})"


def _same_pads(size: int, k: int, s: int, d: int, lower: bool) -> tuple[int, int]:
    """TensorFlow's SAME: output ceil(size / stride); the odd pixel after (before if lower)."""
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return (total - total // 2, total // 2) if lower else (total // 2, total - total // 2)


CONV_CASES = [
    # pad_type, custom pad, kernel, stride, dilation, groups
    ("valid", None, 3, 1, 1, 1),
    ("same", None, 3, 2, 1, 1),
    ("same", None, 4, 2, 1, 2),             # even kernel: the extra pad goes after
    ("same_lower", None, 4, 2, 1, 2),       # ... or before
    ("custom", [1, 2, 0, 3], 3, 1, 2, 4),   # asymmetric pads, dilation, grouped
    ("custom", [1, 1, 1, 1], 3, 2, 1, 8),   # depthwise
]


def test_conv_matches_torch(tmp_path):
    ct = _ct()
    from coremltools.converters.mil import Builder as mb
    rng = np.random.default_rng(0)
    shape = (1, 8, 11, 10)
    x = rng.standard_normal(shape).astype(np.float32)
    weights = [rng.standard_normal((8, 8 // g, k, k)).astype(np.float32)
               for _, _, k, _, _, g in CONV_CASES]
    biases = [rng.standard_normal(w.shape[0]).astype(np.float32) for w in weights]

    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=ct.target.iOS17)
    def prog(x):
        outs = []
        for i, ((pt, pad, k, s, d, g), w, b) in enumerate(zip(CONV_CASES, weights, biases)):
            kw = {"pad": pad} if pad else {}
            outs.append(mb.conv(x=x, weight=w, bias=b, pad_type=pt, strides=[s, s], dilations=[d, d],
                                groups=g, name=f"conv{i}", **kw))
        return tuple(outs)

    out = MILInterpreter(load_program(_save(prog, tmp_path / "conv.mlpackage"))).run({"x": x})
    xt = torch.from_numpy(x)
    for i, ((pt, pad, k, s, d, g), w, b) in enumerate(zip(CONV_CASES, weights, biases)):
        if pt == "valid":
            pads = [(0, 0), (0, 0)]
        elif pt == "custom":
            pads = [(pad[0], pad[1]), (pad[2], pad[3])]
        else:
            pads = [_same_pads(n, k, s, d, pt == "same_lower") for n in shape[2:]]
        xp = F.pad(xt, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]))
        want = F.conv2d(xp, torch.from_numpy(w), torch.from_numpy(b), stride=s, dilation=d, groups=g)
        _close(out[f"conv{i}"], want.numpy(), f"conv {CONV_CASES[i]}")


def test_pooling_matches_torch(tmp_path):
    ct = _ct()
    from coremltools.converters.mil import Builder as mb
    shape = (1, 3, 9, 10)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=ct.target.iOS17)
    def prog(x):
        return (
            mb.max_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1],
                        ceil_mode=True, name="max_ceil"),
            mb.max_pool(x=x, kernel_sizes=[2, 2], strides=[2, 2], pad_type="valid", name="max_valid"),
            mb.avg_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1],
                        exclude_padding_from_average=False, name="avg_incl"),
            mb.avg_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1],
                        exclude_padding_from_average=True, ceil_mode=True, name="avg_excl_ceil"),
            mb.reduce_mean(x=x, axes=[2, 3], keep_dims=True, name="gap"),
            mb.reduce_max(x=x, axes=[1], keep_dims=False, name="cmax"),
        )

    out = MILInterpreter(load_program(_save(prog, tmp_path / "pool.mlpackage"))).run({"x": x})
    xt = torch.from_numpy(x)
    _close(out["max_ceil"], F.max_pool2d(xt, 3, 2, 1, ceil_mode=True).numpy(), "max_pool ceil")
    _close(out["max_valid"], F.max_pool2d(xt, 2, 2).numpy(), "max_pool valid")
    _close(out["avg_incl"], F.avg_pool2d(xt, 3, 2, 1, count_include_pad=True).numpy(), "avg_pool incl")
    _close(out["avg_excl_ceil"], F.avg_pool2d(xt, 3, 2, 1, ceil_mode=True, count_include_pad=False).numpy(),
           "avg_pool excl ceil")
    _close(out["gap"], x.mean((2, 3), keepdims=True), "reduce_mean")
    _close(out["cmax"], x.max(1), "reduce_max")


def test_activations_and_normalisations_match_torch(tmp_path):
    ct = _ct()
    from coremltools.converters.mil import Builder as mb
    shape = (2, 4, 5, 6)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    gamma, beta = rng.standard_normal(6).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    cg, cb = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    mean, var = rng.standard_normal(4).astype(np.float32), rng.uniform(0.5, 2, 4).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=ct.target.iOS17)
    def prog(x):
        return (
            mb.gelu(x=x, mode="EXACT", name="gelu"),
            mb.gelu(x=x, mode="TANH_APPROXIMATION", name="gelu_tanh"),
            mb.gelu(x=x, mode="SIGMOID_APPROXIMATION", name="gelu_sigmoid"),
            mb.sigmoid_hard(x=x, alpha=1 / 6, beta=0.5, name="hardsigmoid"),
            mb.silu(x=x, name="silu"),
            mb.relu6(x=x, name="relu6"),
            mb.clip(x=x, alpha=-1.0, beta=2.0, name="clip"),
            mb.leaky_relu(x=x, alpha=0.1, name="leaky"),
            mb.softmax(x=x, axis=1, name="softmax"),
            mb.layer_norm(x=x, axes=[-1], gamma=gamma, beta=beta, epsilon=1e-5, name="layer_norm"),
            mb.instance_norm(x=x, gamma=cg, beta=cb, epsilon=1e-5, name="instance_norm"),
            mb.batch_norm(x=x, mean=mean, variance=var, gamma=cg, beta=cb, epsilon=1e-3, name="batch_norm"),
        )

    out = MILInterpreter(load_program(_save(prog, tmp_path / "act.mlpackage"))).run({"x": x})
    xt = torch.from_numpy(x)
    t = torch.from_numpy
    want = {
        "gelu": F.gelu(xt), "gelu_tanh": F.gelu(xt, approximate="tanh"),
        "gelu_sigmoid": xt * torch.sigmoid(1.702 * xt), "hardsigmoid": F.hardsigmoid(xt),
        "silu": F.silu(xt), "relu6": F.relu6(xt), "clip": xt.clamp(-1, 2), "leaky": F.leaky_relu(xt, 0.1),
        "softmax": torch.softmax(xt, 1), "layer_norm": F.layer_norm(xt, (6,), t(gamma), t(beta), 1e-5),
        "instance_norm": F.instance_norm(xt, weight=t(cg), bias=t(cb), eps=1e-5),
        "batch_norm": F.batch_norm(xt, t(mean), t(var), t(cg), t(cb), False, 0.0, 1e-3),
    }
    for name, ref in want.items():
        _close(out[name], ref.numpy(), name)


def test_tensor_ops_match_numpy(tmp_path):
    ct = _ct()
    from coremltools.converters.mil import Builder as mb
    shape = (1, 6, 4, 5)
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / 10
    y = np.random.default_rng(3).standard_normal((5, 3)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=ct.target.iOS17)
    def prog(x):
        a, b = mb.split(x=x, split_sizes=[2, 4], axis=1, name="split")
        return (
            mb.slice_by_index(x=x, begin=[0, 1, 0, 4], end=[1, 6, 3, 0], stride=[1, 2, 1, -2],
                              begin_mask=[True, False, False, False], end_mask=[True, False, False, True],
                              name="slice"),
            mb.slice_by_index(x=x, begin=[0, 2, 0, 0], end=[1, 3, 4, 5], squeeze_mask=[False, True, False, False],
                              name="slice_squeeze"),
            mb.slice_by_size(x=x, begin=[0, 1, 1, 2], size=[1, -1, 2, 2], name="slice_size"),
            mb.concat(values=[a, b, a], axis=1, name="concat"),
            mb.concat(values=[a, a], axis=1, interleave=True, name="concat_interleave"),
            mb.transpose(x=x, perm=[0, 2, 3, 1], name="transpose"),
            mb.reshape(x=x, shape=[0, 3, -1, 5], name="reshape"),
            mb.pad(x=x, pad=[1, 2, 2, 1], mode="reflect", name="pad_reflect"),
            mb.pad(x=x, pad=[0, 0, 1, 2, 2, 1], mode="replicate", name="pad_replicate"),
            mb.pad(x=x, pad=[1, 1, 0, 2], mode="constant", constant_val=-3.0, name="pad_constant"),
            mb.matmul(x=x, y=y, name="matmul"),
            mb.matmul(x=x, y=y.T.copy(), transpose_y=True, name="matmul_ty"),
            mb.expand_dims(x=mb.squeeze(x=x, axes=[0]), axes=[0, -1], name="expand"),
            mb.tile(x=x, reps=[1, 1, 2, 1], name="tile"),
        )

    out = MILInterpreter(load_program(_save(prog, tmp_path / "tensor.mlpackage"))).run({"x": x})
    a, b = x[:, :2], x[:, 2:]
    inter = np.stack([a, a], axis=2).reshape(1, 4, 4, 5)
    xt = torch.from_numpy(x)
    want = {
        "slice": x[:, 1:6:2, 0:3, 4::-2], "slice_squeeze": x[:, 2, 0:4, 0:5], "slice_size": x[:, 1:, 1:3, 2:4],
        "concat": np.concatenate([a, b, a], 1), "concat_interleave": inter,
        "transpose": x.transpose(0, 2, 3, 1), "reshape": x.reshape(1, 3, -1, 5),
        "pad_reflect": F.pad(xt, (2, 1, 1, 2), mode="reflect").numpy(),
        "pad_replicate": F.pad(xt, (2, 1, 1, 2), mode="replicate").numpy(),
        "pad_constant": F.pad(xt, (0, 2, 1, 1), value=-3.0).numpy(),
        "matmul": x @ y, "matmul_ty": x @ y, "expand": x[0][None, ..., None], "tile": np.tile(x, (1, 1, 2, 1)),
    }
    for name, ref in want.items():
        _close(out[name], ref, name)


def test_fp16_program_computes_in_fp16(tmp_path):
    """Every intermediate of an fp16 program is float16: its rounding error is visible."""
    ct = _ct()
    from coremltools.converters.mil import Builder as mb
    shape = (1, 8, 6, 6)
    rng = np.random.default_rng(4)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32) / 8

    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=ct.target.iOS17)
    def prog(x):
        y = x
        for i in range(6):
            y = mb.add(x=mb.conv(x=y, weight=w, pad_type="same", name=f"c{i}"), y=y, name=f"r{i}")
        return mb.reduce_mean(x=y, axes=[2, 3], name="out")

    x = rng.standard_normal(shape).astype(np.float32)
    p32 = MILInterpreter(load_program(_save(prog, tmp_path / "p32.mlpackage", "fp32")))
    p16 = MILInterpreter(load_program(_save(prog, tmp_path / "p16.mlpackage", "fp16")))
    o32 = p32.run({"x": x})["out"]
    res16 = p16.run({"x": x}, keep="*")
    conv_vars = [n for n in p16.intermediate_names() if p16.program.vars[n].dtype == "fp16"]
    assert conv_vars and all(res16[n].dtype == np.float16 for n in conv_vars)
    o16 = res16["out"].astype(np.float64)
    err = np.abs(o16 - o32).max() / np.abs(o32).max()
    # fp16 keeps 11 significant bits: a relative error of at least 2^-12 somewhere after 13 ops,
    # and below 1e-2 (the fp16 row of the comparator asks for 40 dB, i.e. 1%).
    assert 2 ** -14 < err < 1e-2, f"fp16 relative error {err:.3g}"


def test_unknown_op_is_an_error_naming_it(tmp_path, monkeypatch):
    ct = _ct()
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4))], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.relu(x=mb.softsign(x=x, name="s"), name="r")

    path = _save(prog, tmp_path / "p.mlpackage")
    monkeypatch.delitem(OP_TABLE, "softsign")
    with pytest.raises(UnsupportedOpError) as exc:
        MILInterpreter(load_program(path))
    assert exc.value.ops == {"softsign": 1}
    assert "softsign" in str(exc.value) and "p.mlpackage" in str(exc.value)


def test_bad_inputs_are_one_line_errors(tmp_path):
    ct = _ct()
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4))], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.relu(x=x, name="r")

    interp = MILInterpreter(load_program(_save(prog, tmp_path / "p.mlpackage")))
    with pytest.raises(InputError, match="shape"):
        interp.run({"x": np.zeros((1, 5), np.float32)})
    with pytest.raises(InputError, match="input 'x'"):
        interp.run({"y": np.zeros((1, 4), np.float32)})
    with pytest.raises(InputError, match="no such file"):
        load_program(tmp_path / "missing.mlpackage")


def test_blob_reader_matches_coremltools_reader(tmp_path):
    """Our parser of weight.bin reads what coremltools' C++ blob reader reads."""
    ct = _ct()
    from coremltools.converters.mil import Builder as mb
    from coremltools.libmilstoragepython import _BlobStorageReader
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 4, 3, 3)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4, 8, 8))], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.conv(x=x, weight=w, bias=rng.standard_normal(16).astype(np.float32), name="c")

    for precision in ("fp32", "fp16"):
        prog_ = load_program(_save(prog, tmp_path / f"b_{precision}.mlpackage", precision))
        assert prog_.blobs, "weights should be stored in the blob file"
        for name, ref in prog_.blobs.items():
            reader = _BlobStorageReader(str(ref.file))
            theirs = {"fp32": reader.read_float_data, "fp16": reader.read_fp16_data}[ref.dtype](ref.metadata_offset)
            theirs = np.asarray(theirs).view(np.float16) if ref.dtype == "fp16" else np.asarray(theirs)
            ours = BlobFile(ref.file).read(ref.metadata_offset, ref.dtype, (np.asarray(theirs).size,))
            np.testing.assert_array_equal(ours, theirs, err_msg=name)
        conv = next(op for op in prog_.ops if op.type == "conv")
        weight = MILInterpreter(prog_).consts[conv.inputs["weight"][0]]
        np.testing.assert_array_equal(weight, w.astype(np.float16) if precision == "fp16" else w)


def test_sub_byte_unpacking_is_lsb_first():
    # 2-bit fields 3, 0, 2, 1 packed from the least significant bit: 0b01_10_00_11
    np.testing.assert_array_equal(decode_raw(bytes([0b01100011]), "uint2", (4,)), [3, 0, 2, 1])
    # int4 is two's complement in each nibble: 0x8F -> low nibble 15 -> -1, high 8 -> -8
    np.testing.assert_array_equal(decode_raw(bytes([0x8F]), "int4", (2,)), [-1, -8])
    assert math.isclose(float(decode_raw(np.float16(1.5).tobytes(), "fp16", ())), 1.5)
