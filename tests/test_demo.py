"""The embedded demo dataset: contents, split, determinism, atomic builds and ``demo:`` paths."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from braceexpand import braceexpand
from PIL import Image

from mmptm.data_pipelines import demo
from mmptm.data_pipelines.demo import (
    DEMO_LANGUAGES,
    DEMO_TEMPLATES,
    DemoPaths,
    demo_classnames,
    demo_root,
    ensure_demo,
    resolve,
)
from mmptm.data_pipelines.tokenizer import SentencePieceTokenizer

REPO = Path(__file__).resolve().parents[1]
NUM_DIGITS = 1797


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> DemoPaths:
    """The demo with seed 0, built once, in a cache folder laid out like $MMPTM_CACHE
    (its build time is measured by ``benchmarks/demo_build.py``, not here)."""
    return ensure_demo(tmp_path_factory.mktemp("cache") / "demo-v2", seed=0)


@pytest.fixture(scope="module")
def samples(paths) -> dict[str, list[dict[str, bytes]]]:
    """Every sample per split, read straight from the tar files."""
    return {split: [s for shard in shard_files(paths, split) for s in read_shard(shard)] for split in ("train", "val")}


def shard_files(paths: DemoPaths, split: str) -> list[Path]:
    return [Path(p) for p in braceexpand(paths.train_shards if split == "train" else paths.val_shards)]


def read_shard(path: Path) -> list[dict[str, bytes]]:
    grouped: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            grouped.setdefault(key, {"__key__": key.encode()})[ext] = tar.extractfile(member).read()
    return list(grouped.values())


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_builds_with_the_documented_layout(paths):
    assert paths.train_shards == str(paths.root / "train-{000000..000002}.tar")
    assert paths.val_shards == str(paths.root / "val-000000.tar")
    assert sorted(p.name for p in paths.root.iterdir()) == [
        "classnames.json", "info.json", "templates.json", "tokenizer.model",
        "train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar",
    ]  # fmt: skip
    assert paths.languages == DEMO_LANGUAGES
    info = json.loads((paths.root / "info.json").read_text(encoding="utf-8"))
    assert (info["num_train"], info["num_val"], info["seed"]) == (paths.num_train, paths.num_val, 0)
    assert not list(paths.root.parent.glob(".demo-v2.tmp-*"))


def test_counts_and_stratified_split(paths, samples):
    from sklearn.datasets import load_digits

    labels = load_digits().target
    assert (paths.num_train, paths.num_val) == (len(samples["train"]), len(samples["val"])) == (1438, 359)
    keys = [s["__key__"] for split in samples.values() for s in split]
    assert sorted(int(k) for k in keys) == list(range(NUM_DIGITS))
    assert all(len(k) == 9 for k in keys)
    for split in ("train", "val"):
        assert [len(read_shard(f)) for f in shard_files(paths, split)] == {"train": [500, 500, 438], "val": [359]}[
            split
        ]
    val_counts = Counter(int(s["cls"]) for s in samples["val"])
    assert sorted(val_counts) == list(range(10))
    for digit, n in Counter(labels.tolist()).items():
        assert val_counts[digit] == round(0.2 * n)


def test_every_sample_is_a_complete_image_text_pair(samples):
    from sklearn.datasets import load_digits

    digits = load_digits()
    classnames = demo_classnames()
    for sample in samples["train"] + samples["val"]:
        assert set(sample) == {"__key__", "png", "txt", "json", "cls"}
        meta = json.loads(sample["json"])
        index, label = meta["source_index"], meta["label"]
        assert int(sample["__key__"]) == index
        assert label == int(sample["cls"].decode("ascii")) == digits.target[index]
        assert list(meta["captions"]) == list(DEMO_LANGUAGES)
        for lang, captions in meta["captions"].items():
            assert captions == [t.format(classnames[lang][label]) for t in DEMO_TEMPLATES[lang]]
        assert sample["txt"].decode("utf-8") in meta["captions"]["en"]

    # The image is the source digit: shrink it back to 8x8 and compare.
    for sample in samples["val"][:50]:
        meta = json.loads(sample["json"])
        image = Image.open(io.BytesIO(sample["png"]))
        assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
        pixels = np.asarray(image, dtype=np.float64)[..., 0]
        shrunk = pixels.reshape(8, 4, 8, 4).mean(axis=(1, 3))
        source = digits.images[meta["source_index"]]
        assert np.corrcoef(shrunk.ravel(), source.ravel())[0, 1] > 0.9
        assert pixels.max() > 200


@pytest.mark.parametrize(
    ("lang", "word"),
    [("en", "seven"), ("fr", "sept"), ("de", "sieben"), ("es", "siete"), ("it", "sette"), ("pt", "sete"),
     ("nl", "zeven"), ("pl", "siedem"), ("ru", "семь"), ("tr", "yedi")],
)  # fmt: skip
def test_captions_spell_the_label(samples, lang, word):
    sevens = [json.loads(s["json"]) for s in samples["val"] if s["cls"] == b"7"]
    assert sevens
    for meta in sevens:
        assert all(re.search(rf"(?<!\w){word}(?!\w)", caption) for caption in meta["captions"][lang])


def test_classnames_and_templates_files(paths):
    classnames = json.loads(paths.classnames.read_text(encoding="utf-8"))
    templates = json.loads(paths.templates.read_text(encoding="utf-8"))
    assert classnames == demo_classnames()
    assert list(classnames) == list(templates) == list(DEMO_LANGUAGES)
    assert len(DEMO_LANGUAGES) >= 10
    assert classnames["en"] == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for lang, lang_templates in templates.items():
        assert 4 <= len(lang_templates) <= 6
        assert len(set(lang_templates)) == len(lang_templates)
        assert all(t.count("{}") == 1 for t in lang_templates), lang
        assert len(set(classnames[lang])) == 10, lang


def test_tokenizer_covers_every_caption(paths):
    tokenizer = SentencePieceTokenizer(paths.tokenizer)
    assert 900 <= tokenizer.vocab_size <= 2000
    for digit in range(10):
        for captions in demo.caption_by_language(demo_classnames(), digit).values():
            for caption in captions:
                ids = tokenizer.encode(caption)
                assert tokenizer.unk_id not in ids
                assert len(ids) + 2 <= 24  # whole-word pieces: captions stay short
                assert tokenizer.decode(ids) == caption


def test_same_seed_same_bytes_even_with_two_concurrent_builders(paths, tmp_path):
    """Two processes race to build one root: both succeed, and the result matches the first build byte for byte."""
    root = tmp_path / "demo-v2"
    code = f"from mmptm.data_pipelines.demo import ensure_demo; ensure_demo({str(root)!r}, seed=0)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    builders = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE) for _ in range(2)]
    for builder in builders:
        _, stderr = builder.communicate(timeout=120)
        assert builder.returncode == 0, stderr.decode()
    assert tree_bytes(root) == tree_bytes(paths.root)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo-v2.lock", "demo-v2"]

    # Asking for another seed rebuilds in place with another split.
    other = ensure_demo(root, seed=1)
    val_keys = {s["__key__"] for s in read_shard(Path(other.val_shards))}
    assert val_keys != {s["__key__"] for s in read_shard(Path(paths.val_shards))}
    assert len(val_keys) == other.num_val == paths.num_val
    assert json.loads((root / "info.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo-v2.lock", "demo-v2"]


def test_existing_build_is_reused(paths):
    before = {p.name: p.stat().st_mtime_ns for p in paths.root.iterdir()}
    assert ensure_demo(paths.root, seed=0) == paths
    assert {p.name: p.stat().st_mtime_ns for p in paths.root.iterdir()} == before


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo.SentencePieceTokenizer, "train", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_demo(tmp_path / "demo-v2")
    assert [p.name for p in tmp_path.iterdir()] == [".demo-v2.lock"]


def test_resolve_maps_demo_names_to_paths(paths, monkeypatch):
    monkeypatch.setenv("MMPTM_CACHE", str(paths.root.parent))
    assert demo_root() == paths.root
    assert resolve("demo:train") == paths.train_shards
    assert resolve("demo:val") == paths.val_shards
    assert resolve("demo:tokenizer") == str(paths.tokenizer)
    assert resolve("demo:classnames") == str(paths.classnames)
    assert resolve("demo:templates") == str(paths.templates)
    assert resolve("/data/shards-{000..009}.tar") == "/data/shards-{000..009}.tar"
    for bad in ("demo:test", "demo:", "demo:Train"):
        with pytest.raises(ValueError, match="demo:train, demo:val, demo:tokenizer, demo:classnames, demo:templates"):
            resolve(bad)


def test_demo_root_default(monkeypatch, tmp_path):
    monkeypatch.delenv("MMPTM_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert demo_root() == tmp_path / ".cache" / "mmptm" / "demo-v2"
