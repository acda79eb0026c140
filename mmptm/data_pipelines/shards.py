"""Write webdataset shards in the img2dataset layout from local images and their captions.

Sources: a folder of images with same-named ``.txt`` captions (and optional
``.json`` metadata), or a CSV, JSONL or parquet table of (image path, caption)
rows. Output: ``00000.tar``, ``00001.tar``, ... holding ``<key>.jpg|png|webp``,
``<key>.txt`` and ``<key>.json``, and per shard ``00000_stats.json``. A row
whose image or caption is missing or unreadable is skipped, counted and logged.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import webdataset as wds
from PIL import Image

logger = logging.getLogger("mmptm.data")

# Image extensions of a sample (readers take the first present when there are several).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Formats stored as they are; any other readable format is re-encoded as PNG. Pillow names JPEGs
# that carry more images (camera and phone photos with a preview: Multi-Picture Format) "MPO";
# their bytes are a JPEG whose first image every reader decodes.
_STORED_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
# Alternative names of the default columns (an explicitly named column has none).
_COLUMN_ALIASES = {"image": ("image", "path", "filepath"), "caption": ("caption", "text", "txt")}

# Fixed tar headers, so that the same input gives byte-identical shards.
TAR_MTIME = 1_704_067_200  # 2024-01-01
TAR_OWNER = "mmptm"
TAR_MODE = 0o644


def open_tar_writer(stream: IO[bytes]) -> wds.TarWriter:
    """A webdataset ``TarWriter`` on ``stream`` with fixed headers (reproducible bytes); samples are bytes."""
    return wds.TarWriter(stream, user=TAR_OWNER, group=TAR_OWNER, mode=TAR_MODE, mtime=TAR_MTIME, encoder=False)


@dataclass
class ShardStats:
    """What :func:`write_shards` wrote.

    Attributes:
        num_samples: samples written.
        num_skipped: input rows skipped.
        shards: the tar files, in order.
        skipped_reasons: number of skipped rows per reason (``"missing image"``, ...).
    """

    num_samples: int
    num_skipped: int
    shards: list[Path]
    skipped_reasons: dict[str, int]


class _Skipped(Exception):
    """A row that cannot become a sample: ``reason`` is a short category, ``detail`` says more."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


@dataclass
class _Record:
    """One input row: where it is (for messages), its image reference, caption and other fields."""

    where: str
    image: Any = None
    caption: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    error: _Skipped | None = None  # found while reading the row itself


def _find_column(names: list[str], column: str, kind: str) -> str | None:
    """``column`` if present, else (for the default name) its first alias present, else None."""
    candidates = _COLUMN_ALIASES[kind] if column == kind else (column,)
    return next((name for name in candidates if name in names), None)


def _columns_or_raise(names: list[str], image_column: str, caption_column: str, source: Path) -> tuple[str, str]:
    """The image and caption columns of a table with the header ``names``."""
    found = []
    for column, kind in ((image_column, "image"), (caption_column, "caption")):
        name = _find_column(names, column, kind)
        if name is None:
            tried = ", ".join(_COLUMN_ALIASES[kind] if column == kind else (column,))
            raise ValueError(f"{source}: no {kind} column (tried {tried}); its columns are {', '.join(names)}")
        found.append(name)
    return found[0], found[1]


def _table_record(where: str, row: dict[str, Any], image_key: str | None, caption_key: str | None) -> _Record:
    extra = {k: v for k, v in row.items() if k not in (image_key, caption_key)}
    return _Record(where, row.get(image_key), row.get(caption_key), extra)


def _folder_records(folder: Path) -> Iterator[_Record]:
    """Images under ``folder`` (recursive, sorted) with their ``.txt`` caption and optional ``.json``."""
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower()[1:] in IMAGE_EXTENSIONS and p.is_file())
    for image in images:
        relative = image.relative_to(folder).as_posix()
        record = _Record(relative, image=relative)
        try:
            record.caption = image.with_suffix(".txt").read_text(encoding="utf-8")
        except FileNotFoundError:
            pass  # reported as a missing caption
        except (OSError, UnicodeDecodeError) as err:
            record.error = _Skipped("unreadable caption", repr(err))
        sidecar = image.with_suffix(".json")
        if record.error is None and sidecar.is_file():
            try:
                record.extra = json.loads(sidecar.read_text(encoding="utf-8"))
                if not isinstance(record.extra, dict):
                    raise ValueError(f"it holds a {type(record.extra).__name__}, not an object")
            except (OSError, ValueError) as err:  # ValueError: bad UTF-8 or JSON
                record.error = _Skipped("bad json", f"{sidecar.name}: {err!r}")
        yield record


def _csv_records(path: Path, image_column: str, caption_column: str) -> Iterator[_Record]:
    with open(path, newline="", encoding="utf-8-sig") as stream:  # -sig: spreadsheets write a BOM
        reader = csv.DictReader(stream)
        image_key, caption_key = _columns_or_raise(list(reader.fieldnames or []), image_column, caption_column, path)
        for number, row in enumerate(reader, start=1):
            row.pop(None, None)  # cells beyond the header
            yield _table_record(f"{path.name} row {number}", row, image_key, caption_key)


