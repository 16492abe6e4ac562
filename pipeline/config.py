"""The one validated configuration file of ``mdeploy run`` (TOML or JSON).

Every field has a default, so the built-in default run needs no file at all; a
file only names what it changes. Unknown keys are errors (a typo must not be
silently ignored), reported as one line with the file, the field and the value.
"""
from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.errors import InputError
from models.util import error_line
from pipeline.stages.repvgg import RepVGGOptions
from pipeline.stages.sparse_shift import SparseShiftOptions
from pipeline.stages.train import TrainConfig

# In the order they run. repvgg and sparse_shift train their own small networks (RepVGG vs
# QARepVGG under int8; FE-Net with sparse shifts) to show those two methods end to end.
STAGES = ("train", "export", "verify", "quantize", "profile", "repvgg", "sparse_shift", "report")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ExportSection(_Section):
    # executorch takes fp32 and int8 from the precisions below (a .pte of each)
    formats: list[str] = Field(default_factory=lambda: ["onnx", "tflite", "coreml", "executorch"])
    tflite_precisions: list[str] = Field(default_factory=lambda: ["fp32", "fp16", "int8", "int8-io", "uint8-pixels"])
    coreml_precisions: list[str] = Field(default_factory=lambda: ["fp32", "fp16", "int8w", "palette6"])
    opset: int = 18
    calib_samples: int = Field(200, ge=1)
    coreml_input: str = Field("image", pattern="(?i)^(image|tensor|both)$",
                              description="Core ML input: image, tensor, or both (a package of each)")
    coreml_target: str | None = Field(None, pattern=r"^[A-Za-z]+[0-9]+$",
                                      description="Core ML minimum deployment target (iOS16, macOS13, ...; "
                                                  "checked at export); None: the exporter's default")
    tflite_layout: str = Field("NHWC", pattern="(?i)^(nhwc|nchw)$", description="input layout of the .tflite")
    tflite_converter: Literal["auto", "litert-torch", "onnx2tf"] = Field(
        "auto", description="TFLite route: auto (litert-torch for fp32/fp16, onnx2tf fallback and for the "
                            "integer kinds), litert-torch, or onnx2tf")
    executorch_backends: list[Literal["xnnpack", "coreml", "qnn"]] = Field(
        default_factory=lambda: ["xnnpack"],
        description=".pte partitioners: xnnpack (runs here), coreml (lowers here, runs only on Apple platforms); "
                    "qnn needs Qualcomm's QNN SDK and is refused without it")
    executorch_taps: bool = Field(True, description="write a tap program beside each XNNPACK .pte "
                                                    "(model_<precision>.taps.pte, for verify's per-layer "
                                                    "divergence; not for apps)")
    # preprocessing: part of the model's contract (the same fields as export's flags); None = the
    # checkpoint's / the model's own, and a default beyond that is printed as "assumed:"
    input_size: int | str | list[int] | None = Field(None, description="N, 'HxW' or [H, W]")
    mean: list[float] | None = Field(None, description="per-channel mean, 0-255 or 0-1 scale (>1 means 0-255)")
    std: list[float] | None = Field(None, description="per-channel std, on the scale of mean")
    channel_order: Literal["RGB", "BGR"] | None = None
    resize: Literal["bilinear", "bicubic", "nearest"] | None = None
    crop_pct: float | None = Field(None, gt=0, le=1, description="timm-style resize to size/crop_pct, centre crop")

    class Card(_Section):
        """``[export.card]``: the model card written into the TFLite and Core ML metadata."""
        name: str | None = None
        description: str | None = None
        version: str | None = None
        author: str | None = None
        license: str | None = None

    card: Card = Field(default_factory=Card, description="model card fields; unset ones keep the defaults")

    def app_options(self) -> dict[str, Any]:
        """The ``pipeline.stages.export.ExportOptions`` fields this section sets beyond
        formats, precisions and opset: ``ExportOptions(..., **cfg.export.app_options())``."""
        from pipeline.stages.export import PreprocessingChoice
        out: dict[str, Any] = {"coreml_input": self.coreml_input, "coreml_target": self.coreml_target,
                               "tflite_layout": self.tflite_layout,
                               "tflite_converter": self.tflite_converter,
                               "executorch_backends": tuple(self.executorch_backends),
                               "executorch_taps": self.executorch_taps,
                               "card": self.card.model_dump(exclude_none=True)}
        pre = (self.input_size, self.mean, self.std, self.channel_order, self.resize, self.crop_pct)
        if any(v is not None for v in pre):       # only what the file sets; the model's own otherwise
            out["preprocessing"] = PreprocessingChoice(*pre)
        return out


