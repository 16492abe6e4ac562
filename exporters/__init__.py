"""Exporters: one module per format (onnx, tflite, coreml), each turning a model or
an ONNX file into an ``Artifact`` with its app metadata."""
from exporters.artifact import Artifact, Manifest, ModelCard, Preprocessing, TensorSpec  # noqa: F401
