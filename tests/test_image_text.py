"""The image-text webdataset stream: epochs, splitting, resampling, bad input, captions, labels, transforms."""

from __future__ import annotations

import io
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmptm.data_pipelines import demo
from mmptm.data_pipelines.context import DataContext
from mmptm.data_pipelines.image_text import image_text
from mmptm.data_pipelines.shards import open_tar_writer, write_shards
from mmptm.data_pipelines.streams import ShardStream, resolve_shards
from mmptm.data_pipelines.transforms import image_transform, normalize_pixels, random_resized_crop_box
from mmptm.registry import DATASETS, build

CONTEXT_LENGTH = 12
NUM_SAMPLES = 20


def byte_tokenizer(texts: list[str]) -> torch.Tensor:
    """Stand-in tokenizer: UTF-8 bytes + 1, truncated and right-padded with 0."""
    ids = torch.zeros(len(texts), CONTEXT_LENGTH, dtype=torch.long)
    for row, text in enumerate(texts):
        data = list(text.encode("utf-8"))[:CONTEXT_LENGTH]
        ids[row, : len(data)] = torch.tensor(data) + 1
    return ids


def make_context(**overrides) -> DataContext:
    return DataContext(**{"tokenizer": byte_tokenizer, "image_size": 8, "training": False, **overrides})


