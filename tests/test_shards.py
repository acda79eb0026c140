"""Shard writing (img2dataset layout) from folders, CSV, JSONL and parquet."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from mmptm.data_pipelines.shards import ShardStats, write_shards


def image_bytes(color: tuple[int, int, int], size: tuple[int, int] = (16, 16), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def all_members(stats: ShardStats) -> dict[str, bytes]:
    return {name: data for shard in stats.shards for name, data in tar_members(shard).items()}


def write_folder(root: Path, n: int) -> None:
    """``n`` captioned 16×16 images: jpg, png and webp, in nested folders."""
    formats = [("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp")]
    for i in range(n):
        fmt, suffix = formats[i % 3]
        folder = root / f"part{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:02d}{suffix}").write_bytes(image_bytes((i * 20, 0, 0), fmt=fmt))
        (folder / f"img{i:02d}.txt").write_text(f"a red square number {i}\n", encoding="utf-8")


def test_folder_round_trip(tmp_path):
    write_folder(tmp_path / "src", 5)
    (tmp_path / "src/part0/img00.json").write_text('{"captions": {"fr": ["un carré"]}, "caption": "ignored"}')
    stats = write_shards(tmp_path / "src", tmp_path / "out", samples_per_shard=10)

    assert (stats.num_samples, stats.num_skipped, stats.skipped_reasons) == (5, 0, {})
    assert stats.shards == [tmp_path / "out/00000.tar"]
    members = tar_members(stats.shards[0])
    sources = sorted(p.relative_to(tmp_path / "src").as_posix() for p in (tmp_path / "src").rglob("img*.*"))
    images = [s for s in sources if not s.endswith((".txt", ".json"))]
    for index, source in enumerate(images):  # sorted input order, keys shard * 10**1 + index
        key = f"{index:09d}"
        extension = "jpg" if source.endswith(".jpg") else source.rsplit(".", 1)[1]
        assert members[f"{key}.{extension}"] == (tmp_path / "src" / source).read_bytes()  # original bytes
        meta = json.loads(members[f"{key}.json"])
        caption = (tmp_path / "src" / source).with_suffix(".txt").read_text().strip()
        assert members[f"{key}.txt"].decode() == caption
        assert {k: meta[k] for k in ("key", "caption", "source", "width", "height")} == {
            "key": key,
            "caption": caption,
            "source": source,
            "width": 16,
            "height": 16,
        }
    first = json.loads(members["000000000.json"])
    assert first["source"] == "part0/img00.jpg" and first["captions"] == {"fr": ["un carré"]}
    assert first["caption"] == "a red square number 0"  # the sidecar does not override our fields
    shard_stats = json.loads((tmp_path / "out/00000_stats.json").read_text())
    assert (shard_stats["count"], shard_stats["successes"], shard_stats["failed"]) == (5, 5, 0)


def test_camera_jpegs_with_a_preview_keep_their_bytes(tmp_path):
    """Pillow calls a JPEG with extra images (Multi-Picture Format, many phone photos) "MPO": it is stored
    as the original .jpg, not re-encoded as a PNG several times its size."""
    (tmp_path / "src").mkdir()
    image = Image.new("RGB", (32, 24), (200, 40, 10))
    image.save(tmp_path / "src" / "photo.jpg", format="MPO", save_all=True, append_images=[image])
    assert Image.open(tmp_path / "src" / "photo.jpg").format == "MPO"
    (tmp_path / "src" / "photo.txt").write_text("a camera photo")
    stats = write_shards(tmp_path / "src", tmp_path / "out")
    members = tar_members(stats.shards[0])
    assert members["000000000.jpg"] == (tmp_path / "src" / "photo.jpg").read_bytes()
    assert Image.open(io.BytesIO(members["000000000.jpg"])).size == (32, 24)


def test_csv_and_jsonl_with_relative_paths_aliases_and_extra_columns(tmp_path):
    (tmp_path / "data/images").mkdir(parents=True)
    for i in range(3):
        (tmp_path / f"data/images/{i}.png").write_bytes(image_bytes((0, i * 50, 0)))
    (tmp_path / "data/list.csv").write_text(
        "filepath,text,license\nimages/0.png,zero,cc0\nimages/1.png,one,cc-by\nimages/2.png,two,cc0\n"
    )
    rows = [{"path": f"images/{i}.png", "caption": c, "score": i / 2} for i, c in enumerate(["zero", "one", "two"])]
    (tmp_path / "data/list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    from_csv = write_shards(tmp_path / "data/list.csv", tmp_path / "csv")
    from_jsonl = write_shards(tmp_path / "data/list.jsonl", tmp_path / "jsonl")

    for stats in (from_csv, from_jsonl):
        assert stats.num_samples == 3 and stats.num_skipped == 0
        members = all_members(stats)
        assert [members[f"00000000{i}.txt"].decode() for i in range(3)] == ["zero", "one", "two"]
        assert members["000000001.png"] == (tmp_path / "data/images/1.png").read_bytes()
    assert json.loads(all_members(from_csv)["000000001.json"])["license"] == "cc-by"
    jsonl_meta = json.loads(all_members(from_jsonl)["000000002.json"])
    assert jsonl_meta["score"] == 1.0 and jsonl_meta["source"] == "images/2.png"


def test_explicit_columns_and_missing_column_error(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes((1, 2, 3)))
    (tmp_path / "t.csv").write_text("img,alt\na.png,hello\n")
    stats = write_shards(tmp_path / "t.csv", tmp_path / "out", image_column="img", caption_column="alt")
    assert stats.num_samples == 1
    with pytest.raises(ValueError, match="no image column.*img, alt"):
        write_shards(tmp_path / "t.csv", tmp_path / "out2")


def test_same_input_gives_same_bytes(tmp_path):
    write_folder(tmp_path / "src", 7)
    (tmp_path / "src/part0/bad.png").write_bytes(b"not an image")
    (tmp_path / "src/part0/bad.txt").write_text("x")
    first = write_shards(tmp_path / "src", tmp_path / "a", samples_per_shard=3)
    write_shards(tmp_path / "src", tmp_path / "b", samples_per_shard=3)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert len(first.shards) == 3 and first.num_skipped == 1
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_bad_rows_are_skipped_counted_and_warned(tmp_path, caplog):
    (tmp_path / "good.png").write_bytes(image_bytes((9, 9, 9)))
    (tmp_path / "corrupt.jpg").write_bytes(image_bytes((9, 9, 9), fmt="JPEG")[:40])
    (tmp_path / "rows.jsonl").write_text(
        "\n".join(
            [
                json.dumps({"image": "good.png", "caption": "ok"}),
                json.dumps({"image": "missing.png", "caption": "gone"}),
                json.dumps({"image": "corrupt.jpg", "caption": "broken"}),
                json.dumps({"image": "good.png"}),
                json.dumps({"image": "good.png", "caption": "   "}),
                json.dumps({"image": "https://example.com/x.jpg", "caption": "remote"}),
                "{not json",
                "[1, 2]",
                "",
                json.dumps({"image": "good.png", "caption": "ok again"}),
            ]
        )
        + "\n"
    )
    with caplog.at_level(logging.WARNING, logger="mmptm.data"):
        stats = write_shards(tmp_path / "rows.jsonl", tmp_path / "out")

    assert stats.num_samples == 2 and stats.num_skipped == 7
    assert stats.skipped_reasons == {
        "missing image": 1,
        "unreadable image": 1,
        "missing caption": 2,
        "remote image": 1,
        "bad row": 2,
    }
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 7
    assert any("rows.jsonl line 2" in m and "missing.png" in m for m in messages)
    assert any("rows.jsonl line 3" in m and "unreadable image" in m for m in messages)
    shard_stats = json.loads((tmp_path / "out/00000_stats.json").read_text())
    assert (shard_stats["count"], shard_stats["successes"], shard_stats["failed"]) == (9, 2, 7)
    assert {f["row"] for f in shard_stats["failures"]} >= {"rows.jsonl line 2", "rows.jsonl line 7"}


def test_folder_skips_missing_and_undecodable_captions_and_bad_json(tmp_path):
    write_folder(tmp_path / "src", 4)
    (tmp_path / "src/part0/img00.txt").unlink()
    (tmp_path / "src/part1/img01.txt").write_bytes(b"\xff\xfe caption")
    (tmp_path / "src/part0/img02.json").write_text("[]")
    stats = write_shards(tmp_path / "src", tmp_path / "out")
    assert stats.num_samples == 1
    assert stats.skipped_reasons == {"missing caption": 1, "unreadable caption": 1, "bad json": 1}


def test_shard_rollover_keys_and_max_samples(tmp_path):
    write_folder(tmp_path / "src", 8)
    stats = write_shards(tmp_path / "src", tmp_path / "out", samples_per_shard=3, max_samples=7)
    assert stats.num_samples == 7
    assert [p.name for p in stats.shards] == ["00000.tar", "00001.tar", "00002.tar"]
    keys = [sorted({name.split(".")[0] for name in tar_members(s)}) for s in stats.shards]
    # img2dataset keys: shard * 10**digits(samples_per_shard - 1) + index in shard.
    assert keys == [
        ["000000000", "000000001", "000000002"],
        ["000000010", "000000011", "000000012"],
        ["000000020"],
    ]
    assert sorted(p.name for p in (tmp_path / "out").glob("*_stats.json")) == [
        "00000_stats.json",
        "00001_stats.json",
        "00002_stats.json",
    ]
    assert not list((tmp_path / "out").glob("*.partial"))


def test_resize_shrinks_large_images_only(tmp_path):
    (tmp_path / "big.jpg").write_bytes(image_bytes((200, 10, 10), size=(40, 20), fmt="JPEG"))
    (tmp_path / "small.png").write_bytes(image_bytes((10, 200, 10), size=(8, 6)))
    (tmp_path / "odd.bmp").write_bytes(image_bytes((10, 10, 200), size=(30, 30), fmt="BMP"))
    (tmp_path / "t.csv").write_text("image,caption\nbig.jpg,big\nsmall.png,small\nodd.bmp,bitmap\n")
    members = all_members(write_shards(tmp_path / "t.csv", tmp_path / "out", resize=10))
    big = Image.open(io.BytesIO(members["000000000.jpg"]))
    assert big.size == (20, 10) and big.format == "JPEG"
    assert json.loads(members["000000000.json"])["width"] == 20
    assert members["000000001.png"] == (tmp_path / "small.png").read_bytes()
    assert Image.open(io.BytesIO(members["000000002.png"])).size == (10, 10)  # other formats become PNG


def test_refuses_existing_shards_and_unknown_sources(tmp_path):
    write_folder(tmp_path / "src", 2)
    write_shards(tmp_path / "src", tmp_path / "out")
    with pytest.raises(FileExistsError, match="already holds"):
        write_shards(tmp_path / "src", tmp_path / "out")
    (tmp_path / "list.txt").write_text("x")
    with pytest.raises(ValueError, match="not a folder or a .csv"):
        write_shards(tmp_path / "list.txt", tmp_path / "out2")
    with pytest.raises(FileNotFoundError):
        write_shards(tmp_path / "nowhere", tmp_path / "out3")


HAS_PARQUET_READER = importlib.util.find_spec("pyarrow") is not None


@pytest.mark.skipif(HAS_PARQUET_READER, reason="pyarrow is installed")
def test_parquet_without_pyarrow_says_what_to_install(tmp_path):
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        write_shards(tmp_path / "t.parquet", tmp_path / "out")


@pytest.mark.skipif(not HAS_PARQUET_READER, reason="needs pyarrow")
def test_parquet_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.png").write_bytes(image_bytes((1, 2, 3)))
    pq.write_table(pa.table({"path": ["a.png"], "text": ["hello"], "n": [3]}), tmp_path / "t.parquet")
    members = all_members(write_shards(tmp_path / "t.parquet", tmp_path / "out"))
    assert members["000000000.txt"] == b"hello" and json.loads(members["000000000.json"])["n"] == 3
