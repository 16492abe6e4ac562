"""Small zoo exports shared by the device benchmarks (built once, reused from the cache)."""
from __future__ import annotations

from pathlib import Path

from exporters.artifact import Manifest

DEFAULT_MODELS = ("mobilenet_v2_035", "shufflenet_v2_x0_5", "squeezenet1_1")
CACHE = Path("runs") / "bench_exports"


def zoo_export(name: str, cache: Path = CACHE, size: int = 32) -> Path:
    """ONNX fp32 + TFLite fp32/int8 of ``name`` for 1x``size``x``size`` MNIST-shaped input
    (10 classes), int8 calibrated on MNIST; an existing export is reused."""
    from models import model_entry
    from pipeline.stages.export import ExportOptions, export_model
    folder = cache / name
    if (folder / "manifest.json").exists():
        return folder
    size = max(size, model_entry(name).small_input_size)
    export_model(name, folder, options=ExportOptions(
        formats=("onnx", "tflite"), precisions=("fp32", "int8"), input_size=size, num_classes=10,
        in_chans=1, calibration="mnist", force=True))
    return folder


def artifact(folder: Path, key: str):
    m = Manifest.load(folder)
    found = [a for a in m.artifacts if a.key == key]
    if not found:
        raise KeyError(f"{folder}: no artifact {key}; have {[a.key for a in m.artifacts]}")
    return found[0]