def png(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


VALID_PNG = png()


def read_epoch(stream) -> tuple[list[str], int, list[dict]]:
    """Keys in the order yielded, total skipped count, and the non-empty batches of one epoch."""
    keys, skipped, batches = [], 0, []
    for batch in stream:
        skipped += batch["skipped"]
        if not batch.get("empty"):
            keys += batch["key"]
            batches.append(batch)
    return keys, skipped, batches


def write_raw_shard(path: Path, samples: list[dict[str, bytes]], first_key: int = 0) -> list[str]:
    """Write ``samples`` (extension -> bytes) as they are, keys ``%06d`` from ``first_key``; return the keys."""
    keys = []
    with open(path, "wb") as stream, open_tar_writer(stream) as tar:
        for i, sample in enumerate(samples, start=first_key):
            keys.append(f"{i:06d}")
            tar.write({"__key__": keys[-1], **sample})
    return keys


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """5 shards of 4 captioned 16×16 PNGs, written by write_shards from a folder."""
    root = tmp_path_factory.mktemp("image_text")
    (root / "src").mkdir()
    for i in range(NUM_SAMPLES):
        Image.new("RGB", (16, 16), (i * 12, 255 - i * 12, 0)).save(root / f"src/{i:02d}.png")
        (root / f"src/{i:02d}.txt").write_text(f"square {i}", encoding="utf-8")
    stats = write_shards(root / "src", root / "shards", samples_per_shard=4)
    assert stats.num_samples == NUM_SAMPLES and len(stats.shards) == 5
    return root / "shards"


@pytest.fixture(scope="module")
def all_keys(shard_dir) -> set[str]:
    keys, skipped, _ = read_epoch(image_text(make_context(), str(shard_dir), batch_size=7, num_workers=0))
    assert skipped == 0 and len(keys) == NUM_SAMPLES
    return set(keys)


def test_batches_hold_images_tokens_captions_and_keys(shard_dir):
    stream = image_text(make_context(), str(shard_dir), batch_size=6, num_workers=0)
    assert isinstance(stream, ShardStream) and len(stream.shards) == 5
    batches = read_epoch(stream)[2]
    assert [len(b["key"]) for b in batches] == [6, 6, 6, 2]  # eval keeps the final partial batch
    batch = batches[0]
    assert batch["image"].shape == (6, 3, 8, 8) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (6, CONTEXT_LENGTH) and batch["text"].dtype == torch.long
    assert batch["caption"][0] == "square 0" and batch["key"][0] == "000000000"
    assert torch.equal(batch["text"], byte_tokenizer(batch["caption"]))
    assert "label" not in batch


@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("training", [False, True])
def test_every_sample_exactly_once_per_epoch(shard_dir, all_keys, num_workers, training):
    stream = image_text(
        make_context(training=training), str(shard_dir), batch_size=3, num_workers=num_workers, drop_last=False
    )
    for _ in range(2):
        keys, skipped, _ = read_epoch(stream)
        assert sorted(keys) == sorted(all_keys) and skipped == 0


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("training", [False, True])  # ranks shuffle shards alike before splitting them
def test_two_ranks_cover_all_samples_without_overlap(shard_dir, all_keys, num_workers, training):
    per_rank = [
        read_epoch(
            image_text(
                make_context(rank=rank, world_size=2, training=training),
                str(shard_dir),
                batch_size=3,
                num_workers=num_workers,
                drop_last=False,
            )
        )[0]
        for rank in (0, 1)
    ]
    assert per_rank[0] and per_rank[1]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(all_keys)


@pytest.mark.parametrize("training", [False, True])
def test_fewer_shards_than_workers_splits_samples(tmp_path, training):
    keys = write_raw_shard(tmp_path / "only.tar", [{"png": VALID_PNG, "txt": f"c{i}".encode()} for i in range(11)])
    (tmp_path / "garbage.tar").write_bytes(b"this is not a tar file" * 40)
    seen, skipped = [], 0
    for rank in (0, 1):
        context = make_context(rank=rank, world_size=2, training=training)
        stream = image_text(context, str(tmp_path), batch_size=2, num_workers=2, drop_last=False)
        rank_keys, rank_skipped, _ = read_epoch(stream)
        seen += rank_keys
        skipped += rank_skipped
    # 2 shards for 2 ranks × 2 workers: every worker reads both and keeps its share,
    # so even the unreadable shard is counted once, not four times.
    assert sorted(seen) == keys and skipped == 1


def test_training_epochs_shuffle_differently_and_reproducibly(shard_dir, all_keys):
    def stream():
        return image_text(make_context(training=True, seed=3), str(shard_dir), batch_size=4, num_workers=0)

    first = stream()
    epoch0, epoch1 = read_epoch(first)[0], read_epoch(first)[0]  # iterating again is the next epoch
    assert set(epoch0) == set(epoch1) == all_keys and epoch0 != epoch1
    again = stream()
    again.set_epoch(1)
    assert read_epoch(again)[0] == epoch1
    again.set_epoch(0)
    assert read_epoch(again)[0] == epoch0
    assert read_epoch(image_text(make_context(), str(shard_dir), batch_size=4, num_workers=0))[0] == sorted(all_keys)


def test_drop_last_defaults_to_training(shard_dir):
    keys = read_epoch(image_text(make_context(training=True), str(shard_dir), batch_size=3, num_workers=0))[0]
    assert len(keys) == 18  # 20 samples: the final partial batch of 2 is dropped


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resampled_epoch_has_epoch_samples(shard_dir, all_keys, num_workers):
    def resampled(**options):
        return image_text(
            make_context(training=True),
            str(shard_dir),
            batch_size=4,
            num_workers=num_workers,
            resample=True,
            epoch_samples=30,
            **options,
        )

    exact = resampled(drop_last=False)
    for _ in range(2):
        keys, skipped, _ = read_epoch(exact)
        assert len(keys) == 30 and set(keys) <= all_keys and skipped == 0
    whole_batches = resampled()
    assert len(read_epoch(whole_batches)[0]) == 32  # with drop_last: rounded up to whole batches


def test_resampled_ranks_draw_different_samples(shard_dir):
    draws = [
        read_epoch(
            image_text(
                make_context(training=True, rank=rank, world_size=2),
                str(shard_dir),
                batch_size=4,
                num_workers=0,
                resample=True,
                epoch_samples=16,
            )
        )[0]
        for rank in (0, 1)
    ]
    assert draws[0] != draws[1]


def bad_samples_shard(path: Path) -> None:
    """5 samples: one with a corrupt image, one without a caption."""
    write_raw_shard(
        path,
        [
            {"png": VALID_PNG, "txt": b"good 0"},
            {"png": VALID_PNG[:30], "txt": b"corrupt image"},
            {"png": VALID_PNG, "txt": b"good 2"},
            {"png": VALID_PNG},
            {"png": VALID_PNG, "txt": b"good 4"},
        ],
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_and_counted_exactly(tmp_path, num_workers):
    bad_samples_shard(tmp_path / "bad.tar")
    write_raw_shard(tmp_path / "good.tar", [{"png": VALID_PNG, "txt": b"fine"}] * 3, first_key=100)
    for training in (False, True):
        stream = image_text(
            make_context(training=training), str(tmp_path), batch_size=2, num_workers=num_workers, drop_last=False
        )
        keys, skipped, _ = read_epoch(stream)
        assert skipped == 2
        assert sorted(keys) == ["000000", "000002", "000004", "000100", "000101", "000102"]


def test_skip_warnings_name_shard_key_and_problem(tmp_path, caplog):
    bad_samples_shard(tmp_path / "bad.tar")
    with caplog.at_level(logging.WARNING, logger="mmptm.data"):
        read_epoch(image_text(make_context(), str(tmp_path / "bad.tar"), batch_size=2, num_workers=0))
    messages = [r.getMessage() for r in caplog.records if r.name == "mmptm.data"]
    assert len(messages) == 2
    shard = str(tmp_path / "bad.tar")
    assert shard in messages[0] and "'000001'" in messages[0] and "undecodable png image" in messages[0]
    assert shard in messages[1] and "'000003'" in messages[1] and "no caption" in messages[1]


def test_skip_counts_ride_on_batches_and_a_final_empty_marker(tmp_path):
    bad_samples_shard(tmp_path / "bad.tar")
    batches = list(image_text(make_context(), str(tmp_path), batch_size=2, num_workers=0))
    assert [(len(b.get("key", [])), b["skipped"]) for b in batches] == [(2, 1), (1, 1)]
    shard = str(tmp_path / "bad.tar")
    assert [b["skipped_keys"] for b in batches] == [[f"{shard}#000001"], [f"{shard}#000003"]]
    keys = write_raw_shard(tmp_path / "bad.tar", [{"png": b"nope", "txt": b"x"}, {"txt": b"no image"}])
    batches = list(image_text(make_context(), str(tmp_path), batch_size=2, num_workers=0))
    assert batches == [{"empty": True, "skipped": 2, "skipped_keys": [f"{shard}#{key}" for key in keys]}]


def test_damaged_shards_are_counted_once_and_reading_goes_on(tmp_path, caplog):
    keys = write_raw_shard(tmp_path / "a.tar", [{"png": VALID_PNG, "txt": b"x"}] * 6)
    write_raw_shard(tmp_path / "b.tar", [{"png": VALID_PNG, "txt": b"x"}] * 6, first_key=100)
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: 5 * 2048 + 100])  # cut in the header of its last sample
    write_raw_shard(tmp_path / "c.tar", [{"png": VALID_PNG, "txt": b"x"}] * 2, first_key=200)
    data = (tmp_path / "c.tar").read_bytes()
    (tmp_path / "c.tar").write_bytes(data[: 512 + 40])  # cut in the data of its first file
    (tmp_path / "d.tar").write_bytes(b"\x00garbage" * 200)
    with caplog.at_level(logging.WARNING, logger="mmptm.data"):
        seen, skipped, _ = read_epoch(image_text(make_context(), str(tmp_path), batch_size=4, num_workers=0))
    assert seen == keys + ["000100", "000101", "000102", "000103", "000104"]
    assert skipped == 3  # b, c and d; c's first sample never got a file, so it is not a sample
    messages = [r.getMessage() for r in caplog.records]
    for shard in ("b.tar", "c.tar", "d.tar"):
        assert sum(shard in m for m in messages) == 1, messages


