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

from mmptm.training.checkpoint import latest_checkpoint

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


@pytest.mark.parametrize(
    ("strategy", "objective"),
    [("ddp", "contrastive"), ("ddp", "siglip"), ("ddp", "chunked contrastive"), ("ddp", "grad-cached contrastive"),
     ("fsdp", "contrastive")],
)
def test_two_processes_train_like_one_on_the_same_global_batch(tmp_path, demo, strategy, objective):
    overrides = ["train.max_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=3",
                 f"distributed.strategy={strategy}"]
    if objective == "chunked contrastive":
        overrides += ["objectives=[{name: contrastive, chunk_size: 5}]"]
    if objective == "grad-cached contrastive":  # sub-batches of 3 of each rank's 8 pairs, loss over the gathered 16
        overrides += ["objectives=[{name: contrastive, grad_cache_chunk: 3, chunk_size: 5}]"]
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


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sigterm_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path, demo, strategy):
    """Both processes of a 2-rank run get SIGTERM (as from a scheduler) at slightly different moments."""
    import signal
    import time

    run = tmp_path / "run"
    port = str(29500 + (os.getpid() + 7) % 1000)
    procs = []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "mmptm.cli", "train", "clip_tiny.yaml", *TINY, "train.max_steps=100000",
             "train.checkpoint_every=100000", f"distributed.strategy={strategy}", "--import", str(FIXTURES),
             "--output-dir", str(run)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        ))
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 3:
            assert all(p.poll() is None for p in procs), procs[0].stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
        time.sleep(0.3)
        procs[0].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "stopped by " in outputs[0] and "continue with --resume" in outputs[0]
    checkpoint = latest_checkpoint(run)
    step = int(checkpoint.name.split("_")[1])
    assert (checkpoint / "training_state" / "state.json").is_file()
    if strategy == "fsdp":  # both ranks wrote their shards
        assert len(list((checkpoint / "training_state" / "distributed").glob("*.distcp"))) == 2
    assert json.loads((checkpoint / "training_state" / "state.json").read_text())["step"] == step
    # The last logged step is the checkpoint's: both ranks stopped together.
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1] == step


def _read_epoch_in_rank(rank: int, world_size: int, init_file: str, shards: str, out_dir: str) -> None:
    import torch.distributed as dist

    from mmptm.data_pipelines.context import DataContext
    from mmptm.data_pipelines.image_text import image_text

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        context = DataContext(image_size=16, training=True, rank=dist.get_rank(), world_size=dist.get_world_size())
        keys = []
        for batch in image_text(context, shards, batch_size=3, num_workers=2, drop_last=False):
            keys += batch.get("key", [])
        everyone: list[list[str] | None] = [None] * world_size
        dist.all_gather_object(everyone, keys)
        if rank == 0:
            (Path(out_dir) / "keys.json").write_text(json.dumps(everyone))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("num_shards", [6, 1], ids=["shards split", "samples split"])
def test_a_sharded_epoch_reaches_every_sample_once_across_ranks_and_workers(tmp_path, num_shards):
    import io

    import torch.multiprocessing as mp
    from PIL import Image

    from mmptm.data_pipelines.shards import open_tar_writer

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "white").save(buffer, format="png")
    (tmp_path / "shards").mkdir()
    all_keys = []
    for shard in range(num_shards):
        with open(tmp_path / "shards" / f"{shard:05d}.tar", "wb") as stream, open_tar_writer(stream) as tar:
            for i in range(30 // num_shards):
                all_keys.append(f"{shard}-{i:03d}")
                tar.write({"__key__": all_keys[-1], "png": buffer.getvalue(), "txt": b"a white square"})
    mp.spawn(_read_epoch_in_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "shards"), str(tmp_path)),
             nprocs=2, join=True)
    per_rank = json.loads((tmp_path / "keys.json").read_text())
    assert all(per_rank)  # both ranks read
    assert sorted(per_rank[0] + per_rank[1]) == sorted(all_keys)  # each sample exactly once


def test_an_fsdp_checkpoint_resumes_on_one_or_two_processes(tmp_path, demo):
    import shutil

    overrides = ["train.max_steps=6", "train.checkpoint_every=3", "distributed.strategy=fsdp"]
    train(tmp_path / "full", 2, overrides)
    reference = losses(tmp_path / "full")
    assert len(reference) == 6
    saved = tmp_path / "full" / "checkpoints" / "step_00000003"
    assert (saved / "training_state" / "distributed" / ".metadata").is_file()  # per-rank shards, not gathered
    assert not (saved / "training_state" / "optimizer.pt").exists()
    assert not list((tmp_path / "full" / "checkpoints").glob(".tmp*"))
    for nproc in (1, 2):
        run = tmp_path / f"resumed_on_{nproc}"
        shutil.copytree(tmp_path / "full", run)
        shutil.rmtree(run / "checkpoints" / "step_00000006")
        (run / "checkpoints" / "latest").write_text("step_00000003")
        (run / "metrics.jsonl").write_text("")
        train(run, nproc, [*overrides, "--resume"])
        torch.testing.assert_close(torch.tensor(losses(run)), torch.tensor(reference[3:]), atol=1e-5, rtol=0)
    # The checkpoint is a plain one: it loads for inference like any other.
    import mmptm

    model, tokenizer, _ = mmptm.load_pretrained(tmp_path / "full")
    assert model.encode_text(tokenizer(["a handwritten two."])).shape == (1, 32)


