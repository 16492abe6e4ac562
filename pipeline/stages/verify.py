"""The verify stage: the same inputs through PyTorch and every artifact of an export folder.

Used by ``mdeploy verify`` and ``mdeploy run``. Inputs are real images where possible:
the held-out (test) split of the data set recorded in the checkpoint's metadata
(``source.data`` in the manifest, e.g. ``mnist``), or what the user gives (a bundled set
name, ``.npy``/``.npz``, an image folder). Without either, verification refuses
(``InputError`` naming ``--inputs``/``--random-inputs``): parity on noise passes models
that fail on photos and fails models that work. Random pixels only when asked for
(``random_inputs``), and the report's first note then says it is not evidence of parity. Each artifact's pair against the PyTorch reference gets a ``PairReport``;
a failing pair gets its first divergent layer and per-layer error curve.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from device_tests.compare import (FP64_MARGIN, ParityReport, compare, fp64_distances, run_all, run_batched,
                                  tolerance_for, tolerance_row)
from device_tests.divergence import find_first_divergent, worst_samples
from device_tests.runners.base import Runner, RuntimeMissing, runner_for
from exporters.artifact import Artifact, Manifest, sha256_of
from models.datasets import is_bundled
from models.errors import InputError
from models.images import load_images, match_class_folders, preprocess

DEFAULT_SAMPLES = 100          # 1% resolution on top-1 agreement, seconds on CPU for small models
IN_ORDER_SAMPLES = 16          # inputs of the in-order fp32 forward (one tensor op per product index: slow)
DIVERGENCE_SAMPLES = 4         # the worst-differing inputs are enough to localise a fault


@dataclass
class VerifyOptions:
    inputs: str | None = None              # FILE (.npy/.npz) | DIR | mnist | digits; None: from metadata
    samples: int = DEFAULT_SAMPLES
    tolerances: dict[str, dict[str, float | None]] = field(default_factory=dict)  # scope -> overrides
    runners: tuple[str, ...] | None = None  # runner kinds to verify (None: every artifact)
    runner_options: dict[str, dict[str, Any]] = field(default_factory=dict)        # kind -> options
    divergence: bool = True
    per_layer: str = "failing"             # failing | all: whose per-layer error curve to compute
    divergence_samples: int = DIVERGENCE_SAMPLES
    batch_size: int = 32
    seed: int = 0
    random_inputs: bool = False            # explicitly accept random pixels (no real inputs)


RANDOM_DISCLAIMER = ("NOT EVIDENCE OF PARITY: these inputs are random pixels (--random-inputs); a model can "
                     "agree on noise and disagree on real images. Verify with --inputs FOLDER|IMAGE|.npz")


def require_real_inputs(flag: str, what: str = "real inputs") -> InputError:
    """The one-line refusal when a model has no data set of its own and none was given."""
    return InputError(flag, f"{what}: {flag} FOLDER|IMAGE|.npy|.npz (or --random-inputs to run on noise, "
                            "which is no evidence)", "no data set recorded in the export and none given")


@dataclass
class VerifyInputs:
    x: np.ndarray                    # float32 NCHW, preprocessed
    labels: np.ndarray | None
    source: str
    random: bool = False
    note: str | None = None          # why the labels are missing or how folders were read


@dataclass
class VerifyResult:
    report: ParityReport
    divergences: dict[str, Any] = field(default_factory=dict)   # target key -> Divergence
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.report.passed


Progress = Callable[[str], None]


# -- inputs -------------------------------------------------------------------

def has_held_out(data: str | Path) -> bool:
    """A source with a held-out part: a bundled set, or a folder with ``test/``/``val/``."""
    path = Path(str(data))
    return is_bundled(data) or (path.is_dir() and any((path / s).is_dir() for s in ("test", "val")))


def load_inputs(spec: str | None, manifest: Manifest, samples: int | None, seed: int = 0,
                random_inputs: bool = False, flag: str = "--inputs") -> VerifyInputs:
    """Preprocessed model inputs (and labels when known) for verification, read and
    preprocessed by ``models.images.load_images`` as calibration is: the held-out split
    of a bundled set, an image folder's ``test/``/``val/`` sub-folder (else all of it).
    Random pixels only with ``random_inputs``; without data that is an ``InputError``."""
    pre = manifest.preprocessing
    if spec and random_inputs:
        raise InputError("--random-inputs", f"either {flag} or --random-inputs", "both")
    data = None if random_inputs else spec or manifest.source.get("data")
    if data is None and not random_inputs:
        raise require_real_inputs(flag)
    if data is None:
        rng = np.random.default_rng(seed)
        h, w = pre.input_size
        pixels = rng.integers(0, 256, (samples or DEFAULT_SAMPLES, h, w, pre.channels), dtype=np.uint8)
        return VerifyInputs(preprocess(pixels, pre), None, "random pixels", random=True)
    bundled = is_bundled(data)
    held_out = has_held_out(data)
    got = load_images(data, pre, "test" if held_out else "all", samples, seed)
    labels = got.labels
    note = None
    if labels is not None and got.classes is not None and not bundled:
        num_classes = _num_classes(manifest)
        mapping, note = match_class_folders(got.classes, manifest.labels, num_classes)
        labels = None if mapping is None else mapping[labels]
    source = f"{str(data).lower()} (held-out test split)" if bundled else got.source
    return VerifyInputs(got.x, labels, source, note=f"{source}: {note}" if note else None)


def _num_classes(manifest: Manifest) -> int | None:
    for art in manifest.artifacts:
        if art.outputs and art.outputs[0].shape and isinstance(art.outputs[0].shape[-1], int):
            return int(art.outputs[0].shape[-1])
    return None


# -- running ------------------------------------------------------------------



def _fp64_check(report: ParityReport, results: Any, ref_art: Artifact, root: Path,
                feeds: dict[str, np.ndarray], opts: VerifyOptions, say: Progress,
                divergences: dict[str, Any] | None = None) -> None:
    """For a failing fp32 pair, tell rounding from a fault: run the PyTorch reference in
    float64 and measure how far fp32 PyTorch itself is from it. A model can be
    ill-conditioned in fp32 (a BatchNorm with near-zero variance multiplies rounding by
    1/sqrt(eps) ~ 316); then every fp32 runtime misses 1e-5, and the report says so
    rather than pass it silently. The tolerance itself does not move."""
    failing = [p for p in report.pairs if not p.passed and tolerance_row(p.precision) == "fp32"]
    if not failing:
        return
    try:
        runner = runner_for(ref_art)(**{**opts.runner_options.get("torch", {}), "dtype": "float64"})
    except (InputError, TypeError):
        return                                           # a reference without a float64 mode
    say("measuring PyTorch's own fp32 rounding against float64")
    with runner:
        runner.load(ref_art, root)
        exact = next(iter(run_batched(runner, feeds, batch_size=opts.batch_size).values()))
    # the other honest fp32 order (XNNPACK's): each product summed in turn, on a few inputs
    few = {k: v[:IN_ORDER_SAMPLES] for k, v in feeds.items()}
    with runner_for(ref_art)(**{**opts.runner_options.get("torch", {}), "accumulation": "in-order"}) as seq:
        seq.load(ref_art, root)
        in_order = next(iter(run_batched(seq, few, batch_size=opts.batch_size).values()))
    _, ref32 = results.output(report.pairs[0].reference)
    for pair in failing:
        _, t = results.output(pair.target)
        own, tgt, rounding = fp64_distances(ref32, t, exact, in_order)
        pair.fp64_check = {"reference_vs_fp64": own, "target_vs_fp64": tgt}
        where = _where(pair, (divergences or {}).get(pair.target))
        if rounding:
            closer = " (closer to exact than the reference)" if tgt < own else ""
            look = (f"look at {where[1]}" if where and where[0] != "built up over" else
                    "look for BatchNorm layers with near-zero running variance")
            pair.diagnosis = (f"fp32 rounding, not a fault: PyTorch fp32 itself (its own sums, or each "
                              f"product summed in turn as XNNPACK does) is {own:.3g} from float64 "
                              f"and {pair.target} {tgt:.3g}{closer}; this model amplifies rounding ({look}). "
                              f"To accept it: --tolerance fp32:max_abs={FP64_MARGIN * own:.2g}")
        else:
            at = f", {where[0]} {where[1]}" if where else ""
            pair.diagnosis = (f"{pair.target} is {tgt:.3g} from float64 where PyTorch fp32 (either sum order) "
                              f"is {own:.3g}: "
                              f"beyond fp32 rounding, a real divergence{at}")


def _where(pair: Any, div: Any) -> tuple[str, str] | None:
    """Where the per-layer search put the error, worded to agree with its note: the first
    failing layer, else the layer where the SNR steps down, else spread over the layers."""
    step = getattr(div, "step", None) if div is not None else None
    if pair.first_divergent and step is not None:
        return "introduced at", (f"{step.module} (the per-layer SNR steps down there) and first beyond "
                                 f"the per-layer bound at {pair.first_divergent['layer']}")
    if pair.first_divergent:
        return "first at", str(pair.first_divergent["layer"])
    if step is not None:
        return "introduced at", f"{step.module} (the per-layer SNR steps down there)"
    if div is not None and div.layers:
        return "built up over", "the layers (no single layer steps down)"
    return None


def open_runner(artifact: Artifact, root: Path, options: dict[str, dict[str, Any]]) -> Runner:
    """The artifact's registered runner, loaded, with the options given for its kind."""
    cls = runner_for(artifact)
    runner = cls(**options.get(cls.kind, {}))
    runner.load(artifact, root)
    return runner


