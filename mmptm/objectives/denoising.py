"""mBART's multilingual denoising: text infilling and sentence permutation, reconstructed by teacher forcing.

Liu et al. 2020, "Multilingual Denoising Pre-training for Neural Machine
Translation", sec. 2.2 and Fig. 1, with BART's noise (Lewis et al. 2020, sec. 2.2):

- Sentence permutation: the sentences of a document are shuffled.
- Text infilling: 35% of the document's words are masked in spans whose
  lengths are drawn from Poisson(lambda=3.5); each span becomes ONE ``<mask>``
  (a 0-length span inserts a ``<mask>``), so the model also learns how many
  tokens are missing.
- Layout: source ``noised </s> <lang>``, decoder input ``<lang> original``,
  target ``original </s>``; the loss is the cross-entropy of the target.
  This is Fig. 1's layout and what transformers' ``MBartTokenizer`` builds for
  fine-tuning. fairseq's pretraining task differs in one token (deliberately
  not followed): ``multilingual_denoising``'s ``load_dataset`` prepends ``<s>``
  to each block and appends the language token, so its source is
  ``<s> noised </s> <lang>`` and its decoder input ``<lang> <s> original </s>``.

A document is one row of the ``text`` dataset: ``<s> s1 </s> s2 </s> ... sk </s>``,
consecutive sentences of one language packed up to ``max_length`` (evaluation
rows hold one sentence); the sentences stay separated by ``</s>``, as in
fairseq's mBART documents, and the original is ``s1 </s> ... sk``. As in BART's
reference code, the budget is ``ceil(0.35 * words)`` words, spans are drawn until
they cover it and the last one is cut to fit. The spans are laid out without
overlap, every arrangement of them among the unmasked words equally likely.
Special tokens (the ``</s>`` between sentences included) are never masked: a
span that reaches over a sentence boundary leaves the ``</s>`` in place and
becomes one ``<mask>`` on each side of it. Words are the tokenizer's: a piece
starting with ``▁`` (``batch["word_starts"]``) begins one.

Randomness comes from a ``torch.Generator`` (default: torch's global one, which
the trainer seeds and checkpoints), so a seeded generator repeats the noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmptm.objectives.masking import IGNORE_INDEX
from mmptm.objectives.mlm import mask_id_of
from mmptm.registry import register_objective
from mmptm.training.distributed import unwrap_model


class Infilled(NamedTuple):
    """The result of :func:`text_infilling`."""

    tokens: list[int]  # the noised ids
    span_lengths: list[int]  # the spans' lengths in words, left to right (0: an inserted <mask>)
    num_words: int  # words in the input
    masked_words: int  # words removed: ceil(mask_ratio * num_words)


class DenoisingInputs(NamedTuple):
    """A batch in mBART's layout (Liu et al. 2020, Fig. 1), right-padded."""

    source: torch.Tensor  # [B, S]: noised </s> <lang>, pad
    decoder_input: torch.Tensor  # [B, T]: <lang> original, pad
    target: torch.Tensor  # [B, T]: original </s>, IGNORE_INDEX


def span_lengths(budget: int, poisson_lambda: float, generator: torch.Generator | None = None) -> list[int]:
    """Span lengths drawn from Poisson(``poisson_lambda``) until they sum to ``budget`` (the last one cut to fit).

    BART's reference ``add_whole_word_mask``: 0-length spans may occur (each inserts a ``<mask>``).

    Args:
        budget: words to mask (>= 0).
        poisson_lambda: the mean span length (mBART: 3.5).
        generator: the random source.

    Returns:
        The lengths in the order drawn; they sum to ``budget``.
    """
    lengths: list[int] = []
    covered = 0
    while covered < budget:
        for drawn in torch.poisson(torch.full((budget,), poisson_lambda), generator=generator).long().tolist():
            lengths.append(min(drawn, budget - covered))
            covered += lengths[-1]
            if covered == budget:
                break
    return lengths


