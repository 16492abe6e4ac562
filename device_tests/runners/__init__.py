"""Runners, one per runtime. Importing this package registers the built-in ones."""
import importlib as _importlib

from device_tests.runners.base import Runner, runner_class, runner_for  # noqa: F401

for _mod in ("torch", "onnxruntime", "litert", "coreml"):
    _importlib.import_module(f"device_tests.runners.{_mod}")
