"""End-to-end training runs on the demo data: losses fall, checkpoints load, runs resume, signals checkpoint."""

from __future__ import annotations

import io
import json
import math
import os
import re
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


def test_sigkill_then_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, demo):
    """Resumed, a run replays the interrupted epoch's data position: its losses equal an uninterrupted run's."""
    args = [
        "train",
        "clip_tiny.yaml",
        *TINY,
        "data.train.num_workers=1",  # augmentation in a worker process: its randomness must replay too
        "train.max_steps=60",
        "train.checkpoint_every=3",
        "eval.zeroshot=null",
    ]
    mmptm.train(mmptm.load_config("clip_tiny.yaml", args[2:]), output_dir=tmp_path / "uninterrupted")
    reference = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path / "uninterrupted") if "train/loss" in r}

    run = tmp_path / "run"
    proc = run_cli([*args, "--output-dir", str(run)])
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(run):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    killed_at = latest_checkpoint(run)
    step = int(killed_at.name.split("_")[1])
    assert step < 60, "the run ended before it was killed"
    steps_before = len(read_metrics(run))

    resumed = run_cli([*args, "--output-dir", str(run), "--resume"])
    output, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, output
    assert f"resumed from {killed_at}" in output
    after = {r["step"]: r["train/loss"] for r in read_metrics(run)[steps_before:] if "train/loss" in r}
    assert sorted(after) == list(range(step + 1, 61))
    for s, loss in after.items():
        assert loss == pytest.approx(reference[s], abs=1e-4), (s, loss, reference[s])
    assert latest_checkpoint(run).name == "step_00000060"


