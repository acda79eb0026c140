"""Streams of image-text batches from webdataset shards (the img2dataset layout).

A sample is files sharing a key: an image (``jpg|jpeg|png|webp``), a caption
(``txt``), optionally a ``json`` with captions per language
(``{"captions": {lang: str | [str, ...]}}``) and a label file (e.g. ``cls``).

Per DataLoader worker the stream runs: shard list (shuffled and split, or
resampled) → tar reading → [sample split] → shuffle buffer → decode → batch.
Bad input never stops it: a damaged shard, an undecodable image, caption,
json or label, or a missing part becomes a ``_Skip`` item that the batcher
counts and logs on ``logging.getLogger("mmptm.data")``; every batch carries
the number of samples skipped since the worker's previous batch and their ids
(``skipped_keys``: ``"<shard url>#<key>"``, or ``"<shard url>#<damaged>"`` for
an unreadable region), so that a consumer can count distinct bad samples
across epochs.

A limit of Python's ``tarfile``: a corrupt header in the middle of a shard ends
that shard quietly, so the samples after it are neither read nor counted (a
truncated local ``.tar`` is detected and counted).
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmptm.data_pipelines.context import DataContext, data_worker_init
from mmptm.data_pipelines.shards import IMAGE_EXTENSIONS
from mmptm.data_pipelines.transforms import image_transform
from mmptm.registry import register_dataset

logger = logging.getLogger("mmptm.data")


def resolve_shards(shards: str) -> list[str]:
    """Expand a shard specification into shard URLs.

    Args:
        shards: ``::``-separated parts, each a ``demo:<split>`` name, a directory
            (all its ``*.tar``, sorted) or a webdataset URL / brace pattern
            (``/data/{00000..00099}.tar``).

    Returns:
        The shard URLs, in order.

    Raises:
        FileNotFoundError: a directory without ``*.tar`` or a local shard that does not exist.
    """
    from mmptm.data_pipelines.demo import resolve  # builds the demo data on first use: import only when asked

    urls: list[str] = []
    for part in shards.split("::"):
        part = resolve(part)
        if os.path.isdir(part):
            tars = sorted(glob.glob(os.path.join(glob.escape(part), "*.tar")))
            if not tars:
                raise FileNotFoundError(f"shards '{shards}': directory {part} has no *.tar files")
            urls.extend(tars)
        else:
            urls.extend(wds.shardlists.expand_urls(part))
    missing = [url for url in urls if _local_path(url) is not None and not os.path.isfile(_local_path(url))]
    if missing:
        raise FileNotFoundError(
            f"shards '{shards}': {len(missing)} of {len(urls)} shard files do not exist, e.g. {missing[0]}"
        )
    return urls


def _local_path(url: str) -> str | None:
    """The file behind a local URL (plain path or ``file:``), None for remote ones (``pipe:``, ``https:``, ...)."""
    parsed = urlparse(url)
    if parsed.scheme == "":
        return url
    return url2pathname(parsed.path) if parsed.scheme == "file" else None


def _is_truncated(url: str) -> bool:
    """Whether a local uncompressed ``.tar`` lacks the two zero blocks that end every complete tar."""
    path = _local_path(url)
    if path is None or not path.endswith(".tar"):
        return False
    try:
        with open(path, "rb") as stream:
            size = stream.seek(0, os.SEEK_END)
            stream.seek(max(size - 1024, 0))
            tail = stream.read()
    except OSError:
        return False  # the reader reports it
    return size % 512 != 0 or len(tail) < 1024 or any(tail)


def _derive_seed(*parts: object) -> int:
    """A seed from ``parts`` that is the same in every process (``hash`` of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class _Skip:
    """A stream item standing for a sample (or a region of a tar) that could not be used."""

    url: str
    key: str | None
    reason: str

    @property
    def id(self) -> str:
        """``"<shard url>#<key>"``: the same in every epoch, worker and rank."""
        return f"{self.url}#{self.key if self.key is not None else '<damaged>'}"

    def report(self) -> None:
        what = f"sample '{self.key}'" if self.key is not None else "the unreadable rest"
        logger.warning("skipped %s of shard %s: %s", what, self.url, self.reason)


class _BadSample(ValueError):
    """Raised while decoding a sample; its message says what is wrong."""


class _ReadErrors:
    """One worker's webdataset exception handler: turns damaged shards into ``_Skip`` items in the stream.

    Errors become items at the position where they happened, so that they are
    counted once even when all workers read the same shards (sample split) and
    reported with the shard being read. How many samples a damaged shard lost
    cannot be known: each visit of a damaged shard counts as one skip (samples
    left incomplete by the damage are counted as such by the decoder).
    """

    def __init__(self) -> None:
        self.url = "?"
        self._shard_damaged = False
        self._pending: list[_Skip] = []

    def track(self, shards: Iterable[dict[str, str]]) -> Iterator[dict[str, str]]:
        """Pass the shard stream through, remembering the shard the tar reader is on."""
        for shard in shards:
            # The reader asks for the next shard only when it is done with the previous one.
            self.url, self._shard_damaged = shard["url"], False
            if _is_truncated(shard["url"]):
                # tarfile ends a truncated archive quietly when the cut falls in a header.
                self._record("truncated: the file does not end with the tar end-of-archive blocks")
            yield shard

    def __call__(self, error: Exception) -> bool:
        self._record(f"tar read error: {error!r}")
        return True  # go on with the next file or shard

    def _record(self, reason: str) -> None:
        # Once a tar stream breaks, later errors in that shard are the same damage.
        if not self._shard_damaged:
            self._shard_damaged = True
            self._pending.append(_Skip(self.url, None, reason))

    def interleave(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any] | _Skip]:
        """Yield ``samples`` with the errors recorded while reading each one placed before it."""
        for sample in samples:
            yield from self._drain()
            yield sample
        yield from self._drain()

    def _drain(self) -> Iterator[_Skip]:
        pending, self._pending = self._pending, []
        yield from pending


