"""Monolingual text streams for multilingual masked language modelling, sampled by language.

A sample is one ``json`` file ``{"text": str, "lang": str[, "label": int]}``
(the monolingual text shard format of the design notes); each language has its
own shards. A text of several lines is a document, one sentence per line (blank
lines ignored): its sentences are encoded one by one and separated by ``eos``,
as fairseq's mBART documents. In training, a document that does not fit in
what is left of a row fills it with its leading sentences and continues in the
language's next row (split between sentences, never inside one); with ``pack:
false`` a row holds at most one document and only a document longer than a row
is split (mBART's training instances never cross a document boundary). In
evaluation a row is one sample, cut at ``max_length``. For training, sentences are drawn language by language with
probability ``q_i ∝ p_i^alpha`` (Lample & Conneau 2019, "Cross-lingual Language
Model Pretraining", sec. 3.1; Conneau et al. 2020 (XLM-R), sec. 2), where
``p_i`` is language ``i``'s share of the data, measured by the size of its
shard files as XLM-R measures its CC-100 languages. Consecutive sentences of the
drawn language are packed into one row up to ``max_length`` tokens, separated
by ``eos`` (XLM's streams of sentences, sec. 3.1). Reading, splitting and
skip counting are :mod:`mmptm.data_pipelines.streams`'.
"""

from __future__ import annotations

import glob
import os
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset

from mmptm.data_pipelines.context import DataContext
from mmptm.data_pipelines.demo import resolve
from mmptm.data_pipelines.language_sampling import language_sampling_probs
from mmptm.data_pipelines.streams import (
    BadSample,
    Batch,
    DeterministicDecoder,
    EpochStream,
    ShardPipeline,
    Skip,
    batch_samples,
    check_language,
    check_stream_options,
    derive_seed,
    json_text_fields,
    local_path,
    resolve_shards,
    worker_quota,
    worker_slot,
)
from mmptm.registry import register_dataset

# The label of a sample without one.
NO_LABEL = -1
# Bad samples, with no good one yet and every shard of the language seen among them, after which a
# resampled language is declared unusable (instead of being skipped forever).
MAX_SKIPS_WITHOUT_SAMPLE = 10_000


class _TextDecoder(DeterministicDecoder):
    """Turns a raw sample into ``{"ids", "lang", "label"}`` (ids: the text's pieces) or a ``Skip``.

    Args:
        lang: the language of the shards (a sample claiming another is skipped).
        tokenizer: has ``encode(text) -> [int]``.
    """

    def __init__(self, lang: str, tokenizer: Any) -> None:
        self.lang = lang
        self.tokenizer = tokenizer

    def decode(self, raw: dict[str, Any]) -> dict[str, Any] | Skip:
        try:
            meta, fields = json_text_fields(raw, ("text", "lang"))
            check_language(fields["lang"], [self.lang])
            label = meta.get("label", NO_LABEL)
            if type(label) is not int:
                raise BadSample(f"json field 'label' is {label!r}, not an integer")
        except BadSample as err:
            return Skip(raw["__url__"], raw["__key__"], str(err))
        ids: list[int] = []
        for line in filter(None, map(str.strip, fields["text"].split("\n"))):  # a document: a sentence per line
            ids += [self.tokenizer.eos_id] * bool(ids) + self.tokenizer.encode(line)  # </s> between sentences
        return {"ids": ids, "lang": fields["lang"], "label": label}


