"""Region-feature shards (npy N×D + boxes.npy N×4 + txt): the dataset, skip counting, training both fusion models."""

from __future__ import annotations

import io
import json
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

import mmptm
from mmptm.data_pipelines.context import DataContext, model_data_context
from mmptm.data_pipelines.region_features import region_features

DIM, CLASSES = 12, 5
WORDS = ["zero", "one"]


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_region_shards(folder: Path, samples: int = 24, bad: int = 1, seed: int = 0) -> Path:
    """Random features and boxes (pixels, with the image size in the json), a caption and label per sample."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(folder / "regions-000000.tar")) as sink:
        for i in range(samples):
            regions = int(rng.integers(2, 7))
            corners = rng.uniform(0, 50, (regions, 2))
            boxes = np.concatenate([corners, corners + rng.uniform(1, 50, (regions, 2))], axis=1)
            label = i % 2
            sample = {
                "__key__": f"{i:05d}",
                "npy": npy(rng.normal(label, 1.0, (regions, DIM)).astype(np.float32)),
                "boxes.npy": npy(boxes.astype(np.float32)),
                "cls_prob.npy": npy(rng.dirichlet(np.ones(CLASSES), regions).astype(np.float32)),
                "json": json.dumps({"width": 100, "height": 100}).encode(),
                "txt": f"a picture of {WORDS[label]}.".encode(),
                "cls": str(label).encode(),
            }
            if i < bad:
                del sample["boxes.npy"]
            sink.write(sample)
    return folder


def test_region_batches_pad_normalise_and_count_bad_samples(tmp_path):
    shards = write_region_shards(tmp_path / "shards", samples=10, bad=2)
    stream = region_features(DataContext(training=False), str(shards), batch_size=4, num_workers=0,
                             class_key="cls_prob.npy", label_key="cls")
    batches = list(stream)
    good = [b for b in batches if not b.get("empty")]
    assert sum(len(b["caption"]) for b in good) == 8
    assert sum(b["skipped"] for b in batches) == 2
    batch = good[0]
    n = batch["regions"].shape[1]
    assert batch["boxes"].shape == (4, n, 4) and batch["region_classes"].shape == (4, n, CLASSES)
    assert batch["region_mask"].sum(dim=1).max() == n and 0 <= batch["boxes"].min() and batch["boxes"].max() <= 1
    assert not batch["regions"][~batch["region_mask"]].any()


def test_shards_without_the_configured_features_fail_naming_key_and_field(tmp_path):
    shards = write_region_shards(tmp_path / "shards", samples=4, bad=0)
    with pytest.raises(ValueError, match=r"has a 'feats.npy' file.*data.<stream>.feature_key: feats.npy"):
        region_features(DataContext(), str(shards), feature_key="feats.npy")



def corrupt(sample: dict, defect: str, rng: np.random.Generator) -> None:
    """Replace one array of a ``write_region_shards``-style sample by a defective one."""
    features = np.load(io.BytesIO(sample["npy"]))
    if defect == "nan features":
        features[0, 1] = np.nan
        sample["npy"] = npy(features)
    elif defect == "inf boxes":
        boxes = np.load(io.BytesIO(sample["boxes.npy"]))
        boxes[-1, 2] = np.inf
        sample["boxes.npy"] = npy(boxes)
    elif defect == "nan classes":
        classes = np.load(io.BytesIO(sample["cls_prob.npy"]))
        classes[0, 0] = np.nan
        sample["cls_prob.npy"] = npy(classes)
    elif defect == "other feature size":
        sample["npy"] = npy(rng.normal(size=(len(features), DIM + 4)).astype(np.float32))
    elif defect == "other class count":
        sample["cls_prob.npy"] = npy(rng.dirichlet(np.ones(CLASSES + 2), len(features)).astype(np.float32))


DEFECTS = {  # defect -> what the skip reason names
    "nan features": r"'npy' holds NaN or infinite",
    "inf boxes": r"'boxes.npy' holds NaN or infinite",
    "nan classes": r"'cls_prob.npy' holds NaN or infinite",
    "other feature size": rf"'npy' has {DIM + 4} features per region, the model reads {DIM}",
    "other class count": rf"'cls_prob.npy' has {CLASSES + 2} classes per region, the model has {CLASSES}",
}


def write_defective_shards(folder: Path, good: int) -> tuple[Path, list[dict]]:
    """``good`` sound samples, then one sample of each defect in ``DEFECTS``; the shard and its raw samples."""
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    raws = []
    for i in range(good + len(DEFECTS)):
        regions = 3 + i % 3
        raw = {
            "__key__": f"{i:05d}",
            "npy": npy(rng.normal(size=(regions, DIM)).astype(np.float32)),
            "boxes.npy": npy(np.tile(np.array([[0.1, 0.2, 0.6, 0.7]], np.float32), (regions, 1))),
            "cls_prob.npy": npy(rng.dirichlet(np.ones(CLASSES), regions).astype(np.float32)),
            "txt": b"a caption",
        }
        if i >= good:
            corrupt(raw, list(DEFECTS)[i - good], rng)
        raws.append(raw)
    with wds.TarWriter(str(folder / "regions-000000.tar")) as sink:
        for raw in raws:
            sink.write(raw)
    return folder, raws


def test_non_finite_or_mismatched_region_samples_are_skipped_and_counted(tmp_path, caplog):
    good = 6
    shards, raws = write_defective_shards(tmp_path / "shards", good)
    context = DataContext(training=False, region_dim=DIM, region_classes=CLASSES)
    batches = list(region_features(context, str(shards), batch_size=good, num_workers=0, class_key="cls_prob.npy"))
    real = [b for b in batches if not b.get("empty")]
    assert sum(b["skipped"] for b in batches) == len(DEFECTS)
    assert sorted(k.rsplit("#", 1)[-1] for b in batches for k in b["skipped_keys"]) == [
        f"{i:05d}" for i in range(good, good + len(DEFECTS))
    ]
    assert len(real) == 1 and real[0]["regions"].shape[::2] == (good, DIM)
    assert real[0]["region_classes"].shape[-1] == CLASSES and real[0]["regions"].isfinite().all()
    # Each skip is logged with the sample's key and which file is wrong, and how.
    for i, reason in enumerate(DEFECTS.values(), start=good):
        assert re.search(rf"skipped sample '{i:05d}' of .*: {reason}", caplog.text), reason

def test_model_data_context_carries_the_region_size_of_a_region_reading_model():
    tokenizer = types.SimpleNamespace(vocab_size=30, pad_id=0, eos_id=3, bos_id=2, mask_id=4)
    base = {"name": "visualbert", "width": 16, "layers": 1, "heads": 2, "visual_dim": DIM, "region_classes": CLASSES}
    regions = mmptm.create_model({**base, "vision": None}, tokenizer=tokenizer)
    context = model_data_context(regions, training=True)
    assert (context.region_dim, context.region_classes, context.training) == (DIM, CLASSES, True)
    tower = {"name": "vit", "image_size": 16, "patch_size": 8, "width": 16, "layers": 1, "heads": 2}
    pixels = mmptm.create_model({**base, "vision": tower}, tokenizer=tokenizer)
    context = model_data_context(pixels)
    assert (context.region_dim, context.region_classes, context.image_size) == (None, None, 16)

@pytest.mark.parametrize("model", ["visualbert", "vilbert"])
def test_region_shards_train_both_models(tmp_path, demo, model):
    shards = write_region_shards(tmp_path / "shards")
    classnames, templates = tmp_path / "classnames.json", tmp_path / "templates.json"
    classnames.write_text(json.dumps({"en": WORDS}))
    templates.write_text(json.dumps({"en": ["a picture of {}."]}))
    widths = (
        {"width": 16, "layers": 1, "heads": 2}
        if model == "visualbert"
        else {"text_width": 16, "text_layers": 1, "text_heads": 2, "visual_width": 8, "visual_layers": 1,
              "visual_heads": 2, "coattention_width": 8, "coattention_heads": 2, "text_coattention_ids": [1],
              "visual_coattention_ids": [0]}
    )
    config = mmptm.load_config({
        "model": {"name": model, "vision": None, "visual_dim": DIM, "region_classes": CLASSES,
                  "max_text_length": 16, **widths},
        "tokenizer": {"context_length": 16},
        "objectives": [{"name": "itm", "hard_candidates": 2}, {"name": "vl_mlm"}, {"name": "mrm"}],
        "data": {"train": {"name": "region_features", "shards": str(shards), "batch_size": 6, "num_workers": 0,
                           "class_key": "cls_prob.npy", "label_key": "cls"}},
        "train": {"max_steps": 3, "log_every": 1, "warmup_steps": 0, "progress_bar": False, "tensorboard": False},
        "eval": {"zeroshot": None, "tasks": [{"name": "itm_retrieval", "data": str(shards), "batch_size": 8,
                                              "classnames": str(classnames), "templates": str(templates)}]},
    })
    final = mmptm.train(config, output_dir=tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3]
    assert records[-2]["data/skipped_samples"] == 1
    assert final["eval/itm_num_images"] == 23 and 0 <= final["eval/itm_i2t_r1"] <= 1


def test_the_kmeans_codebook_of_mrm_is_checkpointed_and_restored_on_resume(tmp_path, demo):
    from mmptm.objectives.mrm import OnlineKMeans
    from mmptm.training.trainer import Trainer

    shards = write_region_shards(tmp_path / "shards", bad=0)

    def config(steps: int) -> mmptm.Config:
        return mmptm.load_config({
            "model": {"name": "visualbert", "vision": None, "visual_dim": DIM, "region_classes": CLASSES,
                      "max_text_length": 16, "width": 16, "layers": 1, "heads": 2},
            "tokenizer": {"context_length": 16},
            "objectives": [{"name": "mrm", "target": "kmeans", "kmeans_momentum": 0.5}],
            "data": {"train": {"name": "region_features", "shards": str(shards), "batch_size": 6,
                               "num_workers": 0}},
            "train": {"max_steps": steps, "checkpoint_every": 2, "log_every": 1, "warmup_steps": 0,
                      "progress_bar": False, "tensorboard": False},
            "eval": {"zeroshot": None},
        })

    run = tmp_path / "run"
    mmptm.train(config(3), output_dir=run)
    state = run / "checkpoints" / "step_00000003" / "training_state" / "objectives.pt"
    saved = torch.load(state, weights_only=True)["0.kmeans.centroids"]
    assert saved.shape == (CLASSES, DIM)

    resumed = Trainer(config(3), output_dir=run, resume=True)
    resumed._restore()
    restored = resumed.objectives[0].kmeans
    torch.testing.assert_close(restored.centroids, saved, rtol=0, atol=0)
    features = torch.randn(40, DIM, generator=torch.Generator().manual_seed(0))
    reference = OnlineKMeans(CLASSES)
    reference.centroids = saved
    torch.testing.assert_close(restored.assign_and_update(features, training=False),
                               reference.assign_and_update(features, training=False))
    # A checkpoint saved before the objectives' state was (no objectives.pt) still resumes.
    state.unlink()
    mmptm.train(config(4), output_dir=run, resume=True)
    assert (run / "checkpoints" / "step_00000004" / "training_state" / "objectives.pt").is_file()
