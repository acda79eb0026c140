"""Checkpoint folders: rotation, staging leftovers and the training state they round-trip."""

from __future__ import annotations

import torch
from torch import nn

from mmptm.training.checkpoint import (
    checkpoints_dir,
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    resolve_checkpoint,
    save_checkpoint,
)


def names(paths: list) -> list[str]:
    return [p.name for p in paths]


def test_rotation_keeps_the_checkpoint_just_written_and_removes_only_older_ones(tmp_path):
    model = nn.Linear(2, 2)
    for step in (800, 1000, 1200):  # higher-numbered leftovers of another run in the folder
        save_checkpoint(tmp_path, step, model, "x: 1\n", None, keep=2)
    assert names(list_checkpoints(tmp_path)) == ["step_00001000", "step_00001200"]

    saved = [save_checkpoint(tmp_path, step, model, "x: 2\n", None, keep=2) for step in (200, 400, 600)]
    assert all(path.is_dir() for path in saved[1:])
    assert not saved[0].exists()  # older than the two newest of the steps up to 600
    assert names(list_checkpoints(tmp_path)) == ["step_00000400", "step_00000600", "step_00001000", "step_00001200"]
    assert latest_checkpoint(tmp_path) == resolve_checkpoint(tmp_path) == saved[-1]
    assert (saved[-1] / "config.yaml").read_text() == "x: 2\n"


def test_a_save_removes_staging_folders_left_by_an_interrupted_save(tmp_path):
    model = nn.Linear(2, 2)
    root = checkpoints_dir(tmp_path)
    leftovers = [root / ".tmp-step_00000010-k1ll3d", root / ".tmp-step_00000020-sharded"]
    for folder in leftovers:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half written")
    unrelated = root / "notes"
    unrelated.mkdir()
    save_checkpoint(tmp_path, 30, model, "x: 1\n", None)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "notes", "step_00000030"]


def test_the_grad_scaler_state_round_trips_through_the_training_state(tmp_path):
    """An enabled scaler (CPU loss scaling) after an overflow and some growth steps: every field survives."""
    model = nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    for step in range(4):
        optimizer.zero_grad()
        loss = model(torch.ones(2, 4)).sum() * (float("inf") if step == 1 else 1.0)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    saved = scaler.state_dict()
    assert saved["scale"] != 1024.0 and saved["_growth_tracker"] != 0  # the state moved away from the defaults

    checkpoint = save_checkpoint(tmp_path, 4, model, "x: 1\n", None, optimizer=optimizer, state={}, scaler=scaler)
    restored = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    load_training_state(checkpoint, scaler=restored)
    assert restored.state_dict() == saved

    # A checkpoint without a scaler (an fp32/bf16 run, or one saved before scalers were) leaves it as built.
    plain = save_checkpoint(tmp_path, 5, model, "x: 1\n", None, optimizer=optimizer, state={})
    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    load_training_state(plain, scaler=fresh)
    assert fresh.get_scale() == 1024.0
