"""`mdeploy quantize DIR --out DIR2`: post-training quantization of an export folder.

``--target snapdragon`` writes QDQ ONNX models for ONNX Runtime's QNN execution provider
(w8a8 and w8a16) and ``--target generic`` one for ORT's CPU EP; both also write the
full-integer TFLite files (int8 or camera uint8 in, int8 out) and the int8w one (int8
weights, float compute). Prints the accuracy cost against float, the
float fixes applied, the most sensitive layers and Qualcomm's published reference
points; ``--json`` prints the same as data. The work is
``pipeline.stages.quantize.quantize_folder``.
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Callable, Iterator

from models.util import pct
from pipeline.commands.export import _csv, _size
from pipeline.stages.quantize import DEFAULT_CALIBRATION_SAMPLES, DEFAULT_ROUNDING_SAMPLES, DEFAULT_SENSITIVITY_SAMPLES

TOP_LAYERS = 10


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    from quantize.float_fixes import FIXES
    from quantize.onnx_ptq import CALIBRATION_METHODS, TARGETS
    p = sub.add_parser(
        "quantize", parents=[common], help="post-training quantize an export folder (Snapdragon QNN, ORT, TFLite)",
        description="Calibrate on real images and write quantized models into a new folder with its own "
                    "manifest (verify it with `mdeploy verify DIR2`): QDQ ONNX for ONNX Runtime's QNN "
                    "execution provider (--target snapdragon: w8a8 and w8a16, symmetric per-channel int8 "
                    "weights) or its CPU EP (--target generic), the full-integer TFLite files (int8 or "
                    "camera uint8 input, int8 output) and the int8w one (int8 weights, float "
                    "compute). Reports float vs quantized accuracy on the held-out split, top-1 agreement, "
                    "SNR, sizes and per-layer sensitivity.")
    p.add_argument("folder", help="an export folder (manifest.json, model.safetensors, model.onnx)")
    p.add_argument("--out", required=True, help="output folder (built atomically)")
    p.add_argument("--target", choices=tuple(TARGETS), default="snapdragon",
                   help="snapdragon: QNN EP w8a8 + w8a16; generic: ORT CPU int8 (default snapdragon)")
    p.add_argument("--calib", help="calibration data: photos | mnist | digits | image folder | image file | "
                                   ".npy/.npz (default: the data set the checkpoint was trained on, train split; "
                                   "required when the export records none)")
    p.add_argument("--random-inputs", action="store_true",
                   help="calibrate and measure on random pixels (no real data); the report then says first "
                        "that its figures are no evidence")
    p.add_argument("--method", choices=CALIBRATION_METHODS, default="minmax",
                   help="activation range calibration (default minmax)")
    p.add_argument("--samples", type=int, default=DEFAULT_CALIBRATION_SAMPLES,
                   help=f"calibration inputs (default {DEFAULT_CALIBRATION_SAMPLES})")
    p.add_argument("--float-fixes", type=_csv, default=(), metavar="FIX,...",
                   help=f"applied to the float model first: comma list of {', '.join(FIXES)} "
                        "(BatchNorm folding, cross-layer equalization, high-bias absorption, bias correction)")
    p.add_argument("--weight-rounding", type=_csv, default=None, metavar="TECHNIQUE,...",
                   help="how int8 weights are chosen (default mse,gptq,bias): mse (per-channel scale "
                        "search), gptq (rounding with error feedback), sequential (on already-quantized inputs), "
                        "bias (bias correction); rtn = plain round-to-nearest, as quantize_static alone does")
    p.add_argument("--rounding-samples", type=int, default=DEFAULT_ROUNDING_SAMPLES,
                   help=f"calibration inputs the weight rounding uses (default {DEFAULT_ROUNDING_SAMPLES}, "
                        "at most --samples)")
    p.add_argument("--keep-float", metavar="N|LAYERS",
                   help="keep the N most sensitive layers (or these comma-separated layers) in float")
    p.add_argument("--w8a16-layers", metavar="N|LAYERS",
                   help="16-bit activations for the N most sensitive layers (or these layers) in the 8-bit models")
    p.add_argument("--target-sqnr", metavar="DB|auto|off", default="auto",
                   help="mixed precision to a target: starting from the 8-bit model (w8a8 / int8), raise the most "
                        "sensitive layers to 16-bit activations, then (QNN) to 16-bit weights, then to float for "
                        "the layers whose weights are the problem, until the logit SQNR on the sensitivity inputs "
                        "reaches DB (re-measured on the quantized model at each step); a note says when it cannot. "
                        "auto (default): each profile to the target's default, for --target snapdragon 30 dB on "
                        "w8a8 and 44 dB on w8a16 (a model already there is left as quantized), none for generic; "
                        "a number applies to --target-profile only; off: all-8-bit models")
    p.add_argument("--target-profile", metavar="PROFILE",
                   help="the model --target-sqnr raises layers of: w8a8 (default, the first) or w8a16 for "
                        "--target snapdragon (w8a16 then gains 16-bit weights where its int8 weights fall short)")
    p.add_argument("--no-tflite", action="store_true", help="skip the TFLite models")
    p.add_argument("--tflite-input", choices=("both", "pixels", "int8"), default="both",
                   help="which full-integer TFLite: pixels = uint8-pixels (uint8 camera bytes 0..255 in, the "
                        "normalisation inside, for apps), int8 = int8-io (int8 in the normalised domain, for "
                        "NPU/DSP pipelines that feed it); default both")
    p.add_argument("--no-tflite-int8w", action="store_true",
                   help="skip the int8w TFLite (the optimised int8 weights behind DEQUANTIZE, float compute: the "
                        "TFLite file with the w8a8 model's fidelity, at the int8 size; CPU/GPU, not integer NPUs)")
    p.add_argument("--coreml", action="store_true",
                   help="also write a Core ML package with per-channel symmetric int8 weights (int8w, from the fp32 "
                        "program); its integers are checked against the optimised weights")
    p.add_argument("--no-plain-baseline", action="store_true",
                   help="skip the comparison row: the first profile quantized with plain round-to-nearest weights "
                        "(measured on the same held-out inputs, not written)")
    p.add_argument("--no-sensitivity", action="store_true",
                   help="skip the per-layer sensitivity analysis (each layer's weight-only and activation-only "
                        "logit SNR; the --target-sqnr search still runs those probes when it needs them)")
    p.add_argument("--sensitivity-mode", choices=("only", "exclude"), default=None,
                   help="also rank the layers whole, one more probe per layer: only = quantize one layer at a "
                        "time, exclude = keep one layer float at a time (default: no ranking unless "
                        "--keep-float N / --w8a16-layers N needs the N worst, then 'only')")
    p.add_argument("--sensitivity-samples", type=int, default=DEFAULT_SENSITIVITY_SAMPLES,
                   help="calibration inputs used by the weight-only / activation-only probes and the "
                        "--target-sqnr search; the per-layer ranking (each layer quantized alone) uses the first "
                        f"half of them (default {DEFAULT_SENSITIVITY_SAMPLES})")
    p.add_argument("--top", type=int, default=TOP_LAYERS, help="sensitive layers shown (default 10)")
    p.add_argument("--eval", dest="eval_data", help="held-out data for accuracy: mnist | digits | folder | "
                                                    ".npy/.npz (default: the checkpoint's data, test split)")
    p.add_argument("--eval-samples", type=int, default=1000, help="held-out inputs (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--model", metavar="FILE.py:FACTORY",
                   help="the Python factory of a model only code defines (the export's own record of "
                        "it is never imported)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, ui) -> int:
    from pipeline.stages.quantize import QuantizeOptions, quantize_folder

    opts = QuantizeOptions(
        target=args.target, calibration=args.calib, method=args.method, samples=args.samples,
        float_fixes=tuple(args.float_fixes), keep_float=args.keep_float,
        weight_rounding=tuple(args.weight_rounding) if args.weight_rounding is not None else None,
        rounding_samples=args.rounding_samples, w8a16_layers=args.w8a16_layers, target_sqnr=args.target_sqnr,
        target_profile=args.target_profile,
        tflite=not args.no_tflite, coreml=args.coreml,
        tflite_inputs={"both": ("int8-io", "uint8-pixels"), "pixels": ("uint8-pixels",),
                       "int8": ("int8-io",)}[args.tflite_input], tflite_int8w=not args.no_tflite_int8w,
        plain_baseline=not args.no_plain_baseline,
        sensitivity=not args.no_sensitivity,
        sensitivity_mode=args.sensitivity_mode, sensitivity_samples=args.sensitivity_samples,
        eval_data=args.eval_data, eval_samples=args.eval_samples, force=args.force, seed=args.seed,
        model=args.model, random_inputs=args.random_inputs)
    with sensitivity_progress(ui) as on_layer:
        result = quantize_folder(args.folder, args.out, opts, progress=ui.info, layer_progress=on_layer)
    report = result.report
    if args.json:
        noise = next((n for n in report.notes if n.startswith("NOT EVIDENCE")), None)
        ui.emit_json({**({"disclaimer": noise} if noise else {}), "folder": str(result.folder),
                      "seconds": result.seconds, "report": report.to_dict(), "manifest": result.manifest.to_dict()})
        return 0
    show_report(ui, report, args.top)
    times = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    ui.result(f"wrote {len(result.manifest.artifacts)} artifacts, manifest.json and quantization_report.json "
              f"to {result.folder} ({times}); check them with `{verify_hint(result)}`")
    for line in result.manifest.assumed:
        ui.assumed(line + " [recorded at export]")
    return 0


def verify_hint(result) -> str:
    """The verify command to run next: on the data the export records, else on the
    calibration source (real images), never a bare command that would refuse or run on noise;
    with ``--model`` when only the user's own code defines the architecture (verify never
    imports a file a manifest names)."""
    import shlex

    from models.checkpoint import is_factory_spec
    folder = shlex.quote(str(result.folder))
    model = result.manifest.source.get("model")
    trust = f" --model {shlex.quote(model)}" if isinstance(model, str) and is_factory_spec(model) else ""
    if result.manifest.source.get("data"):
        return f"mdeploy verify {folder}{trust}"
    calib = (result.report.calibration or {}).get("source")
    if calib and calib != "random pixels":
        return f"mdeploy verify {folder} --inputs {shlex.quote(str(calib))}{trust}"
    return f"mdeploy verify {folder} --inputs FOLDER_OF_YOUR_IMAGES{trust}"


TECHNIQUE_WORDS = {"mse": "per-channel scale search (mse)", "gptq": "GPTQ rounding with error feedback",
                   "sequential": "sequential (on already-quantized inputs)", "bias": "bias correction",
                   "rtn": "round to nearest"}


def rounding_summary(q: dict) -> str:
    """One paragraph on the weight rounding (also in the run report): techniques, median
    per-layer gain, the grid checks of each written model and the plain route beside it."""
    wr = q.get("weight_rounding") or {}
    if not wr:
        return ""
    words = ", ".join(TECHNIQUE_WORDS.get(t, t) for t in wr.get("techniques", []))
    gain = wr.get("median_gain_db")
    text = (f"weight rounding: {words} on {wr.get('samples')} calibration inputs"
            + (f", median per-layer output error {gain:+.2f} dB better than round-to-nearest" if gain is not None
               else "") + ".")
    grid = wr.get("grid_mismatch") or {}
    if grid:
        unmatched = wr.get("grid_unmatched") or {}
        text += (" Grid check (the written int8 weights against round(w / (max|w| / 127)) of the optimised model): "
                 + "; ".join(f"{k} {v} integer(s) differ" + (f", {unmatched[k]} weight(s) unpaired"
                                                            if unmatched.get(k) else "")
                             for k, v in grid.items()) + ".")
    plain = q.get("plain_route")
    if plain:
        snr = ", ".join(_db(s) for s in (plain.get("snr_db") or {}).values())
        text += (f" Plain route ({plain['key']}): the same profile with round-to-nearest weights, top-1 agreement "
                 f"{_pct(plain.get('top1_agreement'))}, SNR {snr} dB"
                 + (f", accuracy {_pct(plain.get('accuracy'))}" if plain.get("accuracy") is not None else "") + ".")
    return text


@contextlib.contextmanager
def sensitivity_progress(ui) -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar for the per-layer sensitivity pass (also used by ``mdeploy run``);
    hidden until the first layer reports, since the pass can be switched off."""
    with ui.progress() as prog:
        task = prog.add_task("sensitivity", total=None, status="", visible=False)

        def on_layer(done: int, total: int, name: str) -> None:
            prog.update(task, completed=done, total=total, status=name, visible=True)

        yield on_layer