def verify_folder(folder: str | Path, options: VerifyOptions | None = None,
                  progress: Progress | None = None) -> VerifyResult:
    """Verify every artifact of ``folder`` against its PyTorch reference."""
    opts = options or VerifyOptions()
    say = progress or (lambda msg: None)
    root = Path(folder)
    if opts.runners is not None:
        # a misspelt runner used to verify nothing and pass ("0/0 pairs pass", exit 0)
        from device_tests.runners.base import BUILTIN_RUNNERS, load_builtin_runners, _RUNNERS
        load_builtin_runners()
        known = sorted({*BUILTIN_RUNNERS, *_RUNNERS})
        bad = [k for k in opts.runners if k not in known]
        if bad or not opts.runners:
            raise InputError("--runners", f"a comma list of {', '.join(known)}", ", ".join(bad) or "nothing")
    manifest = Manifest.load(root)
    refs = manifest.find("pt")
    if not refs:
        raise InputError(root / "manifest.json", "a pt reference artifact (written by mdeploy export)",
                         "none")
    ref_art = refs[0]
    targets = [a for a in manifest.artifacts if a is not ref_art and a.format != "pt"]
    from device_tests.compare import DEFAULT_TOLERANCES
    scopes = {"*", *DEFAULT_TOLERANCES, *(a.precision.lower() for a in targets)}
    unknown = [sc for sc in opts.tolerances if sc not in scopes]
    if unknown:                  # 'int3:max_abs=1' used to change nothing, silently
        raise InputError("--tolerance", f"a precision among {', '.join(sorted(scopes - {'*'}))}",
                         ", ".join(unknown))
    notes: list[str] = []
    for art in [ref_art, *targets]:
        path = art.resolve(root)
        if not path.exists():
            raise InputError(path, f"the {art.key} artifact listed in the manifest", "no such file")
        if art.sha256 and sha256_of(path) != art.sha256:
            notes.append(f"{art.path} changed since export (sha256 differs from the manifest)")
    if opts.samples is not None and opts.samples < 1:
        raise InputError("--samples", "a positive number", str(opts.samples))

    inputs = load_inputs(opts.inputs, manifest, opts.samples, opts.seed, opts.random_inputs)
    if inputs.note:
        notes.append(inputs.note)
    if inputs.random:
        notes.insert(0, RANDOM_DISCLAIMER)

    runners: dict[str, Runner] = {}
    try:
        say(f"loading the PyTorch reference ({ref_art.path})")
        runners[ref_art.key] = open_runner(ref_art, root, opts.runner_options)
        for art in targets:
            try:
                cls = runner_for(art)
            except KeyError:
                notes.append(f"{art.key}: no runner for format {art.format!r} here; skipped")
                continue
            if opts.runners is not None and cls.kind not in opts.runners:
                continue
            say(f"loading {art.key} ({cls.kind})")
            key = art.key if art.key not in runners else f"{art.key}:{art.path}"
            try:
                runners[key] = open_runner(art, root, opts.runner_options)
            except RuntimeMissing as exc:     # e.g. a Core ML .pte on Linux: skipped and said, not passed
                notes.append(f"{art.key}: skipped, not verified: {exc.found}")
        keys = list(runners)
        if len(keys) < 2:
            # nothing compared is not a pass
            why = f"none of the runners {', '.join(opts.runners)}" if opts.runners is not None else "none"
            raise InputError(root / "manifest.json", "an artifact to compare against the PyTorch reference",
                             f"{why} among {', '.join(a.key for a in targets) or 'no artifacts'}")
        say(f"running {len(inputs.x)} inputs through {', '.join(keys)}")
        results = run_all(runners, {ref_art.inputs[0].name: inputs.x}, batch_size=opts.batch_size)

        report = ParityReport(inputs={"source": inputs.source, "samples": int(len(inputs.x)),
                                      "shape": list(inputs.x.shape), "labels": inputs.labels is not None,
                                      "random": inputs.random},
                              runners={k: r.label for k, r in runners.items()})
        divergences: dict[str, Any] = {}
        ref_key = keys[0]
        for key in keys[1:]:
            art = runners[key].artifact
            assert art is not None
            tol = tolerance_for(art.precision, opts.tolerances)
            pair = compare(results, ref_key, key, tol, labels=inputs.labels, precision=art.precision)
            pair.reference_runner, pair.target_runner = runners[ref_key].label, runners[key].label
            pair.target_path = art.path
            if opts.divergence and (not pair.passed or opts.per_layer == "all"):
                say(f"searching the first divergent layer of {key}" if not pair.passed
                    else f"per-layer errors of {key}")
                _, r = results.output(ref_key)
                _, t = results.output(key)
                idx = worst_samples(r, t, opts.divergence_samples)
                div = find_first_divergent(runners[ref_key], runners[key],
                                           {ref_art.inputs[0].name: inputs.x[idx]}, tol)
                if not pair.passed:        # a passing pair may still have a layer above its tolerance
                    pair.first_divergent = div.summary()
                pair.layers = div.layers
                pair.divergence_note = div.note
                divergences[key] = div
            report.pairs.append(pair)
        _fp64_check(report, results, ref_art, root, {ref_art.inputs[0].name: inputs.x}, opts, say,
                    divergences)
    finally:
        for r in runners.values():
            r.close()
    report.notes = notes
    return VerifyResult(report, divergences, notes)
