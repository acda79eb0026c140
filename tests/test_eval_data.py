"""Evaluation data: every caption of an image (image_text all_captions), image folders, parallel-text shards."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmptm.data_pipelines.context import DataContext
from mmptm.data_pipelines.image_folder import folder_classes, image_folder
from mmptm.data_pipelines.image_text import image_text
from mmptm.data_pipelines.parallel_text import parallel_text
from mmptm.data_pipelines.shards import open_tar_writer
from mmptm.registry import DATASETS, build


def png(shade: int = 100) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10), (shade, 255 - shade, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> list[str]:
    keys = [f"{i:06d}" for i in range(len(samples))]
    with open(path, "wb") as stream, open_tar_writer(stream) as tar:
        for key, sample in zip(keys, samples, strict=True):
            tar.write({"__key__": key, **sample})
    return keys


def read_epoch(stream) -> tuple[list[dict], int, list[str]]:
    """Non-empty batches, total skipped count and skipped ids of one epoch."""
    batches, skipped, ids = [], 0, []
    for batch in stream:
        skipped += batch["skipped"]
        ids += batch["skipped_keys"]
        if not batch.get("empty"):
            batches.append(batch)
    return batches, skipped, ids


def context(**overrides) -> DataContext:
    return DataContext(**{"image_size": 8, "training": False, **overrides})


def json_captions(captions: dict) -> bytes:
    return json.dumps({"captions": captions}).encode()


def test_all_captions_returns_every_caption_in_the_chosen_languages(tmp_path):
    write_shard(
        tmp_path / "s.tar",
        [
            {"png": png(), "json": json_captions({"en": ["one", "a one"], "fr": "un", "de": ["eins"]})},
            {"png": png(), "txt": b"two"},
            {"png": png(), "json": json_captions({"de": ["drei"]})},  # nothing in en/fr: skipped
            {"png": b"broken", "txt": b"four"},
        ],
    )
    stream = image_text(context(tokenizer=lambda texts: torch.zeros(len(texts), 3)), str(tmp_path), batch_size=8,
                        num_workers=0, caption_languages=["en", "fr"], all_captions=True)
    (batch,), skipped, ids = read_epoch(stream)
    assert batch["captions"] == [["one", "a one", "un"], ["two"]]
    assert "caption" not in batch and "text" not in batch  # the evaluator tokenises
    assert skipped == 2 and [i.rsplit("#", 1)[1] for i in ids] == ["000002", "000003"]
    (batch,), _, _ = read_epoch(image_text(context(), str(tmp_path), batch_size=8, num_workers=0, all_captions=True))
    assert batch["captions"][0] == ["one", "a one", "un", "eins"] and batch["captions"][2] == ["drei"]


def make_folder(root: Path) -> dict[str, list[str]]:
    """Classes b, a, c (sorted: a, b, c) with a nested image, an uppercase extension, a text file, a bad image."""
    files = {"b": ["1.png", "sub/2.PNG"], "a": ["x.jpg"], "c": ["y.png", "z.png"]}
    for name, images in files.items():
        for image in images:
            (root / name / image).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (12, 9), (40, 80, 120)).save(root / name / image, format="PNG")
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "c" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return files


@pytest.mark.parametrize("num_workers", [0, 2])
def test_image_folder_labels_sorted_class_folders_and_counts_bad_images(tmp_path, num_workers, caplog):
    make_folder(tmp_path)
    assert folder_classes(tmp_path) == ["a", "b", "c"]
    stream = build(DATASETS, {"name": "image_folder", "root": str(tmp_path), "batch_size": 2,
                              "num_workers": num_workers}, context=context())
    with caplog.at_level(logging.WARNING, logger="mmptm.data"):
        batches, skipped, ids = read_epoch(stream)
    labels = {key: label for b in batches for key, label in zip(b["key"], b["label"].tolist(), strict=True)}
    assert labels == {"a/x.jpg": 0, "b/1.png": 1, "b/sub/2.PNG": 1, "c/y.png": 2, "c/z.png": 2}
    assert all(b["image"].shape[1:] == (3, 8, 8) for b in batches)
    assert skipped == 1 and ids == [f"{tmp_path}#c/broken.jpg"]
    if num_workers == 0:
        assert any("c/broken.jpg" in r.getMessage() and "undecodable" in r.getMessage() for r in caplog.records)


def test_image_folder_shuffles_when_training_and_rejects_empty_folders(tmp_path):
    make_folder(tmp_path / "data")
    stream = image_folder(context(training=True, seed=3), str(tmp_path / "data"), batch_size=1, num_workers=0)
    orders = [[k for b in read_epoch(stream)[0] for k in b["key"]] for _ in range(3)]
    assert sorted(orders[0]) == sorted(orders[1]) and len(set(map(tuple, orders))) > 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class subfolders"):
        image_folder(context(), str(tmp_path / "empty"))
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        image_folder(context(), str(tmp_path / "empty"))


def pair(src: str, tgt: str, src_lang: str = "en", tgt_lang: str = "fr") -> dict[str, bytes]:
    return {"json": json.dumps({"src": src, "tgt": tgt, "src_lang": src_lang, "tgt_lang": tgt_lang}).encode()}


def test_parallel_text_reads_pairs_and_counts_bad_ones(tmp_path):
    write_shard(
        tmp_path / "p.tar",
        [
            pair("one", "un"),
            {"json": b"{not json"},
            pair("two", "zwei", tgt_lang="de"),
            {"json": json.dumps({"src": "three", "tgt": "", "src_lang": "en", "tgt_lang": "fr"}).encode()},
            {"txt": b"no json"},
        ],
    )
    stream = build(DATASETS, {"name": "parallel_text", "shards": str(tmp_path), "batch_size": 4, "num_workers": 0},
                   context=context())
    (batch,), skipped, ids = read_epoch(stream)
    assert batch["src"] == ["one", "two"] and batch["tgt"] == ["un", "zwei"]
    assert batch["src_lang"] == ["en", "en"] and batch["tgt_lang"] == ["fr", "de"]
    assert skipped == 3 and [i.rsplit("#", 1)[1] for i in ids] == ["000001", "000003", "000004"]
    with pytest.raises(ValueError, match="parallel_text: batch_size"):
        parallel_text(context(), str(tmp_path), batch_size=0)
