"""What every mmptm data stream shares: shard lists, skip counting, batching, worker splitting, epochs.

A stream turns its input (webdataset shards, or the files of a folder) into
decoded samples, never stopping on bad input: a damaged shard, an undecodable
image, caption, json or label, or a missing part becomes a :class:`Skip` item
that the batcher counts and logs on ``logging.getLogger("mmptm.data")``. Every
batch carries the number of samples skipped since the worker's previous batch
and their ids (``skipped_keys``: ``"<shard url>#<key>"``, or
``"<shard url>#<damaged>"`` for an unreadable region), so that a consumer can
count distinct bad samples across epochs.

:class:`ShardPipeline` is the per-worker webdataset pipeline of the shard
datasets (``image_text``, ``parallel_text``, and per language ``text``): shard list (shuffled and split,
or resampled) → tar reading → [sample split] → shuffle buffer → decode → batch.
A dataset supplies the decoder (raw sample → sample or :class:`Skip`) and the
collate function.

A limit of Python's ``tarfile``: a corrupt header in the middle of a shard ends
that shard quietly, so the samples after it are neither read nor counted (a
truncated local ``.tar`` is detected and counted).
"""

from __future__ import annotations

import atexit
import functools
import glob
import hashlib
import io
import json
import logging
import os
import random
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmptm.data_pipelines.context import DataContext, data_worker_init

logger = logging.getLogger("mmptm.data")

Batch = dict[str, Any]
Collate = Callable[[list[dict[str, Any]], list[str]], Batch]


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
    missing = [url for url in urls if local_path(url) is not None and not os.path.isfile(local_path(url))]
    if missing:
        raise FileNotFoundError(
            f"shards '{shards}': {len(missing)} of {len(urls)} shard files do not exist, e.g. {missing[0]}"
        )
    return urls


def local_path(url: str) -> str | None:
    """The file behind a local URL (plain path or ``file:``), None for remote ones (``pipe:``, ``https:``, ...)."""
    parsed = urlparse(url)
    if parsed.scheme == "":
        return url
    return url2pathname(parsed.path) if parsed.scheme == "file" else None


def _is_truncated(url: str) -> bool:
    """Whether a local uncompressed ``.tar`` lacks the two zero blocks that end every complete tar."""
    path = local_path(url)
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


def derive_seed(*parts: object) -> int:
    """A seed from ``parts`` that is the same in every process (``hash`` of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class Skip:
    """A stream item standing for a sample (or a region of a tar) that could not be used.

    Attributes:
        url: the shard (or folder) the sample came from.
        key: the sample's key (or file path within the folder); None for a damaged region of a tar.
        reason: what is wrong, for the log.
    """

    url: str
    key: str | None
    reason: str

    @property
    def id(self) -> str:
        """``"<shard url>#<key>"``: the same in every epoch, worker and rank."""
        return f"{self.url}#{self.key if self.key is not None else '<damaged>'}"

    def report(self) -> None:
        what = f"sample '{self.key}'" if self.key is not None else "the unreadable rest"
        logger.warning("skipped %s of %s: %s", what, self.url, self.reason)


class BadSample(ValueError):
    """Raised while decoding a sample; its message says what is wrong."""


def json_text_fields(raw: dict[str, Any], names: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """A text sample's json object and its non-empty string fields ``names`` (stripped).

    Raises:
        BadSample: no json, undecodable json (invalid UTF-8 included), not an object, or a field
            missing, empty or not a string.
    """
    if "json" not in raw:
        files = sorted(k for k in raw if not k.startswith("__"))
        raise BadSample(f"no json among its files {files}")
    try:
        meta = json.loads(raw["json"].decode("utf-8"))
    except (ValueError, RecursionError) as err:  # bad UTF-8, bad JSON, absurd nesting
        raise BadSample(f"undecodable json: {err!r}") from None
    if not isinstance(meta, dict):
        raise BadSample(f"json is a {type(meta).__name__}, not an object with {', '.join(names)}")
    fields = {}
    for name in names:
        value = meta.get(name)
        if not isinstance(value, str) or not value.strip():
            raise BadSample(f"json field '{name}' is missing, empty or not a string")
        fields[name] = value.strip()
    return meta, fields


def check_language(lang: str, languages: Sequence[str] | None, field: str = "lang") -> None:
    """Raise ``BadSample`` when ``languages`` is given and ``lang`` is not among them."""
    if languages is not None and lang not in languages:
        raise BadSample(f"json field '{field}' is '{lang}', not one of the languages {', '.join(languages)}")


def decode_image(data: bytes, what: str) -> Image.Image:
    """Decode image bytes to RGB now, so that bad bytes fail here.

    Raises:
        BadSample: undecodable bytes (``what`` names them in the message).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            # convert() of an RGB image is a copy: skip it for the common case (JPEG).
            return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise BadSample(f"undecodable {what} image: {err!r}") from None