class VerifySection(_Section):
    samples: int = Field(200, ge=1, description="held-out images run through every runtime")


class QuantizeSection(_Section):
    """``mdeploy quantize`` on the run's export folder (see ``pipeline.stages.quantize``)."""

    target: Literal["snapdragon", "generic"] = "snapdragon"
    method: Literal["minmax", "entropy", "percentile", "mse"] = "minmax"
    samples: int = Field(256, ge=1, description="calibration images from the training split")
    float_fixes: list[str] = Field(default_factory=list, description="bn, cle, hba, bias")
    weight_rounding: list[str] = Field(default_factory=lambda: ["mse", "gptq", "bias"],
                                       description="rtn (plain), or any of mse, gptq, sequential, bias")
    keep_float: int | None = Field(None, ge=0, description="keep the N most sensitive layers float")
    w8a16_layers: int | None = Field(None, ge=0, description="N most sensitive layers at 16-bit activations")
    target_sqnr: float | Literal["auto", "off"] | None = Field(
        "auto", description="dB: mixed precision until the 8-bit model's logit SQNR reaches it (16-bit activations, "
                            "16-bit weights, then float); auto: every profile to the target's default (snapdragon 30 dB "
                            "on w8a8 and 44 dB on w8a16, generic none); off (or null): models as quantized")
    target_profile: str | None = Field(None, description="the model target_sqnr applies to: w8a8 (default) or w8a16")
    sensitivity: bool = True
    tflite_inputs: list[Literal["int8-io", "uint8-pixels"]] = Field(
        default_factory=lambda: ["int8-io", "uint8-pixels"], min_length=1,
        description="full-integer TFLite kinds: int8-io (normalised int8 in), uint8-pixels (camera bytes in)")
    tflite_int8w: bool = Field(True, description="also the int8w TFLite: the optimised int8 weights behind "
                                                 "DEQUANTIZE, float compute (the w8a8 model's fidelity; CPU/GPU)")
    coreml: bool = Field(False, description="also write a Core ML package with int8 weights (int8w), grid-checked")
    plain_baseline: bool = Field(True, description="measure the first profile with round-to-nearest weights too "
                                                   "(not written), to show what the weight rounding gained")
    eval_samples: int = Field(1000, ge=1, description="held-out images for the accuracy figures")


class ProfileSection(_Section):
    devices: list[str] = Field(default_factory=lambda: ["local"])
    runs: int = Field(30, ge=1)
    warmup: int = Field(3, ge=0)


class RunConfig(_Section):
    name: str = "default"
    # A small MobileNetV2 on the bundled 28x28 MNIST: width 0.35 and stem stride 1 (output
    # stride 16). Measured: 98.1% on the 1,000 held-out digits after 24 epochs of the 3,600
    # training images (6.5 s an epoch on 2 idle cores; 12 epochs gave 96.4-96.7%).
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(
        model="mobilenet_v2", model_kwargs={"width_mult": 0.35, "stem_stride": 1}, data="mnist",
        epochs=24, lr=5e-3))
    export: ExportSection = Field(default_factory=ExportSection)
    verify: VerifySection = Field(default_factory=VerifySection)
    quantize: QuantizeSection = Field(default_factory=QuantizeSection)
    profile: ProfileSection = Field(default_factory=ProfileSection)
    repvgg: RepVGGOptions = Field(default_factory=RepVGGOptions)
    sparse_shift: SparseShiftOptions = Field(default_factory=SparseShiftOptions)
    checkpoint: str | None = Field(None, description="start from these weights instead of training")
    stages: list[str] = Field(default_factory=lambda: list(STAGES))


def load_config(path: str | Path | None) -> RunConfig:
    if path is None:
        return RunConfig()
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "a run configuration file (.toml or .json)", "no such file")
    try:
        raw: dict[str, Any] = (tomllib.loads(path.read_text()) if path.suffix == ".toml"
                               else json.loads(path.read_text()))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, "valid TOML or JSON", error_line(exc)) from None
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(map(str, err["loc"]))
        raise InputError(path, f"{field}: {err['msg'].lower()}", repr(err.get("input"))[:80]) from None