def text_infilling(
    tokens: Sequence[int],
    word_starts: Sequence[bool],
    special_ids: set[int],
    mask_id: int,
    mask_ratio: float = 0.35,
    poisson_lambda: float = 3.5,
    generator: torch.Generator | None = None,
) -> Infilled:
    """BART's text infilling (Lewis et al. 2020, sec. 2.2) of one document.

    Args:
        tokens: the document's ids.
        word_starts: True at the first piece of each word; a non-special piece after a special
            one (or at the start) begins a word too.
        special_ids: ids never masked; they also end words and split spans (one ``<mask>`` per side).
        mask_id: the ``<mask>`` id.
        mask_ratio: share of the words masked (``ceil(mask_ratio * words)``).
        poisson_lambda: the mean span length.
        generator: the random source.

    Returns:
        An :class:`Infilled`.
    """
    word_of: list[int] = []  # word index of each token, -1 for special tokens
    num_words = 0
    for index, token in enumerate(tokens):
        if token in special_ids:
            word_of.append(-1)
            continue
        if index == 0 or word_starts[index] or word_of[-1] < 0:
            num_words += 1
        word_of.append(num_words - 1)
    # ceil as in BART's reference; the rounding keeps float error (0.35 * 20 = 7.000000000000001) out of it.
    budget = math.ceil(round(num_words * mask_ratio, 9))
    lengths = span_lengths(budget, poisson_lambda, generator)
    lengths = [lengths[i] for i in torch.randperm(len(lengths), generator=generator).tolist()]
    # Uniform layout: the spans take len(lengths) of the (unmasked words + spans) slots, in random places.
    slots = num_words - budget + len(lengths)
    span_slots = set(torch.randperm(slots, generator=generator)[: len(lengths)].tolist())
    span_of_word = [-1] * num_words
    inserts_before = [0] * (num_words + 1)  # 0-length spans before each word (and at the end)
    word, span = 0, 0
    for slot in range(slots):
        if slot not in span_slots:
            word += 1
            continue
        if lengths[span] == 0:
            inserts_before[word] += 1
        span_of_word[word : word + lengths[span]] = [span] * lengths[span]
        word += lengths[span]
        span += 1

    noised: list[int] = []
    current_span = -1  # the span whose <mask> was emitted last, while its tokens continue
    for index, token in enumerate(tokens):
        word = word_of[index]
        if word < 0:
            noised.append(token)
            current_span = -1
            continue
        if index == 0 or word_of[index - 1] != word:  # a word's first piece: 0-length spans go before it
            noised += [mask_id] * inserts_before[word]
        if span_of_word[word] < 0:
            noised.append(token)
            current_span = -1
        elif span_of_word[word] != current_span:
            noised.append(mask_id)
            current_span = span_of_word[word]
    noised += [mask_id] * inserts_before[num_words]
    return Infilled(noised, lengths, num_words, budget)


def document_sentences(
    tokens: Sequence[int], word_starts: Sequence[bool], bos_id: int, eos_id: int, pad_id: int
) -> list[tuple[list[int], list[bool]]]:
    """The sentences (ids and word starts) of a ``text`` row ``<s> s1 </s> s2 </s> ... pad``; empty ones dropped."""
    sentences: list[tuple[list[int], list[bool]]] = [([], [])]
    for token, start in zip(tokens, word_starts, strict=True):
        if token == eos_id:
            sentences.append(([], []))
        elif token not in (bos_id, pad_id):
            sentences[-1][0].append(token)
            sentences[-1][1].append(bool(start))
    return [sentence for sentence in sentences if sentence[0]]


def join_sentences(sentences: Sequence[tuple[list[int], list[bool]]], eos_id: int) -> tuple[list[int], list[bool]]:
    """``s1 </s> s2 ... sk`` and its word starts (False at the separators)."""
    tokens: list[int] = []
    starts: list[bool] = []
    for index, (ids, sentence_starts) in enumerate(sentences):
        if index:
            tokens.append(eos_id)
            starts.append(False)
        tokens += ids
        starts += sentence_starts
    return tokens, starts


