"""End-to-end training runs on the demo data: losses fall, checkpoints load, runs resume, signals checkpoint."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mmptm
from mmptm.training.checkpoint import latest_checkpoint, list_checkpoints

TINY = [
    "model.embed_dim=32",
    "model.vision.width=32",
    "model.vision.layers=1",
    "model.vision.heads=2",
    "model.text.width=32",
    "model.text.layers=1",
    "model.text.heads=2",
    "data.train.batch_size=32",
    "data.train.num_workers=0",
    "train.log_every=1",
    "train.warmup_steps=2",
    "train.progress_bar=false",
    "eval.zeroshot.languages=[en,fr]",
    "eval.zeroshot.num_workers=0",
]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "mmptm.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        **kwargs,
    )


def test_tiny_run_learns_saves_and_loads(tmp_path, demo):
    run = tmp_path / "run"
    config = mmptm.load_config(
        "clip_tiny.yaml",
        [*TINY, "train.max_steps=120", "train.lr=2e-3", "data.train.caption_languages=[en]",
         "train.checkpoint_every=60", "train.eval_every=60"],
    )
    final = mmptm.train(config, output_dir=run)
    records = read_metrics(run)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(losses) == 120
    # ln(32) is the loss of a collapsed model that scores every caption alike.
    assert sum(losses[-10:]) / 10 < 0.85 * math.log(32), losses
    evals = [r for r in records if "eval/zeroshot_top1" in r]
    assert [r["step"] for r in evals] == [60, 120]
    assert {"eval/zeroshot_top1/en", "eval/zeroshot_top1/fr"} <= set(evals[-1])
    assert final["eval/zeroshot_top1"] == evals[-1]["eval/zeroshot_top1"]
    assert records[-2]["data/skipped_samples"] == 0
    assert [p.name for p in list_checkpoints(run)] == ["step_00000060", "step_00000120"]
    assert latest_checkpoint(run).name == "step_00000120"

    model, tokenizer, preprocess = mmptm.load_pretrained(run)
    from PIL import Image

    image = preprocess(Image.new("RGB", (40, 30), "white"))[None]
    image_features = model.encode_image(image, normalize=True)
    text_features = model.encode_text(tokenizer(["a handwritten seven."]), normalize=True)
    assert image_features.shape == text_features.shape == (1, 32)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(1))


def test_sigkill_then_resume_continues_from_checkpoint(tmp_path, demo):
    run = tmp_path / "run"
    args = [
        "train",
        "clip_tiny.yaml",
        *TINY,
        "train.checkpoint_every=3",
        "eval.zeroshot=null",
        "--output-dir",
        str(run),
    ]
    proc = run_cli([*args, "train.max_steps=100000"])
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(run):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    killed_at = latest_checkpoint(run)
    step = int(killed_at.name.split("_")[1])
    steps_before = [r["step"] for r in read_metrics(run)]

    resumed = run_cli([*args, f"train.max_steps={step + 2}", "--resume"])
    output, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, output
    assert f"resumed from {killed_at}" in output
    steps_after = [r["step"] for r in read_metrics(run)][len(steps_before) :]
    assert steps_after == [step + 1, step + 2]
    assert latest_checkpoint(run).name == f"step_{step + 2:08d}"


def test_sigterm_writes_checkpoint_and_exits_cleanly(tmp_path, demo):
    run = tmp_path / "run"
    proc = run_cli(
        [
            "train",
            "clip_tiny.yaml",
            *TINY,
            "train.max_steps=100000",
            "train.checkpoint_every=100000",
            "eval.zeroshot=null",
            "--output-dir",
            str(run),
        ]
    )
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "stopped by SIGTERM" in output
    checkpoint = latest_checkpoint(run)
    assert checkpoint is not None and int(checkpoint.name.split("_")[1]) >= 1
    assert (checkpoint / "training_state" / "optimizer.pt").is_file()


def test_custom_encoder_example_trains(tmp_path):
    root = Path(__file__).resolve().parent.parent
    run = tmp_path / "run"
    proc = run_cli(
        [
            "train",
            str(root / "examples" / "custom_encoder.yaml"),
            "--import",
            str(root / "examples" / "custom_encoder.py"),
            "train.max_steps=60",
            "train.progress_bar=false",
            "--output-dir",
            str(run),
        ]
    )
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    losses = [r["train/loss"] for r in read_metrics(run) if "train/loss" in r]
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < 0.7 * first, losses
    model, _, _ = mmptm.load_pretrained(run)
    assert type(model.visual).__name__ == "PulseSignalEncoder"


def test_fp16_on_cpu_is_rejected_with_advice(demo):
    config = mmptm.load_config("clip_tiny.yaml", [*TINY, "train.precision=fp16", "train.cpu=true"])
    with pytest.raises(ValueError, match="bf16"):
        mmptm.train(config, output_dir=None)