class _ReadErrors:
    """One worker's webdataset exception handler: turns damaged shards into ``Skip`` items in the stream.

    Errors become items at the position where they happened, so that they are
    counted once even when all workers read the same shards (sample split) and
    reported with the shard being read. How many samples a damaged shard lost
    cannot be known: each visit of a damaged shard counts as one skip (samples
    left incomplete by the damage are counted as such by the decoder).
    """

    def __init__(self) -> None:
        self.url = "?"
        self._shard_damaged = False
        self._pending: list[Skip] = []

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
            self._pending.append(Skip(self.url, None, reason))

    def interleave(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any] | Skip]:
        """Yield ``samples`` with the errors recorded while reading each one placed before it."""
        for sample in samples:
            yield from self._drain()
            yield sample
        yield from self._drain()

    def _drain(self) -> Iterator[Skip]:
        pending, self._pending = self._pending, []
        yield from pending


def _take_samples(items: Iterable[dict[str, Any] | Skip], limit: int) -> Iterator[dict[str, Any] | Skip]:
    """Pass ``items`` through until ``limit`` good samples have gone by (skips do not count)."""
    if limit <= 0:
        return
    taken = 0
    for item in items:
        yield item
        if not isinstance(item, Skip):
            taken += 1
            if taken == limit:
                return


def worker_quota(epoch_samples: int, batch_size: int, drop_last: bool, worker: int, num_workers: int) -> int:
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


def collate_samples(samples: list[dict[str, Any]], skipped_keys: list[str]) -> Batch:
    """Stack decoded samples into a batch: tensors stacked, ints as a LongTensor, anything else listed.

    The batch also gets ``"skipped"`` and ``"skipped_keys"`` (the samples skipped since the previous batch).
    """
    batch: Batch = {}
    for name, first in samples[0].items():
        values = [sample[name] for sample in samples]
        if torch.is_tensor(first):
            batch[name] = torch.stack(values)
        elif isinstance(first, int):
            batch[name] = torch.tensor(values, dtype=torch.long)
        else:
            batch[name] = values
    batch["skipped"] = len(skipped_keys)
    batch["skipped_keys"] = skipped_keys
    return batch


