"""The machine this process runs on: runners in-process, profiling in-process."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from device_tests.devices.base import Batch, Device
from device_tests.profile import Profile, host_description, profile_local
from exporters.artifact import Artifact


class LocalDevice(Device):
    kind = "local"

    @property
    def spec(self) -> str:
        return "local"

    def run_batches(self, runner_kind: str, artifact: Artifact, root: str | Path,
                    batches: list[Batch], **runner_options: Any) -> list[Batch]:
        from device_tests.runners import runner_class
        with runner_class(runner_kind)(**runner_options) as runner:
            runner.load(artifact, root)
            return [runner.infer(b) for b in batches]

    def profile(self, artifact: Artifact, root: str | Path, *, runs: int = 50, warmup: int = 5,
                threads: int | None = None, op_profile: bool = True) -> Profile:
        return profile_local(artifact, root, runs=runs, warmup=warmup, threads=threads,
                             op_profile=op_profile)

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", **host_description()}