def _pct(x: float | None) -> str:
    return pct(x, missing="-")


def _db(x: float | None) -> str:
    return "inf" if x is None else f"{x:.1f}"


def _points(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2f} pt".replace("+0.00", "0.00").replace("-0.00", "0.00")


def show_report(ui, report, top: int = TOP_LAYERS) -> None:
    """The report as rich tables (also used by ``mdeploy run``)."""
    from rich.table import Table

    from pipeline.ui import Markup, esc
    first = next((n for n in report.notes if n.startswith("NOT EVIDENCE")), None)
    if first:
        ui.result(Markup(f"[bold red]{esc(first)}[/bold red]"))     # the report's first line
    t = Table(title=f"{report.model} quantized for {report.target}: {report.eval_samples} held-out inputs "
                    f"({report.eval_source})")
    # no ground truth (no labels, or class folders that match no label: a note says which):
    # the accuracy columns are left out rather than shown empty
    acc = report.float_accuracy is not None
    cols = ("artifact", "accuracy", "change", "top-1 agree", "SNR dB", "size", "smaller")
    for col in cols if acc else tuple(c for c in cols if c not in ("accuracy", "change")):
        t.add_column(col, justify="left" if col == "artifact" else "right")

    def row(*cells, **kw):
        t.add_row(*(cells if acc else (cells[0], *cells[3:])), **kw)
    row("float (PyTorch)", _pct(report.float_accuracy), "", "", "", _size(report.float_size_bytes or 0), "")
    for v in report.variants:
        change = None if v.drop_points is None else -v.drop_points
        row(v.key, _pct(v.accuracy), _points(change), _pct(v.top1_agreement),
            ", ".join(_db(s) for s in v.snr_db.values()), _size(v.size_bytes),
            f"{v.size_ratio:.1f}x" if v.size_ratio else "")
    plain = getattr(report, "plain_route", None)
    if plain is not None:
        change = None if plain.drop_points is None else -plain.drop_points
        row(plain.key, _pct(plain.accuracy), _points(change), _pct(plain.top1_agreement),
            ", ".join(_db(s) for s in plain.snr_db.values()), _size(plain.size_bytes), "", style="dim")
    ui.table(t)
    cal = report.calibration
    ui.result(f"calibration: {cal.get('samples')} inputs from {cal.get('source')}, {cal.get('method')} ranges; "
              "size is against the float ONNX model")
    text = rounding_summary(report.to_dict())
    if text:
        ui.result(text)

    if report.float_fixes:
        f = Table(title="float fixes (applied to the PyTorch model before export and quantization)")
        for col in ("fix", "changed", "logits change", "what"):
            f.add_column(col, justify="right" if col in ("changed", "logits change") else "left")
        for r in report.float_fixes:
            what = r["note"] or ""
            if r["details"]:
                what = (r["details"][0] + (f" (+{len(r['details']) - 1} more)" if len(r["details"]) > 1 else "")
                        + (f"; {what}" if what else ""))
            change = "-" if r["max_abs_change"] is None else f"{r['max_abs_change']:.2g}"
            f.add_row(r["name"], str(r["applied"]), change, what)
        ui.table(f)

    sens = report.sensitivity
    if sens and sens["layers"] and top > 0:
        ranked = sens["mode"] != "split"        # the whole-layer ranking ran (--sensitivity-mode)
        label = {"only": "only this layer quantized", "exclude": "all but this layer quantized",
                 "split": "by the worse of its weight-only and activation-only SNR"}[sens["mode"]]
        s = Table(title=f"most sensitive layers ({sens['profile']}, {label}; {sens['samples']} calibration "
                        f"inputs; whole model {_db(sens['quantized']['snr_db'])} dB)")
        split = "activation_only_snr_db" in sens["layers"][0]
        cols = ("#", "layer", "op") + (("SNR dB", "top-1 agree") if ranked else ())
        cols += ("weights only dB", "activations only dB") if split else ()
        for col in cols:
            s.add_column(col, justify="left" if col in ("layer", "op") else "right")
        for i, layer in enumerate(sens["layers"][:top], 1):
            whole = (_db(layer["snr_db"]), _pct(layer["top1_agreement"])) if ranked else ()
            extra = ((_db(layer["weight_only_snr_db"]) if layer.get("has_weights") else "-",
                      _db(layer["activation_only_snr_db"])) if split else ())
            s.add_row(str(i), layer["layer"], layer["op_type"], *whole, *extra)
        ui.table(s)

    for mixed in [report.mixed_precision or {}, *report.mixed_precision_others]:
        if not mixed.get("path"):
            continue
        default = ", the target's default; --target-sqnr off for all-8-bit" if mixed.get("default_target") else ""
        m = Table(title=f"mixed precision to {mixed['target_sqnr_db']:g} dB logit SQNR ({mixed['profile']}, "
                        f"{mixed['samples']} calibration inputs{default}; * = chosen)")
        for col in ("step", "raised", "a16", "w16a16", "float", "weights", "file", "SQNR dB"):
            m.add_column(col, justify="left" if col == "raised" else "right")
        for p in mixed["path"]:
            names = ", ".join(p["added"][:3]) + (f" (+{len(p['added']) - 3})" if len(p["added"]) > 3 else "")
            raised = f"{p['action']}: {names}" if p["added"] else p["action"]
            m.add_row(f"{p['step']}{'*' if p['step'] == mixed['chosen_step'] else ''}", raised, str(p["w16"]),
                      str(p.get("w16w", 0)), str(p["float"]), _size(p.get("weight_bytes") or 0),
                      _size(p["size_bytes"]), _db(p["sqnr_db"]))
        ui.table(m)

    if report.references and any(v.drop_points is not None for v in report.variants):
        r = Table(title="accuracy drop next to Qualcomm's published figures for MobileNetV2 (ImageNet top-1; "
                        "shown because this model is a MobileNetV2)",
                  caption="sources: " + "; ".join(f"{ref.short}: {ref.source}" for ref in report.references))
        for col in ("", "float", "quantized", "drop", "drop / float"):
            r.add_column(col, justify="left" if not col else "right")
        for ref in report.references:
            r.add_row(ref.short, "-" if ref.float_accuracy is None else f"{ref.float_accuracy:.2f}%",
                      "-" if ref.quantized_accuracy is None else f"{ref.quantized_accuracy:.2f}%",
                      f"{ref.drop:.2f} pt" if ref.published_drop is None else f"about {ref.drop:.1f} pt",
                      _pct(ref.relative_drop))
        for v in report.variants:
            if v.drop_points is not None:
                r.add_row(f"ours: {v.key}", _pct(v.float_accuracy), _pct(v.accuracy), f"{v.drop_points:.2f} pt",
                          _pct(v.relative_drop))
        ui.table(r)
    for note in report.notes:
        if note != first:
            ui.result(f"note: {note}")
