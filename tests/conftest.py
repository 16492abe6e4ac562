"""Shared fixtures. The expensive one, a model trained on the bundled MNIST, is made
once per test session and shared by every test that needs real trained weights
(int8 agreement, accuracy drop, export/verify of a trained model)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The small MobileNetV2 that `mdeploy run` trains by default, at fewer epochs.
TRAINED_MODEL = {"model": "mobilenet_v2", "model_kwargs": {"width_mult": 0.35}, "data": "mnist",
                 "epochs": 3, "batch_size": 64, "seed": 0}


@pytest.fixture(scope="session")
def trained_mnist(tmp_path_factory) -> Path:
    """Folder with ``model.safetensors`` of a small MobileNetV2 trained on bundled MNIST."""
    from pipeline.stages.train import TrainConfig, train
    out = tmp_path_factory.mktemp("trained_mnist")
    result = train(TrainConfig(**TRAINED_MODEL), out, force=True)
    return result.checkpoint


@pytest.fixture
def cli(capsys):
    """Run ``mdeploy`` in-process: returns (exit code, stdout, stderr)."""
    from pipeline.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = main(list(argv))
        except SystemExit as exc:       # argparse errors
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return code, out.out, out.err
    return run
