"""`mdeploy export [MODEL] --out DIR`: a model to ONNX (and TFLite, Core ML) with a manifest.

MODEL is a registry name (``mobilenet_v2``), ``path/to/file.py:factory`` (a function
returning an ``nn.Module``, called with the ``--model-arg`` keywords), a ``torch.export``
program (``.pt2``; ``torch.export.load`` unpickles, so only trusted files), or omitted when ``--checkpoint`` is an mdeploy checkpoint
(which names its architecture). The work is ``pipeline.stages.export.export_model``.
"""
from __future__ import annotations

import argparse

from pipeline.commands.train import _kv


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def add_preprocessing_args(p: argparse.ArgumentParser) -> None:
    """The preprocessing flags (part of the model's contract; also ``mdeploy run``'s config)."""
    g = p.add_argument_group(
        "preprocessing (part of the model's contract: written into the manifest, the TFLite metadata and the "
        "Core ML image input; verify and quantize read it back). Default: the checkpoint's, else the model's "
        "own pretrained_cfg/default_cfg, else the registry's; anything defaulted beyond that is printed as "
        "'assumed:' and recorded in the manifest")
    g.add_argument("--input-size", nargs="+", metavar="N|HxW|H W",
                   help="input size: N (square), HxW or H W, e.g. 48x64")
    g.add_argument("--mean", nargs="+", type=float, metavar="M",
                   help="per-channel mean (one value for all channels, or one per channel), on the 0-255 "
                        "pixel scale (127.5) or the 0-1 scale (0.485 0.456 0.406): any value above 1 means 0-255; "
                        "stored on the 0-1 scale. The input is (pixel - mean) / std")
    g.add_argument("--std", nargs="+", type=float, metavar="S",
                   help="per-channel std, on the same scale as --mean (127.5 or 0.229 0.224 0.225)")
    g.add_argument("--channel-order", type=str.upper, choices=("RGB", "BGR"),
                   help="channel order the model was trained on (default RGB)")
    g.add_argument("--resize", choices=("bilinear", "bicubic", "nearest"),
                   help="interpolation of every resize (default bilinear)")
    g.add_argument("--crop-pct", type=float, metavar="F",
                   help="timm-style: resize the shorter side to size/F, then centre-crop the size (e.g. 0.875); "
                        "default: resize straight to the size")