@pytest.mark.parametrize("whole_group", [False, True], ids=["trainer", "process-group"])
def test_sigterm_writes_checkpoint_and_exits_cleanly(tmp_path, demo, whole_group):
    """SIGTERM to the trainer, or (as schedulers do) to its whole process group, DataLoader workers included.

    The group variant evaluates after every step with worker processes, so the
    signal also tends to land during evaluation, which must then be abandoned.
    """
    run = tmp_path / "run"
    variant = (
        ["data.train.num_workers=2", "eval.zeroshot.num_workers=2", "eval.zeroshot.batch_size=16",
         "train.eval_every=1"]
        if whole_group
        else ["eval.zeroshot=null"]
    )
    proc = run_cli(
        [
            "train",
            "clip_tiny.yaml",
            *TINY,
            *variant,
            "train.max_steps=100000",
            "train.checkpoint_every=100000",
            "--output-dir",
            str(run),
        ],
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    if whole_group:
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "stopped by SIGTERM" in output
    checkpoint = latest_checkpoint(run)
    assert checkpoint is not None and int(checkpoint.name.split("_")[1]) >= 1
    assert (checkpoint / "training_state" / "optimizer.pt").is_file()


def write_shard_with_two_bad_samples(path: Path) -> None:
    """30 good captioned PNGs, one corrupt PNG and one image with no caption."""
    from PIL import Image

    from mmptm.data_pipelines.shards import open_tar_writer

    def png(i: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (12, 12), (i * 8, 255 - i * 8, 0)).save(buffer, format="png")
        return buffer.getvalue()

    samples = [{"png": png(i), "txt": f"a handwritten {i % 10}".encode()} for i in range(30)]
    samples.insert(7, {"png": b"\x89PNG\r\n\x1a\n this is not an image", "txt": b"a handwritten zero"})
    samples.insert(19, {"png": png(99)})
    with open(path, "wb") as stream, open_tar_writer(stream) as tar:
        for i, sample in enumerate(samples):
            tar.write({"__key__": f"{i:06d}", **sample})


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_counted_once_across_epochs_and_resumes(tmp_path, demo, num_workers):
    (tmp_path / "shards").mkdir()
    write_shard_with_two_bad_samples(tmp_path / "shards" / "00000.tar")
    run = tmp_path / "run"
    overrides = [
        *TINY,
        f"data.train.shards={tmp_path / 'shards'}",
        "data.train.resample=false",
        "data.train.epoch_samples=null",
        "data.train.batch_size=8",
        f"data.train.num_workers={num_workers}",
        "train.checkpoint_every=6",
        "eval.zeroshot=null",
    ]
    # 30 good samples make 3 batches of 8 per epoch (drop_last): 9 steps read the shard 3 times.
    mmptm.train(mmptm.load_config("clip_tiny.yaml", [*overrides, "train.max_steps=9"]), output_dir=run)
    records = [r for r in read_metrics(run) if "data/skipped_samples" in r]
    assert [r["data/skipped_samples"] for r in records][-1] == 2
    state = json.loads((latest_checkpoint(run) / "training_state" / "state.json").read_text())
    assert state["data"]["train"]["skipped"] == 2
    assert len(state["data"]["train"]["skipped_ids"]) == 2
    assert {i.rsplit("#", 1)[1] for i in state["data"]["train"]["skipped_ids"]} == {"000007", "000019"}

    # Resumed, the same bad samples are not counted again.
    mmptm.train(mmptm.load_config("clip_tiny.yaml", [*overrides, "train.max_steps=15"]), output_dir=run,
                resume=True)
    records = [r for r in read_metrics(run) if "data/skipped_samples" in r]
    assert records[-1]["step"] == 15 and records[-1]["data/skipped_samples"] == 2


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
    assert last < 0.75 * first, losses  # ln(64) = 4.16 is chance: the encoder learns
    model, _, _ = mmptm.load_pretrained(run)
    assert type(model.visual).__name__ == "PulseSignalEncoder"


def test_fp16_on_cpu_is_rejected_with_advice(demo):
    config = mmptm.load_config("clip_tiny.yaml", [*TINY, "train.precision=fp16", "train.cpu=true"])
    with pytest.raises(ValueError, match="bf16"):
        mmptm.train(config, output_dir=None)


def test_a_stop_signal_during_evaluation_abandons_it(tmp_path, demo):
    from mmptm.training.trainer import Trainer

    trainer = Trainer(mmptm.load_config("clip_tiny.yaml", TINY), output_dir=tmp_path)
    trainer._open_logs()
    assert "eval/zeroshot_top1/fr" in trainer.evaluate()
    trainer.stopped_by = "SIGTERM"
    assert trainer.evaluate() == {}
    trainer._close_logs()
    assert sum("eval/zeroshot_top1" in r for r in read_metrics(tmp_path)) == 1


def test_registered_evaluators_run_in_eval_tasks(tmp_path, demo):
    from mmptm.evaluation import EvalContext
    from mmptm.registry import EVALUATORS

    seen = {}

    @mmptm.register_evaluator("caption_norm_for_test")
    def caption_norm(model, context: EvalContext, text: str = "a handwritten seven.") -> dict[str, float]:
        seen["training"], seen["step"] = model.training, context.step
        with torch.no_grad():
            return {"text_norm": model.encode_text(context.tokenizer([text]).to(context.device)).norm().item()}

    try:
        # The same evaluator twice, with different options: the second under its prefix.
        overrides = [*TINY, "train.max_steps=2", "eval.zeroshot=null",
                     "eval.tasks=[{name: caption_norm_for_test, text: un sept.}, "
                     "{name: caption_norm_for_test, text: a handwritten one., prefix: one}]"]
        final = mmptm.train(mmptm.load_config("clip_tiny.yaml", overrides), output_dir=tmp_path)
        assert final["eval/text_norm"] > 0 and seen == {"training": False, "step": 2}
        assert final["eval/one/text_norm"] > 0 and final["eval/one/text_norm"] != final["eval/text_norm"]
        assert read_metrics(tmp_path)[-1]["eval/text_norm"] == final["eval/text_norm"]
        with pytest.raises(mmptm.ConfigError, match=r"eval.tasks.0.*did you mean 'text'"):
            mmptm.load_config("clip_tiny.yaml", ["eval.tasks=[{name: caption_norm_for_test, txt: x}]"])
        with pytest.raises(mmptm.ConfigError, match=r"'eval.tasks.1' and 'eval.tasks.0' are both "
                                                     r"'caption_norm_for_test' tasks.*distinct 'prefix'"):
            mmptm.load_config("clip_tiny.yaml", ["eval.tasks=[{name: caption_norm_for_test}, "
                                                 "{name: caption_norm_for_test, text: x}]"])
        with pytest.raises(mmptm.ConfigError, match=r"'eval.tasks.0.prefix' must be a name"):
            mmptm.load_config("clip_tiny.yaml", ["eval.tasks=[{name: caption_norm_for_test, prefix: a/b}]"])
        # Two evaluators that return the same metric name: refused when they first run, not overwritten.
        mmptm.register_evaluator("caption_norm_twin_for_test")(caption_norm)
        from mmptm.training.trainer import Trainer

        overrides = [*TINY, "eval.zeroshot=null",
                     "eval.tasks=[{name: caption_norm_for_test}, {name: caption_norm_twin_for_test}]"]
        trainer = Trainer(mmptm.load_config("clip_tiny.yaml", overrides), output_dir=tmp_path / "twin")
        with pytest.raises(ValueError, match=r"eval.tasks.1 \('caption_norm_twin_for_test'\) logs 'eval/text_norm'"):
            trainer._evaluate_tasks()
        # A task that logs a name of the zero-shot evaluation: refused too.
        mmptm.register_evaluator("num_images_for_test")(lambda model, context: {"num_images": 1.0})
        overrides = [*TINY, "eval.tasks=[{name: num_images_for_test}]"]
        trainer = Trainer(mmptm.load_config("clip_tiny.yaml", overrides), output_dir=tmp_path / "builtin")
        with pytest.raises(ValueError, match=r"eval.tasks.0 .* logs 'eval/num_images', as eval.zeroshot or eval"):
            trainer.evaluate()
    finally:
        EVALUATORS._entries.pop("caption_norm_for_test", None)
        EVALUATORS._entries.pop("caption_norm_twin_for_test", None)
        EVALUATORS._entries.pop("num_images_for_test", None)


def test_uint8_image_batches_train_exactly_as_float_ones(tmp_path, demo):
    overrides = [*TINY, "train.max_steps=3", "train.log_every=1", "eval.zeroshot=null", "data.train.num_workers=0"]
    losses = {}
    for uint8 in (False, True):
        config = mmptm.load_config("clip_tiny.yaml", [*overrides, f"data.train.uint8_images={str(uint8).lower()}"])
        mmptm.train(config, output_dir=tmp_path / str(uint8))
        losses[uint8] = [r["train/loss"] for r in read_metrics(tmp_path / str(uint8)) if "train/loss" in r]
    assert len(losses[True]) == 3 and losses[True] == losses[False]  # normalised on the model's side, bit for bit


def test_cpu_offload_without_gpus_is_rejected_with_the_reason(demo):
    config = mmptm.load_config("clip_tiny.yaml", [*TINY, "distributed.strategy=fsdp", "distributed.cpu_offload=true"])
    with pytest.raises(mmptm.ConfigError, match="needs distributed.strategy=fsdp and GPUs"):
        mmptm.train(config, output_dir=None)


def test_logged_lr_is_the_one_each_step_trained_with(tmp_path, demo):
    """Warmup over 2 steps, then cosine decay: step s (1-based) trains with lr * lr_lambda(s - 1)."""
    from mmptm.training.optim import lr_lambda

    overrides = [*TINY, "train.lr=1e-3", "train.min_lr=1e-5", "train.max_steps=3", "eval.zeroshot=null"]
    mmptm.train(mmptm.load_config("clip_tiny.yaml", overrides), output_dir=tmp_path)
    logged = {r["step"]: r["train/lr"] for r in read_metrics(tmp_path) if "train/lr" in r}
    expected = {step: 1e-3 * lr_lambda(step - 1, warmup_steps=2, max_steps=3, schedule="cosine", min_lr_ratio=1e-2)
                for step in (1, 2, 3)}
    assert logged == pytest.approx(expected, rel=1e-9)
    assert logged[1] == pytest.approx(5e-4) and logged[3] == pytest.approx(1e-3)  # half warm; decay starts after


def test_a_fresh_run_refuses_a_folder_that_holds_checkpoints(tmp_path, demo):
    """Without --resume, another run's checkpoints would mix with the new run's (and rotation would mix them up)."""
    overrides = [*TINY, "train.max_steps=1", "eval.zeroshot=null"]
    mmptm.train(mmptm.load_config("clip_tiny.yaml", overrides), output_dir=tmp_path)
    before = (tmp_path / "checkpoints" / "step_00000001" / "model.safetensors").read_bytes()
    with pytest.raises(mmptm.ConfigError, match=rf"{re.escape(str(tmp_path))}.* already holds checkpoints.*--resume"):
        mmptm.train(mmptm.load_config("clip_tiny.yaml", [*overrides, "train.lr=2e-3"]), output_dir=tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    assert (tmp_path / "checkpoints" / "step_00000001" / "model.safetensors").read_bytes() == before


def test_the_fp16_loss_scaler_is_checkpointed_and_restored(tmp_path, demo):
    """accelerate's GradScaler (fp16 runs, CUDA) goes into the training state; a CPU run gets one by hand here."""
    from mmptm.training.trainer import Trainer

    config = mmptm.load_config("clip_tiny.yaml", [*TINY, "eval.zeroshot=null"])
    trainer = Trainer(config, output_dir=tmp_path)
    assert trainer.accelerator.scaler is None  # fp32: nothing to save
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    scaled = {"scale": 2.0**9, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3, "_growth_tracker": 2}
    trainer.accelerator.scaler.load_state_dict(scaled)
    checkpoint = trainer.save()
    assert (checkpoint / "training_state" / "scaler.pt").is_file()

    resumed = Trainer(config, output_dir=tmp_path, resume=True)
    resumed.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=3)
    resumed._restore()
    assert resumed.accelerator.scaler.state_dict() == scaled


# A user script that keeps its Trainer in a module-level variable until Python exits.
TRAINER_KEPT = """
import multiprocessing, sys
import mmptm
from mmptm.training.trainer import Trainer

trainer = Trainer(mmptm.load_config("clip_tiny.yaml", sys.argv[2:]), output_dir=sys.argv[1])
trainer.fit()
print("workers after fit:", len(multiprocessing.active_children()))
"""


def test_a_script_keeping_its_trainer_exits_after_fit(tmp_path, demo):
    """fit() shuts its DataLoader workers down: they ignore SIGTERM, with which Python's exit stops them."""
    overrides = [*TINY, "data.train.num_workers=1", "train.max_steps=2", "eval.zeroshot=null"]
    try:
        # The timeout detects a hang (the script takes seconds); it is no speed target.
        done = subprocess.run(
            [sys.executable, "-c", TRAINER_KEPT, str(tmp_path), *overrides], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired as hang:
        pytest.fail(f"the script did not exit after fit(): {hang.stdout!r} {hang.stderr!r}")
    assert done.returncode == 0, done.stderr
    assert "workers after fit: 0" in done.stdout


def test_a_closed_data_stream_continues_where_it_stopped():
    from mmptm.training.trainer import DataStream

    class Epochs:
        """Epoch e yields the batches (e, 0), (e, 1), (e, 2)."""

        epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            return iter([{"batch": (self.epoch, i)} for i in range(3)])

    uninterrupted = DataStream("s", Epochs())
    expected = [uninterrupted.next_batch()["batch"] for _ in range(8)]
    stream, drawn = DataStream("s", Epochs()), []
    for count in (2, 1, 4, 1):  # closed mid-epoch, at an epoch's end, and again
        drawn += [stream.next_batch()["batch"] for _ in range(count)]
        stream.close()
    assert drawn == expected
