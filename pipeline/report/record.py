"""The run record: what ``mdeploy run`` measured, one typed result per stage.

The report, the ``--json`` document and the tests used to read one dict by string keys, so
a new stage meant edits in the run command, the report writer and the Markdown, and a
mistyped key was a silently empty section. Here each stage's result is a dataclass that
knows its own part of every output, through one small protocol (``ReportSection``): its
JSON (``to_dict()``), its plots and its Markdown. The record only keeps the results in the
order the stages ran; adding a stage is one new section class and one ``add`` call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, TypeVar, runtime_checkable

# Prefix of the quantize stage's artifacts wherever they sit beside the export's (profiles,
# plots): its folder holds keys such as tflite/int8-io that the export folder has too.
QUANTIZED = "quantized "

Figure = Callable[[str], list[str]]      # plot name -> its Markdown lines (none if not drawn)
S = TypeVar("S")
_RUN_KEYS = frozenset({"name", "run_dir", "config", "stages", "notes"})


@runtime_checkable
class ReportSection(Protocol):
    """A stage's part of the run record and of the report."""

    @property
    def key(self) -> str:
        """Its key in the ``--json`` document and ``report.json`` (one per record)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (the documented ``--json`` schema)."""

    def plots(self, run: RunRecord) -> dict[str, bytes]:
        """Plot name -> PNG; ``run`` gives the other stages' results for figures that
        combine them."""

    def markdown(self, run: RunRecord, figure: Figure) -> list[str]:
        """Its Markdown lines; ``figure(name)`` places a plot of any section, if drawn."""


@dataclass
class RunRecord:
    """One run: its own keys and the stages' sections in the order they ran (which is also
    the order of the JSON keys and of the report)."""

    name: str
    run_dir: str
    config: dict[str, Any]
    stages: dict[str, float] = field(default_factory=dict)     # seconds per stage, in run order
    notes: list[str] = field(default_factory=list)
    sections: list[ReportSection] = field(default_factory=list)

    def add(self, section: S) -> S:
        if not isinstance(section, ReportSection):
            raise TypeError(f"{type(section).__name__} is not a ReportSection")
        if section.key in _RUN_KEYS or self.get(section.key) is not None:
            raise ValueError(f"the run record already has a {section.key!r} key")
        self.sections.append(section)
        return section

    def get(self, key: str) -> ReportSection | None:
        return next((s for s in self.sections if s.key == key), None)

    def sections_of(self, kind: type[S]) -> list[S]:
        return [s for s in self.sections if isinstance(s, kind)]

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document and ``report.json``."""
        return {"name": self.name, "run_dir": self.run_dir, "config": self.config, "stages": dict(self.stages),
                "notes": list(self.notes), **{s.key: s.to_dict() for s in self.sections}}
