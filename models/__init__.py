"""The model zoo: efficient mobile CNNs built from shared blocks, one registry.

``create_model(name, num_classes=1000, in_chans=3, **kw)`` and ``list_models()``
are the public entry points; every architecture module below registers itself
on import.
"""
from models.registry import create_model, list_models, model_entry, register_model  # noqa: F401
from models.errors import InputError  # noqa: F401

# Architecture modules register themselves on import. Keep this list sorted.
import importlib as _importlib

for _mod in (
    "densenet", "efficientnet_lite", "mixer", "mobilenet", "repvgg", "resnext", "shift", "shufflenet",
    "sparse_shift", "squeezenet", "xception",
):
    _importlib.import_module(f"models.{_mod}")