class _SampleDecoder:
    """Turns a raw webdataset sample into ``{"image", "caption", "key"[, "label"]}`` or a ``_Skip``.

    Args:
        transform: PIL image -> tensor.
        caption_key: extension of the caption file.
        caption_languages: languages to draw json captions from (None: any).
        label_key: extension of the integer label file (None: no label).
    """

    def __init__(
        self,
        transform: Callable[[Image.Image], torch.Tensor],
        caption_key: str,
        caption_languages: list[str] | None,
        label_key: str | None,
    ) -> None:
        self.transform = transform
        self.caption_key = caption_key
        self.caption_languages = caption_languages
        self.label_key = label_key

    def decode_stream(
        self, items: Iterable[dict[str, Any] | _Skip], rng: random.Random
    ) -> Iterator[dict[str, Any] | _Skip]:
        """Decode every raw sample of ``items``; ``_Skip`` items pass through."""
        for item in items:
            yield item if isinstance(item, _Skip) else self.decode(item, rng)

    def decode(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any] | _Skip:
        """Decode one raw sample (extension -> bytes, plus ``__key__`` and ``__url__``)."""
        try:
            sample = {"key": raw["__key__"], "caption": self._caption(raw, rng)}
            if self.label_key is not None:
                sample["label"] = self._label(raw)
            # Last: the costly part, done only for samples that are otherwise complete.
            sample["image"] = self.transform(self._image(raw))
        except _BadSample as err:
            return _Skip(raw["__url__"], raw["__key__"], str(err))
        return sample

    @staticmethod
    def _image(raw: dict[str, Any]) -> Image.Image:
        ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if ext is None:
            files = sorted(k for k in raw if not k.startswith("__"))
            raise _BadSample(f"no image ({'|'.join(IMAGE_EXTENSIONS)}) among its files {files}")
        try:
            with Image.open(io.BytesIO(raw[ext])) as image:
                return image.convert("RGB")  # decodes now, so that bad bytes fail here
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            raise _BadSample(f"undecodable {ext} image: {err!r}") from None

    def _caption(self, raw: dict[str, Any], rng: random.Random) -> str:
        by_language = _json_captions(raw)
        if by_language:
            languages = [
                lang for lang in by_language if self.caption_languages is None or lang in self.caption_languages
            ]
            if not languages:
                raise _BadSample(f"no caption in languages {self.caption_languages} (has {sorted(by_language)})")
            return rng.choice(by_language[rng.choice(languages)])
        data = raw.get(self.caption_key)
        if data is None:
            raise _BadSample(f"no caption (no '{self.caption_key}' file and no json captions)")
        try:
            caption = data.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise _BadSample(f"'{self.caption_key}' caption is not UTF-8: {err}") from None
        if not caption:
            raise _BadSample(f"empty '{self.caption_key}' caption")
        return caption

    def _label(self, raw: dict[str, Any]) -> int:
        data = raw.get(self.label_key)
        if data is None:
            raise _BadSample(f"no label ('{self.label_key}' file)")
        try:
            return int(data.decode("utf-8").strip())
        except ValueError:  # UnicodeDecodeError is a ValueError
            raise _BadSample(f"'{self.label_key}' label is not an integer: {data[:32]!r}") from None