def test_caption_choice_respects_languages(tmp_path):
    captions = {"en": ["one", "uno?"], "fr": ["un", "une"], "de": "eins"}
    write_raw_shard(
        tmp_path / "multi.tar",
        [{"png": VALID_PNG, "json": json.dumps({"captions": captions}).encode(), "txt": b"plain"}] * 40
        + [{"png": VALID_PNG, "json": json.dumps({"captions": {"en": "only english"}}).encode()}],
    )

    def drawn(languages):
        stream = image_text(make_context(), str(tmp_path), batch_size=8, num_workers=0, caption_languages=languages)
        keys, skipped, batches = read_epoch(stream)
        return {c for b in batches for c in b["caption"]}, skipped

    french_or_german, skipped = drawn(["fr", "de"])
    assert french_or_german == {"un", "une", "eins"} and skipped == 1  # the English-only sample
    anything, skipped = drawn(None)
    assert anything == {"one", "uno?", "un", "une", "eins", "only english"} and skipped == 0


def test_txt_is_used_without_json_captions(tmp_path):
    write_raw_shard(
        tmp_path / "s.tar",
        [
            {"png": VALID_PNG, "txt": b"  plain text \n", "json": b'{"captions": "not a dict", "x": 1}'},
            {"png": VALID_PNG, "alt": b"alternative"},
        ],
    )
    batches = read_epoch(image_text(make_context(), str(tmp_path), batch_size=4, num_workers=0))[2]
    assert batches[0]["caption"] == ["plain text"]
    batches = read_epoch(image_text(make_context(), str(tmp_path), batch_size=4, num_workers=0, caption_key="alt"))[2]
    assert batches[0]["caption"] == ["alternative"]


