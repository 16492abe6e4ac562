"""The ``Exporter`` protocol: one registered class per way of writing a deployable file.

Why a registry: the export stage used to keep a table of modules, probe their
attributes for the precisions they offer and branch on the format to call each with
its own flags. Now an exporter says, as class attributes, what it needs and offers,
and the stage loops over the registered ones; adding a format is one file with one
subclass, registered by being defined (as runners are).

* ``format``: the ``--formats`` name it answers to (``onnx``, ``tflite``, ``coreml``, ``executorch``).
  Several exporters may share a format (the Core ML weight-compressed variants are a
  second ``coreml`` exporter, registered by ``quantize.coreml``); each takes the
  requested precisions it offers.
* ``precisions`` / ``default_precisions``: what ``--precisions`` may ask of it, and
  what it writes when nothing is asked. ``supports()`` may accept a family
  (``prune<NN>``). ``takes_precisions = False``: the format has one precision and
  ignores ``--precisions`` (ONNX).
* ``needs``: ``MODULE`` (the ``nn.Module``) or the format name of the file it reads
  (TFLite reads the ONNX file; the stage writes it to a temporary folder when ONNX
  itself was not asked for).
* ``options_type``: its own typed options (an ``ExporterOptions`` dataclass); each
  field names the flag/config key it is set from, so the stage never knows them.

Exporters are below ``quantize/`` in the import order: nothing here imports it.
"""
from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

from exporters.artifact import Artifact, ModelCard, Preprocessing
from models.errors import InputError

MODULE = "module"
_EXPORTERS: dict[str, type["Exporter"]] = {}
BUILTIN_EXPORTERS = ("exporters.onnx", "exporters.tflite", "exporters.coreml", "exporters.executorch")


def option(default: Any, *, key: str, flag: str, **kw: Any) -> Any:
    """A dataclass field of an exporter's options, set from ``key`` in the export options
    (the config key and ``ExportOptions`` field) and named ``flag`` in errors."""
    return field(default=default, metadata={"key": key, "flag": flag}, **kw)


@dataclass
class ExporterOptions:
    """Base of every exporter's typed options (no fields: an exporter with no options)."""

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> "ExporterOptions":
        """The options from flat values (``ExportOptions`` fields, config keys); absent
        keys keep their defaults. Values are checked and normalised by ``checked``."""
        kw = {}
        for f in dataclasses.fields(cls):
            key = f.metadata.get("key", f.name)
            if key in values:
                kw[f.name] = values[key]
        return cls(**kw).checked()

    def checked(self) -> "ExporterOptions":
        """Normalised and validated without running any tool (one-line ``InputError``
        naming the flag); runs even when the format is not exported."""
        return self

    def resolved(self) -> "ExporterOptions":
        """Fill defaults that need the tool (e.g. Core ML's deployment target); only for
        an exporter that will run."""
        return self

    def changed_flags(self) -> list[str]:
        """Flags set to something other than their default (ignored when the format is
        not exported: said as a warning)."""
        default = type(self)()
        return [f.metadata.get("flag", f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(default, f.name)]

    def source(self) -> dict[str, Any]:
        """What ``manifest.json``'s ``source`` records of these options, by key."""
        return {f.metadata.get("key", f.name): getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class ExportContext:
    """What every exporter may use besides its input: the model's contract and the folder.

    ``calibration()`` loads calibration inputs (float32 NCHW, preprocessed) on first
    call, or returns None when there is no data source; only quantizing exporters call
    it. ``artifacts`` are those written so far in this export (a later exporter may
    build on an earlier one's file, under ``root``).
    """

    model: Any                                   # torch.nn.Module, eval mode, deploy form
    input_shape: tuple[int, ...]                 # (N, C, H, W)
    preprocessing: Preprocessing
    root: Path                                   # artifact paths are relative to it
    labels: list[str] | None = None
    card: ModelCard | None = None
    calibration: Callable[[], Any] = lambda: None
    artifacts: list[Artifact] = field(default_factory=list)


class Exporter(ABC):
    name: ClassVar[str]                          # unique registry key
    format: ClassVar[str]                        # the --formats name
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    default_precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    takes_precisions: ClassVar[bool] = True
    needs: ClassVar[str] = MODULE
    options_type: ClassVar[type[ExporterOptions]] = ExporterOptions

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if getattr(cls, "name", None):
            _EXPORTERS[cls.name] = cls

    def __init__(self, options: ExporterOptions | None = None) -> None:
        self.options = options if options is not None else self.options_type()

    @classmethod
    def supports(cls, precision: str) -> bool:
        return precision in cls.precisions

    @abstractmethod
    def export(self, source: Any, out_dir: Path, precisions: Sequence[str],
               ctx: ExportContext) -> list[Artifact]:
        """Write one artifact per precision (or more: Core ML "both") into ``out_dir``.

        ``source`` is the model (``needs == MODULE``) or the path of the file of the
        format it needs. Artifact paths are relative to ``ctx.root``.
        """


def import_exporter_module(mod: str) -> None:
    """Import a module that registers exporters; its absence is a one-line error."""
    try:
        importlib.import_module(mod)
    except ModuleNotFoundError as exc:
        if exc.name != mod:
            raise
        raise InputError("--formats", f"formats whose exporters are installed ({mod} missing)",
                         "no such module") from None


def load_builtin_exporters() -> None:
    for mod in BUILTIN_EXPORTERS:
        import_exporter_module(mod)


def exporter_classes() -> list[type[Exporter]]:
    """Every registered exporter: the built-ins in ``BUILTIN_EXPORTERS`` order, then the
    others in registration order (whoever imported what first does not matter)."""
    load_builtin_exporters()
    order = {mod: i for i, mod in enumerate(BUILTIN_EXPORTERS)}
    classes = list(_EXPORTERS.values())
    return sorted(classes, key=lambda c: (order.get(c.__module__, len(order)), classes.index(c)))


def exporter_formats() -> tuple[str, ...]:
    return tuple(dict.fromkeys(cls.format for cls in exporter_classes()))


def exporters_for(fmt: str) -> list[type[Exporter]]:
    return [cls for cls in exporter_classes() if cls.format == fmt]


def precisions_for(classes: Iterable[type[Exporter]], fmt: str,
                   asked: Sequence[str] | None) -> dict[type[Exporter], tuple[str, ...]]:
    """``--precisions`` is one list for every format: each exporter gets the ones it
    supports (``fp32,fp16,int8`` -> TFLite all three, Core ML fp32 and fp16); an
    exporter with none of them is left out, a format with none at all is an error."""
    classes = list(classes)
    out = {cls: tuple(dict.fromkeys(p for p in asked if cls.supports(p)))
           if asked and cls.takes_precisions else tuple(cls.default_precisions) for cls in classes}
    out = {cls: p for cls, p in out.items() if p}
    if asked and not out:
        offered = [p for cls in classes for p in cls.precisions]
        raise InputError("--precisions", f"for {fmt}, some of {', '.join(dict.fromkeys(offered))}",
                         ", ".join(asked))
    return out


def check_precisions_known(classes: Iterable[type[Exporter]], asked: Sequence[str] | None) -> None:
    """A precision no selected exporter offers is a typo, not a silent skip."""
    takers = [cls for cls in classes if cls.takes_precisions]
    if not asked or not takers:
        return
    unknown = [p for p in asked if not any(cls.supports(p) for cls in takers)]
    if unknown:
        known = sorted({p for cls in takers for p in cls.precisions})
        raise InputError("--precisions", f"some of {', '.join(known)}", ", ".join(unknown))