def padded(rows: Sequence[Sequence[int]], value: int, device: torch.device | str) -> torch.Tensor:
    """``LongTensor[len(rows), longest]`` of the rows, right-padded with ``value``."""
    out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
    for index, row in enumerate(rows):
        out[index, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out.to(device)


@register_objective("denoising")
class MultilingualDenoising(nn.Module):
    """mBART's denoising autoencoder loss on monolingual documents (Liu et al. 2020, sec. 2.2).

    Reads ``text`` batches (``tokens``, ``word_starts``, ``lang``) and trains an ``mbart``
    model (or one with its interface: ``forward(source, decoder_input) -> logits``,
    ``language_tokens`` and the tokenizer's ids as attributes).

    Args:
        mask_ratio: share of each document's words masked (mBART: 0.35).
        poisson_lambda: mean span length (mBART: 3.5).
        permute_sentences: shuffle the document's sentences.
    """

    def __init__(self, mask_ratio: float = 0.35, poisson_lambda: float = 3.5, permute_sentences: bool = True) -> None:
        super().__init__()
        if not 0 < mask_ratio <= 1:
            raise ValueError(f"denoising: mask_ratio must be in (0, 1], got {mask_ratio}")
        if poisson_lambda <= 0:
            raise ValueError(f"denoising: poisson_lambda must be positive, got {poisson_lambda}")
        self.mask_ratio = mask_ratio
        self.poisson_lambda = poisson_lambda
        self.permute_sentences = permute_sentences

    def corrupt(
        self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> DenoisingInputs:
        """The noised sources, decoder inputs and targets of a ``text`` batch.

        Raises:
            ValueError: the batch has no ``word_starts`` (a tokenizer without word boundaries), or
                the model's tokenizer has no ``<mask>``.
        """
        if "word_starts" not in batch:
            raise ValueError(
                "denoising needs 'word_starts' in the batch: read a `text` stream with a sentencepiece tokenizer"
            )
        mask_id = mask_id_of(model)
        tokens, device = batch["tokens"], batch["tokens"].device
        languages = model.language_tokens(batch["lang"]).tolist()
        special = {model.pad_id, model.bos_id, model.eos_id, mask_id, *languages}
        sources, decoder_inputs, targets = [], [], []
        for row, starts, language in zip(tokens.tolist(), batch["word_starts"].tolist(), languages, strict=True):
            sentences = document_sentences(row, starts, model.bos_id, model.eos_id, model.pad_id)
            original, _ = join_sentences(sentences, model.eos_id)
            if self.permute_sentences:
                sentences = [sentences[i] for i in torch.randperm(len(sentences), generator=generator).tolist()]
            infilled = text_infilling(
                *join_sentences(sentences, model.eos_id),
                special_ids=special,
                mask_id=mask_id,
                mask_ratio=self.mask_ratio,
                poisson_lambda=self.poisson_lambda,
                generator=generator,
            )
            sources.append([*infilled.tokens, model.eos_id, language])
            decoder_inputs.append([language, *original])
            targets.append([*original, model.eos_id])
        return DenoisingInputs(
            padded(sources, model.pad_id, device),
            padded(decoder_inputs, model.pad_id, device),
            padded(targets, IGNORE_INDEX, device),
        )

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Returns ``loss`` (cross-entropy of the target tokens) and ``acc`` (their teacher-forced accuracy)."""
        inputs = self.corrupt(unwrap_model(model), batch)
        logits = model(inputs.source, inputs.decoder_input).float()
        loss = F.cross_entropy(logits.flatten(0, 1), inputs.target.flatten(), ignore_index=IGNORE_INDEX)
        predicted = inputs.target != IGNORE_INDEX
        accuracy = (logits.detach().argmax(dim=-1)[predicted] == inputs.target[predicted]).float().mean()
        return {"loss": loss, "acc": accuracy}