def _json_captions(raw: dict[str, Any]) -> dict[str, list[str]]:
    """The non-empty captions per language of a sample's json (empty when it has none).

    Raises:
        _BadSample: the json is not UTF-8 JSON.
    """
    if "json" not in raw:
        return {}
    try:
        meta = json.loads(raw["json"].decode("utf-8"))
    except (ValueError, RecursionError) as err:  # bad UTF-8, bad JSON, absurd nesting
        raise _BadSample(f"undecodable json: {err!r}") from None
    captions = meta.get("captions") if isinstance(meta, dict) else None
    if not isinstance(captions, dict):
        return {}
    by_language = {}
    for language, value in captions.items():
        texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        texts = [text.strip() for text in texts if isinstance(text, str) and text.strip()]
        if texts:
            by_language[language] = texts
    return by_language


def _take_samples(items: Iterable[dict[str, Any] | _Skip], limit: int) -> Iterator[dict[str, Any] | _Skip]:
    """Pass ``items`` through until ``limit`` good samples have gone by (skips do not count)."""
    if limit <= 0:
        return
    taken = 0
    for item in items:
        yield item
        if not isinstance(item, _Skip):
            taken += 1
            if taken == limit:
                return


def _worker_quota(epoch_samples: int, batch_size: int, drop_last: bool, worker: int, num_workers: int) -> int:
    """One worker's share of a rank's ``epoch_samples``: whole batches, and the remainder to one worker.

    With ``drop_last`` the remainder is rounded up to a whole batch, so an epoch
    is never shorter than ``epoch_samples``.
    """
    batches, remainder = divmod(epoch_samples, batch_size)
    if remainder and drop_last:
        batches, remainder = batches + 1, 0
    quota = (batches // num_workers + (worker < batches % num_workers)) * batch_size
    # The worker next in line for a whole batch takes the partial one.
    return quota + (remainder if worker == batches % num_workers else 0)


Batch = dict[str, Any]
Collate = Callable[[list[dict[str, Any]], list[str]], Batch]


def _batches(
    items: Iterable[dict[str, Any] | _Skip], batch_size: int, drop_last: bool, collate: Collate
) -> Iterator[Batch]:
    """Group decoded samples into batches, counting and reporting the skipped ones.

    Each batch gets the ids of the samples skipped since the previous one; a
    final ``{"empty": True, "skipped": n, "skipped_keys": [...]}`` carries those
    still pending at the end (or says that this worker produced no batch), so
    that totals are exact.
    """
    samples: list[dict[str, Any]] = []
    skipped: list[str] = []
    produced = False
    for item in items:
        if isinstance(item, _Skip):
            item.report()
            skipped.append(item.id)
            continue
        samples.append(item)
        if len(samples) == batch_size:
            yield collate(samples, skipped)
            samples, skipped, produced = [], [], True
    if samples and not drop_last:
        yield collate(samples, skipped)
        skipped, produced = [], True
    if skipped or not produced:
        yield {"empty": True, "skipped": len(skipped), "skipped_keys": skipped}


class _Collate:
    """Stacks decoded samples into a batch and tokenises the captions (picklable for DataLoader workers)."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor] | None, with_label: bool) -> None:
        self.tokenizer = tokenizer
        self.with_label = with_label

    def __call__(self, samples: list[dict[str, Any]], skipped_keys: list[str]) -> Batch:
        captions = [s["caption"] for s in samples]
        batch: Batch = {
            "image": torch.stack([s["image"] for s in samples]),
            "caption": captions,
            "key": [s["key"] for s in samples],
            "skipped": len(skipped_keys),
            "skipped_keys": skipped_keys,
        }
        if self.tokenizer is not None:
            batch["text"] = self.tokenizer(captions)
        if self.with_label:
            batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
        return batch


class _ImageTextPipeline(IterableDataset):
    """The per-worker webdataset pipeline; built anew at each iteration, for the epoch set in ``epoch``."""

    def __init__(
        self,
        urls: list[str],
        context: DataContext,
        decoder: _SampleDecoder,
        collate: _Collate,
        *,
        batch_size: int,
        shuffle_buffer: int,
        resample: bool,
        epoch_samples: int | None,
        drop_last: bool,
    ) -> None:
        super().__init__()
        self.urls = urls
        self.context = context
        self.decoder = decoder
        self.collate = collate
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.resample = resample
        self.epoch_samples = epoch_samples
        self.drop_last = drop_last
        self.epoch = 0

    def splits_samples(self, num_workers: int) -> bool:
        """Whether there are too few shards for one per worker, so that workers split samples instead."""
        return not self.resample and len(self.urls) < self.context.world_size * max(num_workers, 1)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        ctx = self.context
        # Seeds differ between the workers of all ranks and between epochs (except the
        # shard order's: all workers must agree on it to split the shards between them).
        here = (ctx.seed, self.epoch, ctx.rank, worker)
        # This worker's place among the workers of all ranks.
        slot, num_slots = ctx.rank * num_workers + worker, ctx.world_size * num_workers
        split_samples = self.splits_samples(num_workers)
        errors = _ReadErrors()

        stages: list[Any] = [self._shards(slot, num_slots, split_samples), errors.track]
        stages += [wds.tarfile_to_samples(handler=errors), errors.interleave]
        if split_samples:
            stages.append(lambda items: islice(items, slot, None, num_slots))
        if ctx.training and self.shuffle_buffer > 1:
            # A full buffer before the first sample: better mixing for a short wait (it holds undecoded bytes).
            stages.append(
                wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=_derive_seed("samples", *here))
            )
        captions_rng = random.Random(_derive_seed("captions", *here))
        stages.append(lambda items: self.decoder.decode_stream(items, captions_rng))
        if self.epoch_samples is not None:
            # Not DataPipeline.with_epoch: it counts batches after the fact and would cut
            # off the final skip count; this counts good samples exactly.
            quota = _worker_quota(self.epoch_samples, self.batch_size, self.drop_last, worker, num_workers)
            stages.append(lambda items: _take_samples(items, quota))
        stages.append(lambda items: _batches(items, self.batch_size, self.drop_last, self.collate))
        return iter(wds.DataPipeline(*stages))

    def _shards(self, slot: int, num_slots: int, split_samples: bool) -> IterableDataset:
        """The shards this worker reads this epoch (a webdataset source of ``{"url": ...}`` items)."""
        seed = _derive_seed("shards", self.context.seed, self.epoch)
        if self.resample:
            # Every worker of every rank draws its own shards, with replacement, endlessly.
            return wds.ResampledShards(self.urls, seed=seed, worker_seed=lambda: slot, deterministic=True)
        urls = list(self.urls)
        if self.context.training:
            random.Random(seed).shuffle(urls)
        if not split_samples:
            # What split_by_node + split_by_worker do, with this run's rank rather than torch.distributed's.
            urls = urls[slot::num_slots]
        return wds.SimpleShardList(urls)  # not empty: without split_samples every worker has a shard


class ImageTextStream:
    """Batches of image-text shards; each iteration is one epoch.

    Iterating again starts the next epoch (new shuffle seeds); ``set_epoch``
    chooses the epoch of the next iteration explicitly.

    Attributes:
        shards: the shard URLs.
        loader: the ``torch.utils.data.DataLoader`` over the pipeline.
    """

    def __init__(self, pipeline: _ImageTextPipeline, num_workers: int) -> None:
        self._pipeline = pipeline
        self.shards = pipeline.urls
        self.loader = DataLoader(
            pipeline,
            batch_size=None,
            num_workers=num_workers,
            persistent_workers=False,
            worker_init_fn=data_worker_init,
        )
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch`` (it seeds the shard and sample shuffles)."""
        self._next_epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        # Workers start (and take their copy of the pipeline) when the loader's iterator is made.
        self._pipeline.epoch = self._next_epoch
        self._next_epoch += 1
        return iter(self.loader)


@register_dataset("image_text")
def image_text(
    context: DataContext,
    shards: str,
    batch_size: int = 256,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    resample: bool = False,
    epoch_samples: int | None = None,
    caption_languages: list[str] | None = None,
    caption_key: str = "txt",
    label_key: str | None = None,
    augment_scale: tuple[float, float] = (0.9, 1.0),
    drop_last: bool | None = None,
) -> ImageTextStream:
    """Image-text batches from webdataset shards (img2dataset layout).

    Batches are ``{"image": [B,3,H,W], "text": [B,L] (context.tokenizer of the
    captions; absent without a tokenizer), "caption": [str], "key": [str],
    "skipped": int, "skipped_keys": [str][, "label": [B]]}``, and possibly a
    last ``{"empty": True, "skipped": n, "skipped_keys": [...]}`` per worker.
    Bad samples are skipped, counted and logged; ``skipped_keys`` names them
    (``"<shard url>#<key>"``, the same in every epoch).

    Without ``resample`` one iteration reads every sample once across all
    workers and ranks: shards are split between them; when there are fewer
    shards than ``world_size × max(num_workers, 1)``, every worker reads all
    shards and keeps every n-th sample instead (exact, but each reads all
    bytes). Ranks can get different numbers of batches that way: use
    ``resample`` for multi-process training.

    Args:
        context: tokenizer, image size and normalisation, training flag, seed, rank, world size.
        shards: shard URLs/brace pattern, a directory of ``*.tar``, ``::``-separated parts, or ``demo:train``.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes (0: in this process).
        shuffle_buffer: samples in the shuffle buffer when training (0 or 1: no sample shuffle).
        resample: draw shards with replacement, endlessly; an epoch is then ``epoch_samples`` samples.
        epoch_samples: samples per epoch and rank with ``resample`` (required with it, invalid without);
            with ``drop_last`` rounded up to whole batches.
        caption_languages: languages of the json captions to draw from (None: all the sample has);
            a sample with json captions but none in these languages is skipped.
        caption_key: extension of the caption file, used when the json has no captions.
        label_key: extension of an integer label file (e.g. ``cls``) to return as ``"label"``.
        augment_scale: area range of the training random crop.
        drop_last: drop each worker's final partial batch (default: ``context.training``).

    Returns:
        An :class:`ImageTextStream`.

    Raises:
        FileNotFoundError: missing shards.
        ValueError: invalid options.
    """
    if batch_size < 1:
        raise ValueError(f"image_text: batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"image_text: num_workers must be >= 0, got {num_workers}")
    if resample and (epoch_samples is None or epoch_samples < 1):
        raise ValueError(f"image_text: resample=True needs epoch_samples >= 1 (samples per epoch), got {epoch_samples}")
    if not resample and epoch_samples is not None:
        raise ValueError("image_text: epoch_samples only applies with resample=True (an epoch is otherwise one pass)")
    decoder = _SampleDecoder(
        image_transform(context.image_size, context.image_mean, context.image_std, context.training, augment_scale),
        caption_key=caption_key,
        caption_languages=caption_languages,
        label_key=label_key,
    )
    pipeline = _ImageTextPipeline(
        resolve_shards(shards),
        context,
        decoder,
        _Collate(context.tokenizer, with_label=label_key is not None),
        batch_size=batch_size,
        shuffle_buffer=shuffle_buffer,
        resample=resample,
        epoch_samples=epoch_samples,
        drop_last=context.training if drop_last is None else drop_last,
    )
    if pipeline.splits_samples(num_workers):
        logger.info(
            "%d shard(s) for %d rank(s) × %d worker(s): each worker reads every shard and keeps its share of samples",
            len(pipeline.urls),
            context.world_size,
            max(num_workers, 1),
        )
    return ImageTextStream(pipeline, num_workers)
