"""The trainer in several processes (torchrun, gloo on the CPU) against one process on the same global batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).resolve().parent / "fixed_batches.py"
TINY = [
    "model.embed_dim=32", "model.vision.width=32", "model.vision.layers=1", "model.vision.heads=2",
    "model.text.width=32", "model.text.layers=1", "model.text.heads=2",
    "data.train={name: fixed_global_batches, global_batch: 16}",
    "train.log_every=1", "train.warmup_steps=0", "train.lr=1e-3", "train.progress_bar=false",
    "train.tensorboard=false", "eval.zeroshot=null",
]


def train(run: Path, nproc: int, overrides: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "mmptm.cli"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
        str(29500 + os.getpid() % 1000), "-m", "mmptm.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [*launcher, "train", "clip_tiny.yaml", *TINY, *overrides, "--import", str(FIXTURES), "--output-dir", str(run)],
        capture_output=True, text=True, timeout=timeout, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


def weights_at(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / f"checkpoints/step_{step:08d}/model.safetensors")


@pytest.mark.parametrize("objective", ["contrastive", "siglip"])
def test_two_processes_train_like_one_on_the_same_global_batch(tmp_path, demo, objective):
    overrides = ["train.max_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=3"]
    if objective == "siglip":
        overrides += ["objectives=[{name: siglip}]", "model.init_logit_bias=-10", "model.init_logit_scale=2.302585"]
    train(tmp_path / "one", 1, overrides)
    train(tmp_path / "two", 2, overrides)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 3  # the main process logs once per step, with the loss reduced over ranks
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), atol=1e-5, rtol=0)
    for step in (1, 3):
        one, two = (weights_at(tmp_path / run, step) for run in ("one", "two"))
        for key, value in one.items():
            torch.testing.assert_close(two[key], value, atol=1e-5, rtol=0, msg=key)
    # ... and the weights did move between those steps.
    first, last = weights_at(tmp_path / "one", 1), weights_at(tmp_path / "one", 3)
    assert (first["visual.proj"] - last["visual.proj"]).abs().max() > 1e-4
