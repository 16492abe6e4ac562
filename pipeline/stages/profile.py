"""Profile stage: every artifact of an export folder on every requested device.

``profile_folder`` is what ``mdeploy profile`` and ``mdeploy run`` call. A pair that
cannot be profiled (a Core ML package off macOS, an ONNX file on an adb phone, an
unprovisioned emulator) is recorded as skipped with its reason; it never fails the others.
``estimates_for_folder`` adds catalogue roofline lower bounds, labelled as estimates.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from device_tests.catalog import Estimate, estimate_model
from device_tests.devices import Device, DeviceError, parse_device
from device_tests.devices.base import DeviceUnavailable
from device_tests.profile import NotProfilable, Profile, ProfileError
from exporters.artifact import Artifact, Manifest
from models.errors import InputError
from models.util import one_line

DEFAULT_SKIP_FORMATS = ("pt",)     # the PyTorch reference weights are not a deployment target


@dataclass
class ProfileOptions:
    devices: list[str] = field(default_factory=lambda: ["local"])
    runs: int = 50
    warmup: int = 5
    threads: int | None = None
    artifacts: list[str] | None = None          # artifact keys or formats; None = all but pt
    op_profile: bool = True
    adb_options: dict[str, Any] = field(default_factory=dict)   # use_gpu, use_nnapi, use_xnnpack


@dataclass
class Skipped:
    artifact: str
    device: str
    reason: str


@dataclass
class ProfileResult:
    folder: str
    profiles: list[Profile] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    estimates: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        import dataclasses
        return {"folder": self.folder, "profiles": [p.to_dict() for p in self.profiles],
                "skipped": [dataclasses.asdict(s) for s in self.skipped], "estimates": self.estimates}


def select_artifacts(manifest: Manifest, wanted: list[str] | None) -> list[Artifact]:
    if not wanted:
        return [a for a in manifest.artifacts if a.format not in DEFAULT_SKIP_FORMATS]
    keys = {a.key for a in manifest.artifacts}
    formats = {a.format for a in manifest.artifacts}
    bad = [w for w in wanted if w not in keys and w not in formats]
    if bad:
        raise InputError("--artifacts", f"artifact keys or formats among {', '.join(sorted(keys))}",
                         ", ".join(bad))
    return [a for a in manifest.artifacts if a.key in wanted or a.format in wanted]


def check_artifact_file(art: Artifact, folder: Path) -> None:
    """The artifact's file exists and its runtime can parse it (``Runner.check_file``): a
    truncated or foreign ``.tflite``/``.onnx`` is an ``InputError`` naming the file (it used
    to be profiled as a warning and exit 0). Parsing only: nothing is run."""
    from device_tests.runners.base import runner_for
    path = art.resolve(folder)
    if not path.exists():
        raise InputError(path, f"the {art.key} artifact listed in the manifest", "no such file")
    try:
        cls = runner_for(art)
    except KeyError:                 # a format no runner loads: nothing to parse it with
        return
    cls.check_file(path)


def profile_folder(folder: str | Path, opts: ProfileOptions,
                   progress: Callable[[str], None] | None = None) -> ProfileResult:
    folder = Path(folder)
    if opts.runs < 1 or opts.warmup < 0 or (opts.threads is not None and opts.threads < 1):
        raise InputError("--runs/--warmup/--threads", "runs >= 1, warmup >= 0, threads >= 1",
                         f"{opts.runs}/{opts.warmup}/{opts.threads}")
    manifest = Manifest.load(folder)
    artifacts = select_artifacts(manifest, opts.artifacts)
    devices: list[Device] = [parse_device(d) for d in opts.devices]    # bad specs fail before any work
    for art in artifacts:
        check_artifact_file(art, folder)        # a truncated file is bad input, not a skipped row
    result = ProfileResult(str(folder))
    say = progress or (lambda msg: None)
    for device in devices:
        for art in artifacts:
            say(f"profiling {art.key} on {device.spec}")
            extra = opts.adb_options if device.kind == "adb" else {}
            try:
                result.profiles.append(device.profile(art, folder, runs=opts.runs, warmup=opts.warmup,
                                                      threads=opts.threads, op_profile=opts.op_profile,
                                                      **extra))
            except (NotProfilable, ProfileError, DeviceUnavailable, DeviceError) as exc:
                result.skipped.append(Skipped(art.key, device.spec, one_line(exc, 400)))
    return result


def _precision_bucket(precision: str) -> str:
    p = precision.lower()
    return "int8" if p.startswith(("int8", "w8", "uint8")) else "fp16" if "16" in p else "fp32"


def model_complexity(folder: Path, manifest: Manifest, model: str | None = None) -> tuple[int, int, int, int]:
    """(MACs, params, input elements, output elements) of the export's PyTorch reference."""
    from models.checkpoint import build_model
    from models.complexity import count_complexity
    ref = next((a for a in manifest.artifacts if a.format == "pt"), None)
    if ref is None:
        raise InputError(folder, "an export with its PyTorch reference (pt artifact) for MAC counts",
                         "no pt artifact")
    model, meta = build_model(model, ref.resolve(folder))     # model: only what the user named
    pre = manifest.preprocessing
    c = count_complexity(model, tuple(pre.input_size), in_chans=pre.channels)
    out_elems = 1
    for d in (ref.outputs[0].shape if ref.outputs else [meta.get("num_classes", 1)]):
        out_elems *= d if isinstance(d, int) else 1
    in_elems = pre.channels * pre.input_size[0] * pre.input_size[1]
    return c.macs, c.params, in_elems, out_elems


def estimates_for_folder(folder: str | Path, device_keys: list[str] | None,
                         artifacts: list[str] | None = None, model: str | None = None) -> list[dict[str, Any]]:
    """Roofline lower bounds for each precision the export holds, on catalogued devices."""
    import dataclasses
    folder = Path(folder)
    manifest = Manifest.load(folder)
    macs, params, in_el, out_el = model_complexity(folder, manifest, model)
    precisions = sorted({_precision_bucket(a.precision) for a in select_artifacts(manifest, artifacts)})
    rows: list[Estimate] = []
    for precision in precisions:
        rows += estimate_model(macs, params, in_el, out_el, precision, device_keys)
    return [{**dataclasses.asdict(e), "macs": macs, "params": params} for e in rows]
