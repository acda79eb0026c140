"""Streams of parallel sentence pairs from webdataset shards.

A sample is one ``json`` file ``{"src": str, "tgt": str, "src_lang": str,
"tgt_lang": str}``: a sentence and its translation (the parallel-text shard
format of the design notes). Reading, batching and the counting of bad samples
are :mod:`mmptm.data_pipelines.streams`'.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from typing import Any

from mmptm.data_pipelines.context import DataContext
from mmptm.data_pipelines.streams import BadSample, ShardStream, Skip, collate_samples, shard_stream
from mmptm.registry import register_dataset

PARALLEL_FIELDS = ("src", "tgt", "src_lang", "tgt_lang")


class _ParallelDecoder:
    """Turns a raw sample into ``{"key", "src", "tgt", "src_lang", "tgt_lang"}`` or a ``Skip``."""

    def decode_stream(
        self, items: Iterable[dict[str, Any] | Skip], rng: random.Random  # noqa: ARG002 (nothing is drawn)
    ) -> Iterator[dict[str, Any] | Skip]:
        """Decode every raw sample of ``items``; ``Skip`` items pass through."""
        for item in items:
            yield item if isinstance(item, Skip) else self.decode(item)

    @staticmethod
    def decode(raw: dict[str, Any]) -> dict[str, Any] | Skip:
        try:
            return {"key": raw["__key__"], **_parallel_fields(raw)}
        except BadSample as err:
            return Skip(raw["__url__"], raw["__key__"], str(err))


def _parallel_fields(raw: dict[str, Any]) -> dict[str, str]:
    """The four non-empty string fields of a sample's json.

    Raises:
        BadSample: no json, undecodable json, or a field missing, empty or not a string.
    """
    if "json" not in raw:
        files = sorted(k for k in raw if not k.startswith("__"))
        raise BadSample(f"no json among its files {files}")
    try:
        meta = json.loads(raw["json"].decode("utf-8"))
    except (ValueError, RecursionError) as err:  # bad UTF-8, bad JSON, absurd nesting
        raise BadSample(f"undecodable json: {err!r}") from None
    if not isinstance(meta, dict):
        raise BadSample(f"json is a {type(meta).__name__}, not an object with {', '.join(PARALLEL_FIELDS)}")
    fields = {}
    for name in PARALLEL_FIELDS:
        value = meta.get(name)
        if not isinstance(value, str) or not value.strip():
            raise BadSample(f"json field '{name}' is missing, empty or not a string")
        fields[name] = value.strip()
    return fields


@register_dataset("parallel_text")
def parallel_text(
    context: DataContext,
    shards: str,
    batch_size: int = 256,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    resample: bool = False,
    epoch_samples: int | None = None,
    drop_last: bool | None = None,
) -> ShardStream:
    """Batches of sentence pairs from parallel-text webdataset shards.

    Batches are ``{"src": [str], "tgt": [str], "src_lang": [str], "tgt_lang":
    [str], "key": [str], "skipped": int, "skipped_keys": [str]}`` (text stays
    text: consumers tokenise it), and possibly a last ``{"empty": True, ...}``
    per worker. Splitting, shuffling, resampling and skip counting are those of
    the ``image_text`` dataset, whose options these are.

    Args:
        context: training flag, seed, rank, world size.
        shards: shard URLs/brace pattern, a directory of ``*.tar`` or ``::``-separated parts.
        batch_size: pairs per batch.
        num_workers: DataLoader worker processes (0: in this process).
        shuffle_buffer: samples in the shuffle buffer when training (0 or 1: no sample shuffle).
        resample: draw shards with replacement, endlessly; an epoch is then ``epoch_samples`` pairs.
        epoch_samples: pairs per epoch and rank with ``resample`` (required with it, invalid without).
        drop_last: drop each worker's final partial batch (default: ``context.training``).

    Returns:
        A :class:`~mmptm.data_pipelines.streams.ShardStream`.

    Raises:
        FileNotFoundError: missing shards.
        ValueError: invalid options.
    """
    return shard_stream(
        "parallel_text",
        shards,
        context,
        _ParallelDecoder(),
        collate_samples,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        resample=resample,
        epoch_samples=epoch_samples,
        drop_last=drop_last,
    )