def test_labels_are_parsed_and_bad_labels_skipped(tmp_path):
    samples = [{"png": VALID_PNG, "txt": b"x", "cls": str(i % 3).encode()} for i in range(5)]
    samples += [{"png": VALID_PNG, "txt": b"x", "cls": b"seven"}, {"png": VALID_PNG, "txt": b"x"}]
    write_raw_shard(tmp_path / "l.tar", samples)
    stream = image_text(make_context(), str(tmp_path), batch_size=4, num_workers=0, label_key="cls")
    keys, skipped, batches = read_epoch(stream)
    assert torch.cat([b["label"] for b in batches]).tolist() == [0, 1, 2, 0, 1]
    assert batches[0]["label"].dtype == torch.long and skipped == 2


def test_shard_specs_resolve_to_files(shard_dir, monkeypatch):
    files = sorted(str(p) for p in shard_dir.glob("*.tar"))
    assert resolve_shards(str(shard_dir)) == files
    assert resolve_shards(f"{shard_dir}/{{00000..00003}}.tar::{shard_dir}/00004.tar") == files
    monkeypatch.setattr(demo, "resolve", lambda spec: str(shard_dir) if spec == "demo:train" else spec)
    assert resolve_shards("demo:train") == files
    with pytest.raises(FileNotFoundError, match=r"5 of 10 shard files do not exist, e.g. .*00005\.tar"):
        image_text(make_context(), f"{shard_dir}/{{00000..00009}}.tar")
    empty = shard_dir.parent / "empty"
    empty.mkdir(exist_ok=True)
    with pytest.raises(FileNotFoundError, match="no \\*.tar"):
        image_text(make_context(), str(empty))


def test_invalid_options_fail_early(shard_dir):
    with pytest.raises(ValueError, match="epoch_samples"):
        image_text(make_context(), str(shard_dir), resample=True)
    with pytest.raises(ValueError, match="resample=True"):
        image_text(make_context(), str(shard_dir), epoch_samples=10)
    with pytest.raises(ValueError, match="batch_size"):
        image_text(make_context(), str(shard_dir), batch_size=0)


def test_registered_and_built_from_a_config_section(shard_dir):
    stream = build(DATASETS, {"name": "image_text", "shards": str(shard_dir), "num_workers": 0}, context=make_context())
    assert len(read_epoch(stream)[0]) == NUM_SAMPLES