class _Rows:
    """Collates id sequences into ``bos + ids + eos`` rows (``eos`` after every packed sentence), padded."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, samples: list[dict[str, Any]], skipped_keys: list[str]) -> Batch:
        tokens = torch.full((len(samples), self.max_length), self.tokenizer.pad_id, dtype=torch.long)
        for row, sample in enumerate(samples):
            ids = [self.tokenizer.bos_id, *sample["ids"]][: self.max_length - 1] + [self.tokenizer.eos_id]
            tokens[row, : len(ids)] = torch.tensor(ids)
        batch: Batch = {
            "tokens": tokens,
            "lang": [sample["lang"] for sample in samples],
            "label": torch.tensor([sample["label"] for sample in samples], dtype=torch.long),
            "skipped": len(skipped_keys),
            "skipped_keys": skipped_keys,
        }
        if hasattr(self.tokenizer, "word_starts"):
            batch["word_starts"] = self.tokenizer.word_starts(tokens)
        return batch


class LanguageSampledPipeline(IterableDataset):
    """One DataLoader worker's batches from per-language shard pipelines.

    With ``epoch_samples`` (training), each language's shards are resampled
    endlessly and every row draws its language with the probabilities
    ``probs``, then packs that language's next sentences; an epoch is
    ``epoch_samples`` rows per rank. Without (evaluation), every language's
    samples are read once, language after language, one sample per row. In training, a
    document (a sample of several sentences) that does not fit in what is left of a row
    continues in the language's next row, split between sentences (with ``pack`` off: only
    one longer than a row, as fairseq's ``complete_doc`` blocks); only a single sentence
    longer than a row is cut.

    Args:
        pipelines: ``{lang: ShardPipeline}`` whose ``decoded_samples`` give ``{"ids", "lang", "label"}``.
        probs: language sampling probabilities.
        context: seed, rank and world size.
        collate: rows -> a batch.
        batch_size / epoch_samples / drop_last: as the ``text`` dataset's options.
        pack: pack several sentences per row (training only).
        max_length: row length, bos and eos included.
    """

    def __init__(
        self,
        pipelines: Mapping[str, ShardPipeline],
        probs: Mapping[str, float],
        context: DataContext,
        collate: _Rows,
        *,
        batch_size: int,
        epoch_samples: int | None,
        drop_last: bool,
        pack: bool,
        max_length: int,
    ) -> None:
        super().__init__()
        self.pipelines = dict(pipelines)
        self.probs = dict(probs)
        self.context = context
        self.collate = collate
        self.batch_size = batch_size
        self.epoch_samples = epoch_samples
        self.drop_last = drop_last
        self.pack = pack
        self.max_length = max_length
        self.epoch = 0

    def __iter__(self) -> Iterator[Batch]:
        for pipeline in self.pipelines.values():
            pipeline.epoch = self.epoch
        rows = self._sampled_rows() if self.epoch_samples is not None else self._one_pass()
        return batch_samples(rows, self.batch_size, self.drop_last, self.collate)

    def _one_pass(self) -> Iterator[dict[str, Any] | Skip]:
        for pipeline in self.pipelines.values():
            yield from pipeline.decoded_samples()

    def _sampled_rows(self) -> Iterator[dict[str, Any] | Skip]:
        worker, num_workers, _, _ = worker_slot(self.context)
        rng = random.Random(derive_seed("languages", self.context.seed, self.epoch, self.context.rank, worker))
        streams = {lang: pipeline.decoded_samples() for lang, pipeline in self.pipelines.items()}
        pending: dict[str, dict[str, Any]] = {}
        bad_shards: dict[str, Counter[str]] = {}  # per language never seen good: bad samples per shard
        seen_good: set[str] = set()
        languages, weights = list(self.probs), list(self.probs.values())
        # Whole batches per worker (each drops its own partial one), as image_text splits an epoch.
        quota = worker_quota(self.epoch_samples, self.batch_size, self.drop_last, worker, num_workers)
        budget = self.max_length - 2  # pieces and separators between bos and the final eos
        eos = self.collate.tokenizer.eos_id
        for _ in range(quota):
            lang = rng.choices(languages, weights)[0]
            row: dict[str, Any] | None = None
            while True:
                sample = pending.pop(lang, None)
                if sample is None:
                    sample = next(streams[lang])
                    if isinstance(sample, Skip):
                        if lang not in seen_good:
                            self._check_not_all_bad(lang, sample, bad_shards.setdefault(lang, Counter()))
                        yield sample
                        continue
                    seen_good.add(lang)
                room = budget if row is None else budget - len(row["ids"]) - 1
                head, rest = leading_sentences(sample["ids"], room, eos, at_least_one=row is None)
                if row is None:
                    row = {**sample, "ids": head}
                elif head:
                    row = {**row, "ids": [*row["ids"], eos, *head]}
                if rest:
                    pending[lang] = {**sample, "ids": rest}  # the next row of this language starts with it
                    break
                if not self.pack:
                    break
            yield row


    def _check_not_all_bad(self, lang: str, skip: Skip, bad_shards: Counter[str]) -> None:
        """Resampled shards whose samples are all bad would be skipped forever: fail, naming the language."""
        bad_shards[skip.url] += 1
        if bad_shards.total() >= MAX_SKIPS_WITHOUT_SAMPLE and set(self.pipelines[lang].urls) <= set(bad_shards):
            raise ValueError(
                f"text: language '{lang}' gave {bad_shards.total()} bad samples from all its "
                f"{len(bad_shards)} shard(s) and no good one (last: {skip.id}: {skip.reason}); fix its shards "
                "or drop it from the stream's 'languages'"
            )


def leading_sentences(ids: list[int], room: int, eos: int, at_least_one: bool) -> tuple[list[int], list[int]]:
    """Split a sample's ids (sentences separated by ``eos``) after its last whole sentence that fits in ``room``.

    Returns:
        ``(head, rest)`` without the ``eos`` between them; with ``at_least_one``, the head holds the first
        sentence even when it alone is longer than ``room`` (the row's collate cuts it).
    """
    ends = [index for index, token in enumerate(ids) if token == eos] + [len(ids)]  # each sentence's end
    fitting = [end for end in ends if end <= room]
    cut = fitting[-1] if fitting else ends[0] if at_least_one else None
    return ([], ids) if cut is None else (ids[:cut], ids[cut + 1 :])


def language_shards(shards: str | Mapping[str, str], languages: Sequence[str] | None) -> dict[str, list[str]]:
    """The shard URLs of each language.

    Args:
        shards: ``{lang: shard spec}``, or a directory (or ``demo:`` name of one) with one
            subdirectory of ``*.tar`` per language.
        languages: the languages to read (None: all).

    Raises:
        FileNotFoundError: no shards, or a language of ``languages`` without any.
    """
    if isinstance(shards, str):
        root = resolve(shards)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"text shards '{shards}': expected a folder with one subfolder per language")
        found = sorted(name for name in os.listdir(root) if glob.glob(os.path.join(glob.escape(root), name, "*.tar")))
        shards = {lang: os.path.join(root, lang) for lang in found}
    missing = [lang for lang in languages or () if lang not in shards]
    if missing or not shards:
        raise FileNotFoundError(
            f"text shards: no shards for language(s) {', '.join(missing) or '(any)'}; found {', '.join(shards)}"
        )
    return {lang: resolve_shards(spec) for lang, spec in shards.items() if languages is None or lang in languages}


def _data_size(urls: Sequence[str]) -> int:
    """Bytes of the local shard files (remote shards count as one byte each: their number then rules)."""
    return sum(os.path.getsize(path) if (path := local_path(url)) is not None else 1 for url in urls)


@register_dataset("text")
def text(
    context: DataContext,
    shards: str | dict[str, str],
    languages: list[str] | None = None,
    alpha: float = 0.3,
    batch_size: int = 64,
    max_length: int | None = None,
    pack: bool = True,
    epoch_samples: int | None = None,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    drop_last: bool | None = None,
) -> EpochStream:
    """Batches of token rows from per-language monolingual text shards, sampled by language.

    Batches are ``{"tokens": [B, max_length], "word_starts": [B, max_length] (whole-word
    masking), "lang": [str], "label": [B] (the json's integer ``label``, -1 without),
    "skipped": int, "skipped_keys": [str]}``. Invalid UTF-8, empty texts, a ``lang``
    other than the shards' language and non-integer labels are skipped and counted.

    Args:
        context: the tokenizer (required), training flag, seed, rank, world size.
        shards: a folder (or ``demo:text_train``) with one subfolder of shards per language, or
            ``{lang: shard spec}``.
        languages: the languages to read (None: every one found).
        alpha: language sampling exponent (XLM 0.5, XLM-R 0.3; 1: natural shares, 0: uniform).
        batch_size: rows per batch.
        max_length: row length, bos and eos included (default: the tokenizer's context length).
        pack: fill rows with consecutive sentences of the drawn language (training only).
        epoch_samples: rows per epoch and rank: language-sampled, resampled streams (training);
            with ``drop_last`` rounded up to whole batches, as ``image_text``'s. None: read every
            sentence once, one per row (evaluation).
        num_workers: DataLoader worker processes (0: in this process).
        shuffle_buffer: samples in each language's shuffle buffer when training.
        drop_last: drop each worker's final partial batch (default: ``context.training``).

    Returns:
        An :class:`~mmptm.data_pipelines.streams.EpochStream`.

    Raises:
        FileNotFoundError: missing shards.
        ValueError: invalid options, or no tokenizer.
    """
    check_stream_options("text", batch_size, num_workers)
    if context.tokenizer is None:
        raise ValueError("text: the data context has no tokenizer")
    if epoch_samples is not None and epoch_samples < 1:
        raise ValueError(f"text: epoch_samples must be >= 1 or None, got {epoch_samples}")
    max_length = context.tokenizer.context_length if max_length is None else max_length
    if max_length < 3:
        raise ValueError(f"text: max_length must be >= 3 (bos, a piece, eos), got {max_length}")
    urls = language_shards(shards, languages)
    sampled = epoch_samples is not None
    pipelines = {
        lang: ShardPipeline(
            lang_urls,
            context,
            _TextDecoder(lang, context.tokenizer),
            _Rows(context.tokenizer, max_length),
            batch_size=batch_size,
            shuffle_buffer=shuffle_buffer,
            resample=sampled,
            epoch_samples=None,
            drop_last=False,
        )
        for lang, lang_urls in urls.items()
    }
    probs = language_sampling_probs({lang: _data_size(lang_urls) for lang, lang_urls in urls.items()}, alpha)
    pipeline = LanguageSampledPipeline(
        pipelines,
        probs,
        context,
        _Rows(context.tokenizer, max_length),
        batch_size=batch_size,
        epoch_samples=epoch_samples,
        drop_last=context.training if drop_last is None else drop_last,
        pack=pack and sampled,
        max_length=max_length,
    )
    return EpochStream(pipeline, num_workers)