def _jsonl_records(path: Path, image_column: str, caption_column: str) -> Iterator[_Record]:
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            where = f"{path.name} line {number}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                yield _Record(where, error=_Skipped("bad row", f"not JSON: {err}"))
                continue
            if not isinstance(row, dict):
                yield _Record(where, error=_Skipped("bad row", f"a {type(row).__name__}, not an object"))
                continue
            names = list(row)
            yield _table_record(
                where, row, _find_column(names, image_column, "image"), _find_column(names, caption_column, "caption")
            )


def _parquet_records(path: Path, image_column: str, caption_column: str) -> Iterator[_Record]:
    try:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    except ImportError:
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow)") from None
        rows = pd.read_parquet(path).to_dict("records")
    if not rows:
        return
    image_key, caption_key = _columns_or_raise(list(rows[0]), image_column, caption_column, path)
    for number, row in enumerate(rows, start=1):
        yield _table_record(f"{path.name} row {number}", row, image_key, caption_key)


def _records(source: Path, image_column: str, caption_column: str) -> Iterator[_Record]:
    if source.is_dir():
        return _folder_records(source)
    readers = {".csv": _csv_records, ".jsonl": _jsonl_records, ".parquet": _parquet_records}
    reader = readers.get(source.suffix.lower())
    if reader is None:
        raise ValueError(f"{source}: not a folder or a {', '.join(readers)} file")
    return reader(source, image_column, caption_column)


def _caption(record: _Record) -> str:
    if not isinstance(record.caption, str) or not record.caption.strip():
        raise _Skipped("missing caption", f"caption is {record.caption!r}")
    return record.caption.strip()


def _read_image(record: _Record, base: Path) -> bytes:
    reference = record.image
    if not isinstance(reference, str) or not reference.strip():
        raise _Skipped("missing image", f"image path is {reference!r}")
    if urlparse(reference).scheme in ("http", "https", "s3", "gs"):
        raise _Skipped("remote image", f"{reference} is a URL; download images first (e.g. with img2dataset)")
    try:
        return (base / reference).read_bytes()
    except FileNotFoundError:
        raise _Skipped("missing image", f"{reference} does not exist") from None
    except OSError as err:
        raise _Skipped("unreadable image", f"{reference}: {err.strerror}") from None


def _stored_image(data: bytes, resize: int | None) -> tuple[bytes, str, tuple[int, int]]:
    """The bytes, extension and size to store: the original unless it must be resized or converted.

    Raises:
        _Skipped: the bytes are not a readable image.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode fully: a truncated file fails here, not in training
            extension = _STORED_FORMATS.get(image.format or "")
            scale = resize / min(image.size) if resize else 1.0
            if extension is not None and scale >= 1:
                return data, extension, image.size
            return _reencoded(image, extension or "png", scale)
    except Image.UnidentifiedImageError:  # its message holds a memory address: keep the stats reproducible
        raise _Skipped("unreadable image", "not an image format PIL can read") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise _Skipped("unreadable image", f"{type(err).__name__}: {err}") from None


def _reencoded(image: Image.Image, extension: str, scale: float) -> tuple[bytes, str, tuple[int, int]]:
    """``image`` shrunk by ``scale`` (if < 1; never enlarged) and encoded as ``extension``."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    # Before resizing: PIL resizes palette images with nearest neighbour only.
    image = image.convert("RGBA" if has_alpha and extension != "jpg" else "RGB")
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    options = {"quality": 95} if extension in ("jpg", "webp") else {}
    image.save(buffer, format={ext: fmt for fmt, ext in _STORED_FORMATS.items()}[extension], **options)
    return buffer.getvalue(), extension, image.size


