"""Region-feature shards (npy N×D + boxes.npy N×4 + txt): the dataset, skip counting, training both fusion models."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

import mmptm
from mmptm.data_pipelines.context import DataContext
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