def test_each_rank_resumes_its_own_data_position_when_ranks_read_uneven_shards(tmp_path, demo):
    """Without resample, each epoch deals a 6-sample shard (2 batches of 3) to one rank and a 9-sample one (3) to the
    other: at the step-5 checkpoint the ranks stand at different places, and each must continue from its own (rank
    0's position replayed on rank 1 continues with another batch, so the losses after the resume would differ)."""
    import io
    import shutil

    from PIL import Image

    from mmptm.data_pipelines.shards import open_tar_writer

    (tmp_path / "shards").mkdir()
    for shard, size in enumerate((6, 9)):
        with open(tmp_path / "shards" / f"{shard:05d}.tar", "wb") as stream, open_tar_writer(stream) as tar:
            for i in range(size):
                buffer = io.BytesIO()
                Image.new("RGB", (8, 8), (shard * 120, i * 16, 255 - i * 16)).save(buffer, format="png")
                caption = f"a handwritten {i % 10}".encode()
                tar.write({"__key__": f"{shard}-{i:03d}", "png": buffer.getvalue(), "txt": caption})
    overrides = [f"data.train={{name: image_text, shards: '{tmp_path / 'shards'}', batch_size: 3, num_workers: 0, "
                 "shuffle_buffer: 4, resample: false}", "train.max_steps=7", "train.checkpoint_every=5"]
    train(tmp_path / "full", 2, overrides)
    reference = losses(tmp_path / "full")
    state = json.loads((tmp_path / "full/checkpoints/step_00000005/training_state/state.json").read_text())
    positions = sorted((p["train"]["epoch"], p["train"]["batches_in_epoch"]) for p in state["data_per_rank"])
    assert positions == [(1, 2), (1, 3)]  # 5 batches each: 3 + 2 and 2 + 3 (shards are shuffled per epoch)

    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", run)
    shutil.rmtree(run / "checkpoints" / "step_00000007")
    (run / "checkpoints" / "latest").write_text("step_00000005")
    (run / "metrics.jsonl").write_text("")
    train(run, 2, [*overrides, "--resume"])
    torch.testing.assert_close(torch.tensor(losses(run)), torch.tensor(reference[5:]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("saved_by", "world", "rank", "expected", "warns"),
    [(2, 2, 1, (0, 3), False), (2, 2, 0, (1, 1), False), (2, 3, 1, (1, 1), True), (None, 2, 1, (1, 1), True),
     (None, 1, 0, (1, 1), False)],
    ids=["same count rank 1", "same count rank 0", "other count", "older checkpoint", "older, one process"],
)
def test_resumed_data_positions_by_process_count(caplog, saved_by, world, rank, expected, warns):
    """Own position on the checkpoint's process count; rank 0's (with a warning) on another or without per-rank ones."""
    from types import SimpleNamespace

    from mmptm.training.trainer import Trainer

    shared = {"train": {"epoch": 1, "batches_in_epoch": 1, "skipped_ids": ["a#1"], "skipped_uncounted": 0}}
    state = {"data": shared}
    if saved_by is not None:
        state["data_per_rank"] = [{"train": {"epoch": 1, "batches_in_epoch": 1}},
                                  {"train": {"epoch": 0, "batches_in_epoch": 3}}][:saved_by]
    trainer = SimpleNamespace(accelerator=SimpleNamespace(num_processes=world, process_index=rank), is_main=True)
    with caplog.at_level("WARNING", logger="mmptm.train"):
        position = Trainer._rank_data_positions(trainer, state, Path("step_00000003"))["train"]
    assert (position["epoch"], position["batches_in_epoch"]) == expected
    assert position["skipped_ids"] == ["a#1"]  # shared by every rank
    assert ("continues its data streams from rank 0's" in caplog.text) == warns


@pytest.mark.parametrize("config", ["visualbert_tiny.yaml", "vilbert_tiny.yaml"])
def test_fusion_models_train_with_ddp_and_keep_the_ranks_weights_equal(tmp_path, demo, config):
    # ITM, MLM and MRM run several forward passes per step, some through the unwrapped model (the tower,
    # the region heads); every parameter still gets its gradient averaged over the ranks.
    probe = Path(__file__).resolve().parent / "rank_weights_probe.py"
    objectives = ("objectives=[{name: itm, hard_candidates: 4}, {name: vl_mlm, mask_prob: 0.4}, "
                  f"{{name: mrm, weight: 0.1}}, {{name: rank_weights_probe, folder: '{tmp_path}'}}]")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(29500 + (os.getpid() + 13) % 1000), "-m", "mmptm.cli", "train", config, objectives,
         "data.train={name: fixed_global_batches, global_batch: 8}", "train.max_steps=3", "train.log_every=1",
         "train.warmup_steps=0", "train.progress_bar=false", "train.tensorboard=false", "eval.tasks=[]",
         "distributed.strategy=ddp", "--import", str(FIXTURES), "--import", str(probe),
         "--output-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(losses(tmp_path / "run")) == 3
    first, last = (torch.load(tmp_path / f"rank0_call{n}.pt") for n in (1, 3))
    other = torch.load(tmp_path / "rank1_call3.pt")
    for key, value in last.items():
        torch.testing.assert_close(other[key], value, atol=0, rtol=0, msg=key)
    moved = [key for key in last if last[key].is_floating_point() and not torch.equal(first[key], last[key])]
    assert any(k.startswith("visual.") for k in moved) and any(k.startswith("region_") for k in moved)
    assert any("layers" in k for k in moved) and "itm_head.weight" in moved