def test_eval_transform_is_deterministic_and_normalises():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    gradient = Image.frombytes("L", (20, 12), bytes(range(240)))
    evaluate = image_transform(8, mean, std, training=False)
    out = evaluate(gradient)
    assert out.shape == (3, 8, 8) and torch.equal(out, evaluate(gradient))
    red = image_transform(8, mean, std, training=False)(Image.new("RGB", (10, 10), (255, 0, 0)))
    torch.testing.assert_close(red[:, 0, 0], torch.tensor([(1 - 0.5) / 0.2, -0.4 / 0.25, -0.3 / 0.3]))
    square = Image.frombytes("L", (16, 16), bytes(range(256))).convert("RGB")
    full_crop = image_transform(8, mean, std, training=True, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    # Both bicubic with PIL's filter, same geometry (train: torch's uint8 kernel, eval: PIL's): within 2 levels.
    levels = (full_crop(square) - evaluate(square)) * torch.tensor(std).view(3, 1, 1) * 255
    assert levels.abs().max() <= 2 + 1e-3 and levels.abs().mean() < 0.5
    random_crop = image_transform(8, mean, std, training=True, scale=(0.1, 0.3))
    crops = [random_crop(square) for _ in range(5)]
    assert all(c.shape == (3, 8, 8) for c in crops) and any(not torch.equal(crops[0], c) for c in crops[1:])


@pytest.mark.parametrize("training", [False, True])
def test_uint8_images_normalised_later_are_the_float_images_bit_for_bit(shard_dir, training):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    image = Image.frombytes("RGB", (40, 30), bytes(range(256)) * 14 + bytes(range(3600 - 256 * 14)))
    pixels = image_transform(16, mean, std, training, scale=(0.3, 0.6), uint8=True)(image, random.Random(3))
    floats = image_transform(16, mean, std, training, scale=(0.3, 0.6))(image, random.Random(3))
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 16, 16)
    assert torch.equal(normalize_pixels(pixels, mean, std), floats)
    # The stream: uint8 batches, the same samples and crops as the float stream (same seed).
    context = make_context(training=training, image_mean=mean, image_std=std)
    as_uint8 = read_epoch(image_text(context, str(shard_dir), batch_size=8, num_workers=0, uint8_images=True))[2]
    as_float = read_epoch(image_text(context, str(shard_dir), batch_size=8, num_workers=0))[2]
    assert [b["key"] for b in as_uint8] == [b["key"] for b in as_float]
    for small, big in zip(as_uint8, as_float, strict=True):
        assert small["image"].dtype == torch.uint8
        assert torch.equal(normalize_pixels(small["image"], mean, std), big["image"])


