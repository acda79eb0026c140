"""Synthetic parallel text: a number written out in two languages by ``num2words``.

A bilingual dictionary of the number vocabulary in every language ``num2words``
knows, generated on the fly, so a run can align languages that no parallel
corpus at hand covers (the demo's Dutch and Polish). Word-level translation
pairs are the cheapest cross-lingual supervision there is (Lample et al. 2018,
"Word translation without parallel data", use such dictionaries as seeds);
here they teach a text tower the number words its image captions use in only
a few languages. Batches have the layout of the ``parallel_text`` dataset, so
``text_alignment``, ``tlm``, ``clwr`` and ``clpc`` read them unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from num2words import num2words

from mmptm.data_pipelines.context import DataContext
from mmptm.data_pipelines.streams import derive_seed
from mmptm.registry import register_dataset


@register_dataset("number_pairs")
class NumberPairs:
    """Endless epochs of ``(number in language a, same number in language b)`` pairs.

    A batch draws distinct numbers from ``0..max_number`` (so that no other pair of the
    batch is also a translation: the in-batch negatives are true negatives), and each
    pair a target language
    uniformly from ``languages`` (other than the source); the source is
    ``source_language``, or with ``None`` another uniformly drawn language. The draws
    depend on the seed, the epoch and the rank only.

    Args:
        context: tokenizer, seed, rank.
        languages: ``num2words`` language codes; at least two.
        source_language: the pivot every pair starts from (``en``, as in the demo
            parallel corpus); None: any two languages.
        max_number: the largest number written out.
        batch_size: pairs per batch.
        epoch_samples: pairs per epoch and rank.
        tokenize: add ``src_tokens`` / ``tgt_tokens`` (``[B, L]``) from ``context.tokenizer``.

    Raises:
        ValueError: fewer than two languages, a language ``num2words`` lacks, or bad sizes.
    """

    def __init__(
        self,
        context: DataContext,
        languages: list[str],
        source_language: str | None = "en",
        max_number: int = 99,
        batch_size: int = 64,
        epoch_samples: int = 6400,
        tokenize: bool = True,
    ) -> None:
        if len(set(languages)) < 2:
            raise ValueError(f"number_pairs: languages needs at least two codes, got {languages}")
        if source_language is not None and source_language not in languages:
            raise ValueError(f"number_pairs: source_language '{source_language}' is not among languages {languages}")
        if not 1 <= batch_size <= min(max_number + 1, epoch_samples):
            raise ValueError(
                f"number_pairs: batch_size ({batch_size}) must be at least 1 and at most the count of numbers "
                f"(max_number + 1 = {max_number + 1}: a batch's numbers are distinct) and epoch_samples "
                f"({epoch_samples})"
            )
        if tokenize and context.tokenizer is None:
            raise ValueError("number_pairs: tokenize=True needs a tokenizer in the data context")
        self.words: dict[str, list[str]] = {}
        for lang in dict.fromkeys(languages):
            try:
                self.words[lang] = [num2words(n, lang=lang) for n in range(max_number + 1)]
            except NotImplementedError:
                raise ValueError(f"number_pairs: num2words has no language '{lang}'") from None
        self.languages = list(self.words)
        self.source_language = source_language
        self.context = context
        self.batch_size = batch_size
        self.epoch_samples = epoch_samples
        self.tokenize = tokenize
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rng = np.random.default_rng(derive_seed("number_pairs", self.context.seed, self.epoch, self.context.rank))
        count = len(self.languages)
        for _ in range(self.epoch_samples // self.batch_size):
            numbers = rng.choice(len(self.words[self.languages[0]]), size=self.batch_size, replace=False)
            if self.source_language is None:
                src = rng.integers(count, size=self.batch_size)
            else:
                src = np.full(self.batch_size, self.languages.index(self.source_language))
            # A uniform draw among the other languages: an offset of 1..count-1 from the source.
            tgt = (src + rng.integers(1, count, size=self.batch_size)) % count
            batch: dict[str, Any] = {
                "src": [self.words[self.languages[s]][n] for s, n in zip(src, numbers, strict=True)],
                "tgt": [self.words[self.languages[t]][n] for t, n in zip(tgt, numbers, strict=True)],
                "src_lang": [self.languages[s] for s in src],
                "tgt_lang": [self.languages[t] for t in tgt],
                "key": [str(n) for n in numbers],
                "skipped": 0,
            }
            if self.tokenize:
                batch["src_tokens"] = self.context.tokenizer(batch["src"])
                batch["tgt_tokens"] = self.context.tokenizer(batch["tgt"])
            yield batch