class _ShardWriter:
    """Fills ``00000.tar``, ``00001.tar``, ... with ``samples_per_shard`` samples each, and their stats.

    A shard is written to ``.tar.partial`` and renamed when complete. Skipped
    rows count towards the shard being filled when they are met.
    """

    def __init__(self, output_dir: Path, samples_per_shard: int) -> None:
        self.output_dir = output_dir
        self.samples_per_shard = samples_per_shard
        # img2dataset's keys: shard index, then the sample index within the shard.
        self.index_digits = len(str(samples_per_shard - 1))
        self.shard = 0
        self.shards: list[Path] = []
        self.num_samples = 0
        self.skipped_reasons: dict[str, int] = {}
        self._stream: IO[bytes] | None = None
        self._tar: wds.TarWriter | None = None
        self._successes = 0
        self._failures: list[dict[str, str]] = []

    def next_key(self) -> str:
        """The key of the next sample, starting a new shard when this one is full."""
        if self._successes == self.samples_per_shard:
            self._finish_shard()
            self.shard += 1
        return f"{self.shard * 10**self.index_digits + self._successes:09d}"

    def write(self, sample: dict[str, Any]) -> None:
        """Add ``sample`` (``__key__`` from :meth:`next_key`, extension -> bytes)."""
        if self._tar is None:
            self._stream = open(self._path(".tar.partial"), "wb")
            self._tar = open_tar_writer(self._stream)
        self._tar.write(sample)
        self._successes += 1
        self.num_samples += 1

    def skip(self, where: str, error: _Skipped) -> None:
        logger.warning("skipped %s: %s (%s)", where, error.reason, error.detail)
        self._failures.append({"row": where, "reason": error.reason, "detail": error.detail})
        self.skipped_reasons[error.reason] = self.skipped_reasons.get(error.reason, 0) + 1

    def close(self) -> None:
        """Finish the last shard."""
        self._finish_shard()

    def _path(self, suffix: str) -> Path:
        return self.output_dir / f"{self.shard:05d}{suffix}"

    def _finish_shard(self) -> None:
        if self._tar is not None and self._stream is not None:
            self._tar.close()
            self._stream.close()
            self._path(".tar.partial").replace(self._path(".tar"))
            self.shards.append(self._path(".tar"))
            self._tar = self._stream = None
        if self._successes or self._failures:
            stats = {
                "count": self._successes + len(self._failures),
                "successes": self._successes,
                "failed": len(self._failures),
                "failures": self._failures,
            }
            self._path("_stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n", "utf-8")
        self._successes, self._failures = 0, []


def write_shards(
    source: str | Path,
    output_dir: str | Path,
    *,
    samples_per_shard: int = 10000,
    image_column: str = "image",
    caption_column: str = "caption",
    resize: int | None = None,
    max_samples: int | None = None,
) -> ShardStats:
    """Write webdataset shards (img2dataset layout) from images and captions.

    A sample is ``<key>.jpg|png|webp`` (the original bytes; re-encoded only
    when resized, or as PNG for other formats), ``<key>.txt`` (the caption)
    and ``<key>.json`` (``key``, ``caption``, ``source`` — the path as given,
    relative to a source folder —, ``width``, ``height``, then the row's other
    columns or the folder sample's ``.json``). Keys are ``%09d`` of
    ``shard * 10**d + index``, ``d`` the digits of ``samples_per_shard - 1``.
    The same input gives byte-identical files.

    Args:
        source: a folder (images with same-named ``.txt`` captions, recursive), or a
            ``.csv``, ``.jsonl`` or ``.parquet`` table (parquet needs pyarrow) whose
            image paths are relative to the table's folder.
        output_dir: where the shards go (created; must hold no ``*.tar`` yet).
        samples_per_shard: samples per tar file (the last may hold fewer).
        image_column: the table's image path column (default ``image``; also ``path``, ``filepath``).
        caption_column: the table's caption column (default ``caption``; also ``text``, ``txt``).
        resize: shrink images whose shorter side is longer than this, re-encoding them.
        max_samples: stop after writing this many samples.

    Returns:
        :class:`ShardStats`.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        FileExistsError: ``output_dir`` already holds shards.
        ValueError: an unsupported source, or a table without the image or caption column.
    """
    source, output_dir = Path(source), Path(output_dir)
    if not source.exists():
        raise FileNotFoundError(f"source {source} does not exist")
    if samples_per_shard < 1 or (resize is not None and resize < 1) or (max_samples is not None and max_samples < 0):
        raise ValueError(
            f"samples_per_shard and resize must be >= 1 and max_samples >= 0 "
            f"(got {samples_per_shard}, {resize}, {max_samples})"
        )
    records = _records(source, image_column, caption_column)
    output_dir.mkdir(parents=True, exist_ok=True)
    if any(output_dir.glob("*.tar")):
        # Stale shards from an earlier run would be read along with the new ones.
        raise FileExistsError(f"{output_dir} already holds *.tar shards; remove them or choose another folder")
    base = source if source.is_dir() else source.parent
    writer = _ShardWriter(output_dir, samples_per_shard)
    for record in records:
        if max_samples is not None and writer.num_samples >= max_samples:
            break
        try:
            if record.error is not None:
                raise record.error
            caption = _caption(record)
            image, extension, (width, height) = _stored_image(_read_image(record, base), resize)
        except _Skipped as error:
            writer.skip(record.where, error)
            continue
        key = writer.next_key()
        meta = {"key": key, "caption": caption, "source": record.image, "width": width, "height": height}
        meta.update((k, v) for k, v in record.extra.items() if k not in meta)
        writer.write(
            {
                "__key__": key,
                extension: image,
                "txt": caption.encode("utf-8"),
                # default=str: parquet cells can be dates, decimals, ...
                "json": json.dumps(meta, ensure_ascii=False, default=str).encode("utf-8"),
            }
        )
    writer.close()
    return ShardStats(writer.num_samples, sum(writer.skipped_reasons.values()), writer.shards, writer.skipped_reasons)