def test_transforms_match_torchvision() -> None:
    """Eval: torchvision's Resize + CenterCrop + ToTensor + Normalize (open_clip's), exactly; train: a crop
    resized as torchvision's RandomResizedCrop does it on a PIL image, to within 2 of 255 levels."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    image = Image.frombytes("RGB", (40, 30), bytes(range(256)) * 14 + bytes(range(3600 - 256 * 14)))
    to_tensor = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    evaluate = T.Compose([T.Resize(16, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(16), to_tensor])
    torch.testing.assert_close(image_transform(16, mean, std, training=False)(image), evaluate(image))
    train = image_transform(16, mean, std, training=True, scale=(0.3, 0.6))
    box = random_resized_crop_box(40, 30, (0.3, 0.6), (3 / 4, 4 / 3), random.Random(7))
    expected = to_tensor(image.crop(box).resize((16, 16), Image.Resampling.BICUBIC))
    # torch's uint8 antialiased bicubic (PIL's filter) against PIL's resize: at most 2 of 255 levels apart.
    levels = (train(image, random.Random(7)) - expected) * torch.tensor(std).view(3, 1, 1) * 255
    assert levels.abs().max() <= 2 + 1e-3 and levels.abs().mean() < 0.5


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.floats(0.05, 1.0), st.floats(0.0, 0.5), st.integers(0, 2**32))
def test_random_crop_box_lies_in_the_image_with_the_drawn_area_and_ratio(width, height, low, spread, seed):
    scale, ratio = (low, min(1.0, low + spread)), (3 / 4, 4 / 3)
    left, top, right, bottom = random_resized_crop_box(width, height, scale, ratio, random.Random(seed))
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    w, h = right - left, bottom - top
    fallback = (w == width or h == height) and (left, top) == ((width - w) // 2, (height - h) // 2)
    if not fallback:  # a drawn crop: w, h are sqrt(area * r), sqrt(area / r) rounded to pixels
        assert (w - 0.5) * (h - 0.5) <= scale[1] * width * height
        assert (w + 0.5) * (h + 0.5) >= scale[0] * width * height
        assert (w - 0.5) / (h + 0.5) <= ratio[1] and (w + 0.5) / (h - 0.5) >= ratio[0]


# ----------------------------------------------------------------- property tests: random and corrupted bytes


def flip_byte(data: bytes, position: int, value: int) -> bytes:
    position %= len(data)
    return data[:position] + bytes([data[position] ^ value]) + data[position + 1 :]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)
image_files = st.one_of(
    st.none(),
    st.just(VALID_PNG),
    st.binary(max_size=64),
    st.builds(lambda n: VALID_PNG[:n], st.integers(0, len(VALID_PNG) - 1)),
    st.builds(flip_byte, st.just(VALID_PNG), st.integers(0, 10_000), st.integers(1, 255)),
)
caption_files = st.one_of(st.none(), st.text(max_size=12).map(str.encode), st.binary(max_size=12))
json_files = st.one_of(
    st.none(),
    st.binary(max_size=24),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["en", "fr"]), json_values, max_size=2).map(
        lambda c: json.dumps({"captions": c}).encode()
    ),
)
raw_samples = st.fixed_dictionaries({"png": image_files, "txt": caption_files, "json": json_files})


def is_surely_good(sample: dict[str, bytes | None]) -> bool:
    """A valid image and a non-empty UTF-8 caption, and no json to get in the way."""
    try:
        caption = sample["txt"].decode("utf-8").strip() if sample["txt"] is not None else ""
    except UnicodeDecodeError:
        return False
    return sample["png"] == VALID_PNG and sample["json"] is None and bool(caption)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    samples=st.lists(raw_samples, min_size=1, max_size=8),
    languages=st.one_of(st.none(), st.lists(st.sampled_from(["en", "fr", "de"]), max_size=2)),
    training=st.booleans(),
)
def test_random_and_corrupted_samples_never_crash_and_are_all_counted(samples, languages, training):
    with tempfile.TemporaryDirectory() as folder:
        files = [{ext: data for ext, data in s.items() if data is not None} for s in samples]
        keys = write_raw_shard(Path(folder) / "s.tar", [f or {"cls": b"0"} for f in files])
        stream = image_text(
            make_context(training=training),
            folder,
            batch_size=3,
            num_workers=0,
            caption_languages=languages,
            drop_last=False,
        )
        seen, skipped, batches = read_epoch(stream)
    assert len(seen) + skipped == len(samples)
    assert len(set(seen)) == len(seen)
    assert {k for k, s in zip(keys, samples, strict=False) if is_surely_good(s)} <= set(seen)
    for batch in batches:
        assert batch["image"].shape[1:] == (3, 8, 8) and len(batch["caption"]) == len(batch["key"])


@settings(max_examples=40, deadline=None)
@given(
    flips=st.lists(st.tuples(st.integers(0, 100_000), st.integers(1, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 100_000)),
)
def test_corrupted_tar_bytes_never_crash(flips, cut):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.tar"
        keys = write_raw_shard(path, [{"png": png((i, 0, 0)), "txt": f"c{i}".encode()} for i in range(4)])
        data = path.read_bytes()
        for position, value in flips:
            data = flip_byte(data, position, value)
        path.write_bytes(data if cut is None else data[: cut % len(data)])
        seen, skipped, _ = read_epoch(image_text(make_context(), folder, batch_size=3, num_workers=0))
    assert len(set(seen)) == len(seen)
    if not flips and cut is None:
        assert seen == keys and skipped == 0


# A user script that ends while its stream's worker still has batches to give (resample: endless).
STREAM_LEFT_RUNNING = """
import multiprocessing, sys
from mmptm.data_pipelines.context import DataContext
from mmptm.data_pipelines.image_text import image_text

stream = image_text(DataContext(image_size=8), sys.argv[1], batch_size=2, num_workers=1, resample=True,
                    epoch_samples=1000)
batches = iter(stream)
next(batches), next(batches)
print(*[worker.pid for worker in multiprocessing.active_children()])
"""


def test_a_script_exits_while_its_stream_workers_still_run(shard_dir):
    """Workers ignore SIGTERM, with which multiprocessing stops them at exit: mmptm must stop them itself."""
    try:
        # The timeout detects a hang (the script takes seconds); it is no speed target.
        done = subprocess.run(
            [sys.executable, "-c", STREAM_LEFT_RUNNING, str(shard_dir)], capture_output=True, text=True, timeout=90
        )
    except subprocess.TimeoutExpired as hang:
        pytest.fail(f"the script did not exit with its DataLoader worker running: {hang.stdout!r} {hang.stderr!r}")
    assert done.returncode == 0, done.stderr
    workers = [int(pid) for pid in done.stdout.split()]
    assert len(workers) == 1
    with pytest.raises(ProcessLookupError):  # exited and reaped, not orphaned
        os.kill(workers[0], 0)
