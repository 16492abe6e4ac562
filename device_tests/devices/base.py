"""``Device``: where a runner runs. Every device can run an artifact on inputs (for
parity) and profile it; what it cannot do it says, as an exception naming the reason
and the fix, never as a silent fallback to the host.
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from device_tests.profile import Profile
from exporters.artifact import Artifact
from models.errors import InputError


_WORD = re.compile(r"^[A-Za-z0-9_.:%\[\]/+=@,~-]+$")


def check_word(value: str | None, what: str, spec: str, pattern: re.Pattern[str] | None = None) -> str | None:
    """A value from a device spec that lands on a command line (ssh host, user, adb serial,
    remote python): never empty, never starting with ``-`` (ssh and adb would read it as an
    option: ``-oProxyCommand=...`` runs a local command), no whitespace or control
    characters. Returns the value; ``InputError`` naming the spec otherwise."""
    if value is None:
        return None
    if not value or value.startswith("-") or not (pattern or _WORD).match(value):
        raise InputError(spec, f"a {what} of plain characters, not starting with '-'", repr(value)[:60])
    return value


class DeviceUnavailable(InputError):
    """The device cannot do this here (not provisioned, not attached, unsupported)."""

    def __init__(self, device: str, expected: str, found: str, fix: str = "") -> None:
        self.fix = fix
        super().__init__(device, expected, found + (f" (fix: {fix})" if fix else ""))


class DeviceError(RuntimeError):
    """The device was there but the run failed (remote traceback, runtime crash)."""


Batch = dict[str, np.ndarray]


class Device(ABC):
    kind: str = ""

    @property
    @abstractmethod
    def spec(self) -> str:
        """The string that ``parse_device`` turns back into this device."""

    @abstractmethod
    def run_batches(self, runner_kind: str, artifact: Artifact, root: str | Path,
                    batches: list[Batch], **runner_options: Any) -> list[Batch]:
        """Run ``artifact`` with the runner ``runner_kind`` on each batch (float32 NCHW in and out)."""

    def run(self, runner_kind: str, artifact: Artifact, root: str | Path, inputs: Batch,
            **runner_options: Any) -> Batch:
        return self.run_batches(runner_kind, artifact, root, [inputs], **runner_options)[0]

    @abstractmethod
    def profile(self, artifact: Artifact, root: str | Path, *, runs: int = 50, warmup: int = 5,
                threads: int | None = None, op_profile: bool = True) -> Profile:
        """Latency, memory and per-op time of ``artifact`` on this device."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What this device is (SoC, CPU, OS, runtime versions), for reports."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec}>"
