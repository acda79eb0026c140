"""Streams of parallel sentence pairs from webdataset shards.

A sample is one ``json`` file ``{"src": str, "tgt": str, "src_lang": str,
"tgt_lang": str}``: a sentence and its translation (the parallel-text shard
format of the design notes). Reading, batching and the counting of bad samples
are :mod:`mmptm.data_pipelines.streams`'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from mmptm.data_pipelines.context import DataContext
from mmptm.data_pipelines.streams import (
    BadSample,
    Batch,
    DeterministicDecoder,
    ShardStream,
    Skip,
    check_language,
    collate_samples,
    json_text_fields,
    shard_stream,
)
from mmptm.registry import register_dataset

PARALLEL_FIELDS = ("src", "tgt", "src_lang", "tgt_lang")


class _ParallelDecoder(DeterministicDecoder):
    """Turns a raw sample into ``{"key", "src", "tgt", "src_lang", "tgt_lang"}`` or a ``Skip``.

    Args:
        languages: the languages a pair may have on either side (None: any).
    """

    def __init__(self, languages: Sequence[str] | None) -> None:
        self.languages = languages

    def decode(self, raw: dict[str, Any]) -> dict[str, Any] | Skip:
        try:
            _, fields = json_text_fields(raw, PARALLEL_FIELDS)
            for side in ("src_lang", "tgt_lang"):
                check_language(fields[side], self.languages, side)
        except BadSample as err:
            return Skip(raw["__url__"], raw["__key__"], str(err))
        return {"key": raw["__key__"], **fields}


class _TokenizingCollate:
    """Strings collated as lists, plus ``src_tokens`` / ``tgt_tokens`` from the tokenizer."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict[str, Any]], skipped_keys: list[str]) -> Batch:
        batch = collate_samples(samples, skipped_keys)
        batch["src_tokens"] = self.tokenizer(batch["src"])
        batch["tgt_tokens"] = self.tokenizer(batch["tgt"])
        return batch



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
    languages: list[str] | None = None,
    tokenize: bool = False,
) -> ShardStream:
    """Batches of sentence pairs from parallel-text webdataset shards.

    Batches are ``{"src": [str], "tgt": [str], "src_lang": [str], "tgt_lang":
    [str], "key": [str], "skipped": int, "skipped_keys": [str]}`` (with
    ``tokenize``, also ``"src_tokens"`` and ``"tgt_tokens"``: ``[B, L]`` from
    ``context.tokenizer``, as TLM, CLWR and CLPC train on), and possibly a last
    ``{"empty": True, ...}`` per worker. A pair with a language outside
    ``languages`` is skipped and counted. Splitting, shuffling, resampling and skip counting are those of
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
        languages: the languages a pair may have (e.g. those the model has embeddings for); None: any.
        tokenize: add the token ids of both sides (needs ``context.tokenizer``).

    Returns:
        A :class:`~mmptm.data_pipelines.streams.ShardStream`.

    Raises:
        FileNotFoundError: missing shards.
        ValueError: invalid options (``tokenize`` without a tokenizer).
    """
    if tokenize and context.tokenizer is None:
        raise ValueError("parallel_text: tokenize=True needs a tokenizer in the data context")
    return shard_stream(
        "parallel_text",
        shards,
        context,
        _ParallelDecoder(languages),
        _TokenizingCollate(context.tokenizer) if tokenize else collate_samples,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        resample=resample,
        epoch_samples=epoch_samples,
        drop_last=drop_last,
    )