def preprocessing_choice(args: argparse.Namespace):
    """The preprocessing flags -> ``pipeline.stages.export.PreprocessingChoice``."""
    from pipeline.stages.export import PreprocessingChoice
    size = args.input_size
    return PreprocessingChoice(input_size=size if size else None, mean=args.mean, std=args.std,
                               channel_order=args.channel_order, resize=args.resize, crop_pct=args.crop_pct)


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "export", parents=[common], help="export a model to ONNX / TFLite / Core ML with a manifest",
        description="Export a model into a folder: model.safetensors (the PyTorch reference), "
                    "the requested formats and manifest.json (shapes, preprocessing, labels, "
                    "hashes, versions). ONNX has one input 'input' (float32 NCHW) and one output "
                    "'logits'.")
    p.add_argument("model", nargs="?", help="registry name, path/to/file.py:factory, a torch.export "
                                            "program (.pt2; loaded with torch.export.load, which "
                                            "unpickles: only files you trust), or omitted with an "
                                            "mdeploy --checkpoint")
    p.add_argument("--out", required=True, help="output folder (built atomically)")
    p.add_argument("--formats", type=_csv, default=("onnx",),
                   help="comma list of onnx, tflite, coreml, executorch (default onnx)")
    p.add_argument("--precisions", type=_csv, help="for tflite/coreml/executorch: comma list, e.g. fp32,fp16,int8 "
                                                    "(tflite also: dynamic, int8-io, uint8-pixels = "
                                                    "camera-ready uint8 pixel input; executorch: fp32, int8)")
    p.add_argument("--checkpoint", help="weights: mdeploy .safetensors, or a .pt/.pth state dict")
    add_preprocessing_args(p)
    p.add_argument("--labels", help="class names: a text file (one per line) or a JSON list")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--dynamic-batch", action="store_true", help="symbolic batch dimension in ONNX")
    p.add_argument("--simplify", action="store_true", help="run onnxsim on the ONNX graph")
    p.add_argument("--num-classes", type=int, help="registry models without a checkpoint (default 1000)")
    p.add_argument("--in-chans", type=int, help="registry models without a checkpoint (default 3)")
    p.add_argument("--model-arg", action="append", type=_kv, default=[], metavar="KEY=VALUE",
                   help="keyword argument for the model's factory (a registry model or file.py:factory), "
                        "repeatable, e.g. width_mult=0.35 num_classes=10 pretrained=False act=relu "
                        "(Python literals are typed; anything else is a string)")
    p.add_argument("--calibration", help="calibration data for quantized precisions "
                                         "(default: the checkpoint's data set)")
    p.add_argument("--no-reparam", action="store_true",
                   help="keep re-parameterizable blocks (RepVGG branches) in their training form "
                        "instead of the fused deploy form (default: fuse)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    app = p.add_argument_group("app formats")
    app.add_argument("--coreml-input", default="image", metavar="image|tensor|both",
                     help="Core ML input: an image (CVPixelBuffer, normalisation inside the model), a "
                          "float32 NCHW tensor, or both (one package of each per precision; default image)")
    app.add_argument("--coreml-target", metavar="TARGET",
                     help="Core ML minimum deployment target: iOS15, iOS16, iOS17, iOS18, macOS13, ... "
                          "(default iOS17)")
    app.add_argument("--tflite-layout", default="NHWC", metavar="nhwc|nchw",
                     help="input layout of the .tflite (default nhwc, what apps and the delegates expect)")
    app.add_argument("--tflite-converter", default="auto", metavar="auto|litert-torch|onnx2tf",
                     help="TFLite route: auto (default) converts fp32/fp16 straight from PyTorch with litert-torch "
                          "and falls back to onnx2tf with the reason; the integer kinds always take onnx2tf + "
                          "TFLiteConverter. litert-torch: its failure is an error. onnx2tf: the ONNX route for all")
    app.add_argument("--executorch-backends", default="xnnpack", metavar="xnnpack,coreml",
                     help="ExecuTorch partitioners, one .pte each: xnnpack (default; model_<precision>.pte) "
                          "and/or coreml (model_<precision>_coreml.pte, fp32/fp16/int8, deployment target "
                          "--coreml-target; lowers here, runs only on iOS/macOS). qnn needs Qualcomm's QNN SDK "
                          "(QNN_SDK_ROOT) and is refused without it")
    app.add_argument("--executorch-taps", action=argparse.BooleanOptionalAction, default=True,
                     help="beside each XNNPACK .pte, its tap program (model_<precision>.taps.pte: every module's "
                          "output as a program output, for verify's first-divergent-layer search; a second copy "
                          "of the weights, not for apps). Default on; --no-executorch-taps skips it")
    card = p.add_argument_group("model card (written into the TFLite and Core ML metadata and the manifest)")
    card.add_argument("--name", help="model name (default: the architecture); also the Core ML file name")
    card.add_argument("--description", help="one-line description (default: architecture, classes, input)")
    card.add_argument("--version", help="model version (default 1.0)")
    card.add_argument("--author", help="author (default: none; Core ML shows 'mdeploy')")
    card.add_argument("--license", help="license (default: none)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ui) -> int:
    from models.errors import InputError
    from pipeline.stages.export import CARD_FIELDS, ExportOptions, export_model, read_labels

    size = args.input_size or []
    if args.model is None and len(size) > 1 and not size[-1].isdigit():
        args.model = size.pop()          # `--input-size 48 64 MODEL`: nargs="+" swallowed the model
    if args.model is None and args.checkpoint is None:
        raise InputError("mdeploy export", "MODEL, or --checkpoint of an mdeploy checkpoint", "neither")
    for flag, value in (("--opset", args.opset),
                        ("--num-classes", args.num_classes), ("--in-chans", args.in_chans)):
        if value is not None and value < 1:
            raise InputError(flag, "a positive number", str(value))
    opts = ExportOptions(
        formats=args.formats, precisions=args.precisions, preprocessing=preprocessing_choice(args),
        opset=args.opset, dynamic_batch=args.dynamic_batch, simplify=args.simplify,
        labels=read_labels(args.labels) if args.labels else None, num_classes=args.num_classes,
        in_chans=args.in_chans, model_kwargs=dict(args.model_arg), calibration=args.calibration,
        force=args.force, reparameterize=not args.no_reparam, coreml_input=args.coreml_input,
        coreml_target=args.coreml_target, tflite_layout=args.tflite_layout,
        tflite_converter=args.tflite_converter, executorch_backends=args.executorch_backends,
        executorch_taps=args.executorch_taps,
        card={k: getattr(args, k) for k in CARD_FIELDS if getattr(args, k) is not None})
    with ui.status("exporting"):
        result = export_model(args.model, args.out, checkpoint=args.checkpoint, options=opts,
                              progress=ui.info)
    for warning in result.warnings:
        ui.warn(warning)
    m = result.manifest
    if args.json:
        ui.emit_json({"folder": str(result.folder), "seconds": result.seconds, "manifest": m.to_dict()})
        return 0
    table = artifacts_table(m, result.folder)
    ui.table(table)
    times = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    ui.result(f"wrote {len(m.artifacts)} artifacts and manifest.json to {result.folder}"
              + (f" ({times})" if times else ""))
    for line in result.assumed:          # last, where they are seen (also in manifest.json "assumed")
        ui.assumed(line)
    return 0


def artifacts_table(m, folder):
    """One row per artifact: key, file, input dtype/shape, size, hash (also used by `mdeploy run`)."""
    from rich import box
    from rich.table import Table
    pre = m.preprocessing
    classes = m.artifacts[0].outputs[0].shape[-1] if m.artifacts and m.artifacts[0].outputs else "?"
    table = Table(title=f"{m.model} -> {folder}: {pre.channel_order} "
                        f"{pre.input_size[0]}x{pre.input_size[1]} input, {classes} classes", box=box.SIMPLE_HEAD)
    for col, just in (("artifact", "left"), ("file", "left"), ("input", "left"), ("size", "right"),
                      ("sha256", "left")):
        table.add_column(col, justify=just)
    for a in m.artifacts:
        shape = "x".join(str(d) for d in a.inputs[0].shape) if a.inputs else ""
        table.add_row(a.key, a.path, f"{a.inputs[0].dtype} {shape}" if a.inputs else "",
                      _size(a.size_bytes), a.sha256[:12])
    return table


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)

