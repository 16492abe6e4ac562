"""Exporters: one registered ``Exporter`` per format (``exporters.base``), each turning a
model or an ONNX file into ``Artifact``s with its app metadata."""
from exporters.artifact import Artifact, Manifest, ModelCard, Preprocessing, TensorSpec  # noqa: F401
