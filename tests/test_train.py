"""Training on the bundled data: accuracy reached, checkpoint contents, DDP equivalence."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.checkpoint import build_model, load_checkpoint
from pipeline.stages.train import TrainConfig, train


def test_default_small_mobilenet_v2_reaches_97_percent_on_held_out_mnist(trained_mnist: Path):
    """The stated bar for the default run: >= 97% on the 1,000 held-out MNIST digits (98.1%
    measured; the model sees only 3,600 training images, 24 epochs, about 2.6 minutes)."""
    state, meta = load_checkpoint(trained_mnist)
    assert meta["test_acc"] >= 0.97, meta
    assert meta["model"] == "mobilenet_v2" and meta["in_chans"] == 1 and meta["num_classes"] == 10
    assert meta["labels"] == [str(i) for i in range(10)] and meta["data"] == "mnist"
    log = json.loads((trained_mnist.parent / "train_log.json").read_text())
    assert log["history"][-1]["train_loss"] < log["history"][0]["train_loss"]
    # the checkpoint rebuilds the same network from its metadata alone
    model, _ = build_model(None, trained_mnist)
    assert sum(p.numel() for p in model.parameters()) == sum(
        v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k)


def test_train_cli_writes_checkpoint_and_refuses_overwrite(cli, tmp_path):
    args = ("train", "mobilenet_v2", "--model-arg", "width_mult=0.35", "--data", "digits",
            "--input-size", "16", "--epochs", "1", "--out", str(tmp_path / "run"), "--json", "-q")
    code, out, err = cli(*args)
    assert code == 0, err
    summary = json.loads(out)
    assert Path(summary["checkpoint"]).is_file() and 0 <= summary["test_acc"] <= 1
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    code, _, err = cli(*args)
    assert code == 2 and "--force" in err
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_for_a_model_without_batchnorm(tmp_path):
    """Global batches are split across ranks and DDP averages gradients, so a LayerNorm-only
    model (``mixer``) ends with the same weights as one process; BN models differ only by
    per-process batch statistics (documented in pipeline/stages/train.py).

    SGD, not AdamW: the two runs' gradients differ only by summation order (two half-batch
    sums averaged vs one full-batch sum, ~1e-7 relative). AdamW divides each update by
    sqrt(v), which turns that rounding into a visible difference for weights whose gradient
    is near zero (4.4e-5 seen on one CPU); SGD keeps it at rounding level, so 1e-5 tests the
    data split and the gradient averaging, not the optimizer's sensitivity to float order."""
    common = ["--data", "mnist", "--train-samples", "512", "--epochs", "1", "--batch-size", "64",
              "--input-size", "32", "--seed", "3", "--threads", "1", "--optimizer", "sgd", "-q"]
    cfg = TrainConfig(model="mixer", data="mnist", train_samples=512, epochs=1, batch_size=64,
                      input_size=32, seed=3, threads=1, optimizer="sgd")
    single = train(cfg, tmp_path / "single")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "-m", "pipeline.cli", "train", "mixer", "--out", str(tmp_path / "ddp"), *common],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, meta_a = load_checkpoint(single.checkpoint)
    b, meta_b = load_checkpoint(tmp_path / "ddp" / "model.safetensors")
    assert meta_b["world_size"] == 2
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"DDP vs single-process worst weight difference: {worst:.2e}")
    assert worst < 1e-5, f"DDP weights differ from single-process by {worst}"