def batch_samples(
    items: Iterable[dict[str, Any] | Skip], batch_size: int, drop_last: bool, collate: Collate
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
        if isinstance(item, Skip):
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


class WorkerSlot(NamedTuple):
    """Where a DataLoader worker stands: its index among its rank's workers and among all ranks' workers."""

    worker: int
    num_workers: int
    slot: int
    num_slots: int


def worker_slot(context: DataContext) -> WorkerSlot:
    """The calling DataLoader worker's place (worker 0 of 1 outside a worker process)."""
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return WorkerSlot(worker, num_workers, context.rank * num_workers + worker, context.world_size * num_workers)


class SampleDecoder(Protocol):
    """Turns raw webdataset samples (extension -> bytes, plus ``__key__`` and ``__url__``) into samples."""

    def decode_stream(
        self, items: Iterable[dict[str, Any] | Skip], rng: random.Random
    ) -> Iterator[dict[str, Any] | Skip]:
        """Decode every raw sample of ``items`` (a bad one becomes a ``Skip``); ``Skip`` items pass through."""
        ...


class DeterministicDecoder:
    """A :class:`SampleDecoder` that draws nothing: subclasses define ``decode(raw) -> sample | Skip``."""

    def decode(self, raw: dict[str, Any]) -> dict[str, Any] | Skip:
        raise NotImplementedError

    def decode_stream(
        self, items: Iterable[dict[str, Any] | Skip], rng: random.Random  # noqa: ARG002 (nothing is drawn)
    ) -> Iterator[dict[str, Any] | Skip]:
        for item in items:
            yield item if isinstance(item, Skip) else self.decode(item)


class ShardPipeline(IterableDataset):
    """The per-worker webdataset pipeline; built anew at each iteration, for the epoch set in ``epoch``.

    Args:
        urls: the shard URLs.
        context: training flag, seed, rank and world size.
        decoder: raw samples -> samples or ``Skip`` items.
        collate: samples -> a batch.
        batch_size / shuffle_buffer / resample / epoch_samples / drop_last: as the shard datasets' options.
    """

    def __init__(
        self,
        urls: list[str],
        context: DataContext,
        decoder: SampleDecoder,
        collate: Collate,
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
        return batch_samples(self.decoded_samples(), self.batch_size, self.drop_last, self.collate)

    def decoded_samples(self) -> Iterator[dict[str, Any] | Skip]:
        """This worker's decoded samples and ``Skip`` items of the epoch, before batching."""
        ctx = self.context
        worker, num_workers, slot, num_slots = worker_slot(ctx)
        # Seeds differ between the workers of all ranks and between epochs (except the
        # shard order's: all workers must agree on it to split the shards between them).
        here = (ctx.seed, self.epoch, ctx.rank, worker)
        split_samples = self.splits_samples(num_workers)
        errors = _ReadErrors()

        stages: list[Any] = [self._shards(slot, num_slots, split_samples), errors.track]
        stages += [wds.tarfile_to_samples(handler=errors), errors.interleave]
        if split_samples:
            stages.append(lambda items: islice(items, slot, None, num_slots))
        if ctx.training and self.shuffle_buffer > 1:
            # A full buffer before the first sample: better mixing for a short wait (it holds undecoded bytes).
            stages.append(
                wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=derive_seed("samples", *here))
            )
        decode_rng = random.Random(derive_seed("captions", *here))
        stages.append(lambda items: self.decoder.decode_stream(items, decode_rng))
        if self.epoch_samples is not None:
            # Not DataPipeline.with_epoch: it counts batches after the fact and would cut
            # off the final skip count; this counts good samples exactly.
            quota = worker_quota(self.epoch_samples, self.batch_size, self.drop_last, worker, num_workers)
            stages.append(lambda items: _take_samples(items, quota))
        return iter(wds.DataPipeline(*stages))

    def _shards(self, slot: int, num_slots: int, split_samples: bool) -> IterableDataset:
        """The shards this worker reads this epoch (a webdataset source of ``{"url": ...}`` items)."""
        seed = derive_seed("shards", self.context.seed, self.epoch)
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


# Loader iterators whose worker processes may still run, for the exit hook (weak: a finished
# or dropped iterator shuts its workers down itself and leaves the set).
_iterators_with_workers: weakref.WeakSet[Any] = weakref.WeakSet()


def _shut_down_at_exit(iterator: Any) -> None:
    """Have the workers of ``iterator`` (a multi-process DataLoader iterator) shut down when Python exits.

    :func:`~mmptm.data_pipelines.context.data_worker_init` makes workers ignore
    SIGTERM, which is how multiprocessing's own exit hook stops daemonic
    children before joining them: a worker still running at exit (an iterator
    held by a module-level variable, e.g. a ``Trainer``'s streams) would make
    that join wait forever. Each worker is asked to stop as when its iterator
    is deleted, and killed if it has not within torch's status-check interval.
    """
    _register_exit_hook()
    _iterators_with_workers.add(iterator)


@functools.cache
def _register_exit_hook() -> None:
    # Registered once an iterator has started workers, hence after the exit hooks of multiprocessing
    # (joins the workers) and of torch (turns _shutdown_workers into a no-op): atexit runs this first.
    atexit.register(_shut_down_workers)


def _shut_down_workers() -> None:
    for iterator in list(_iterators_with_workers):
        iterator._shutdown_workers()
        for worker in iterator._workers:
            if worker.is_alive():  # still busy with a batch: its terminate() was ignored
                worker.kill()
                worker.join()


class EpochStream:
    """Batches of a pipeline, one epoch per iteration, through a ``DataLoader``.

    Iterating again starts the next epoch (new shuffle seeds); ``set_epoch``
    chooses the epoch of the next iteration explicitly.

    Args:
        pipeline: an ``IterableDataset`` of batches with an ``epoch`` attribute it reads when iterated.
        num_workers: DataLoader worker processes (0: in this process).

    Attributes:
        loader: the ``torch.utils.data.DataLoader`` over the pipeline.
    """

    def __init__(self, pipeline: IterableDataset, num_workers: int) -> None:
        self._pipeline = pipeline
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
        iterator = iter(self.loader)
        if self.loader.num_workers > 0:
            _shut_down_at_exit(iterator)
        return iterator


class ShardStream(EpochStream):
    """An :class:`EpochStream` over a :class:`ShardPipeline`.

    Attributes:
        shards: the shard URLs.
    """

    def __init__(self, pipeline: ShardPipeline, num_workers: int) -> None:
        super().__init__(pipeline, num_workers)
        self.shards = pipeline.urls


def check_stream_options(dataset: str, batch_size: int, num_workers: int) -> None:
    """Raise ``ValueError`` naming ``dataset`` for a batch size below 1 or a negative worker count."""
    if batch_size < 1:
        raise ValueError(f"{dataset}: batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"{dataset}: num_workers must be >= 0, got {num_workers}")


def shard_stream(
    dataset: str,
    shards: str,
    context: DataContext,
    decoder: SampleDecoder,
    collate: Collate,
    *,
    batch_size: int,
    num_workers: int,
    shuffle_buffer: int,
    resample: bool,
    epoch_samples: int | None,
    drop_last: bool | None,
) -> ShardStream:
    """Check a shard dataset's options and build its stream (see the ``image_text`` dataset for the options).

    Args:
        dataset: the dataset's registered name, for error messages.
        shards: the shard specification (:func:`resolve_shards`).
        context: training flag, seed, rank and world size.
        decoder / collate: the dataset's sample decoder and batch collation.
        drop_last: None: ``context.training``.

    Raises:
        FileNotFoundError: missing shards.
        ValueError: invalid options.
    """
    check_stream_options(dataset, batch_size, num_workers)
    if resample and (epoch_samples is None or epoch_samples < 1):
        raise ValueError(f"{dataset}: resample=True needs epoch_samples >= 1 (samples per epoch), got {epoch_samples}")
    if not resample and epoch_samples is not None:
        raise ValueError(f"{dataset}: epoch_samples only applies with resample=True (an epoch is otherwise one pass)")
    pipeline = ShardPipeline(
        resolve_shards(shards),
        context,
        decoder,
        collate,
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
    return ShardStream(pipeline, num_workers)
