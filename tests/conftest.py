"""Shared fixtures. The expensive one, a model trained on the bundled MNIST, is made
once per test session and shared by every test that needs real trained weights
(int8 agreement, accuracy drop, export/verify of a trained model)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

@pytest.fixture(scope="session")
def trained_mnist(tmp_path_factory) -> Path:
    """Path of ``model.safetensors``: exactly the model `mdeploy run` trains by default
    (a small MobileNetV2 on the bundled MNIST), so tests see the accuracy users get."""
    from pipeline.config import RunConfig
    from pipeline.stages.train import train
    out = tmp_path_factory.mktemp("trained_mnist")
    return train(RunConfig().train, out, force=True).checkpoint


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


@pytest.fixture(scope="module")
def module_cli():
    """The module-scoped twin of ``cli``, for module fixtures (which cannot use capsys):
    output captured by redirecting ``sys.stdout``/``sys.stderr``."""
    import contextlib
    import io

    from pipeline.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as exc:
                code = int(exc.code or 0)
        return code, out.getvalue(), err.getvalue()
    return run
