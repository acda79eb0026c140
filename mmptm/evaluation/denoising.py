"""The ``denoise`` evaluator: how well an mBART model reconstructs noised held-out documents.

Every held-out row (a document of one or more sentences, one per line in its
shard; or a single sentence) is noised as in training
(:class:`~mmptm.objectives.denoising.MultilingualDenoising`: sentence
permutation, then text infilling of 35% of the words in Poisson(3.5) spans)
with a fixed seed, so every evaluation sees the same sources. The model decodes
them (greedy, or beam search) until it has produced as many sentences as the
source holds (noise keeps the ``</s>`` between sentences), and the detokenised
reconstructions, one line per sentence, are scored against the originals by
exact match (of the whole document, and of each sentence at its place) and
chrF (:mod:`mmptm.evaluation.chrf`). The copy baseline scores the noised source
itself, its ``<mask>`` tokens dropped: what a model that only copies would get.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from mmptm.evaluation.chrf import corpus_chrf
from mmptm.evaluation.common import EvalContext, autocast_context, evaluating
from mmptm.evaluation.multilingual import text_batches
from mmptm.objectives.denoising import MultilingualDenoising
from mmptm.objectives.masking import IGNORE_INDEX
from mmptm.registry import register_evaluator


def detokenize(tokenizer: Any, ids: Iterable[int], dropped: set[int], sentences: int = 1) -> str:
    """The text of ``ids`` up to its ``sentences``-th ``</s>``, one line per sentence, without the ``dropped`` ids."""
    lines: list[list[int]] = [[]]
    for token in ids:
        if token == tokenizer.eos_id:
            if len(lines) == sentences:
                break
            lines.append([])
        elif token not in dropped:
            lines[-1].append(token)
    return "\n".join(tokenizer.decode(line) for line in lines)


def sentence_matches(hypothesis: str, reference: str) -> int:
    """How many of the reference's lines the hypothesis has at the same place."""
    return sum(h == r for h, r in zip(hypothesis.split("\n"), reference.split("\n"), strict=False))


def take_rows(batch: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """The ``text`` batch restricted to ``rows``."""
    index = torch.tensor(rows, dtype=torch.long)
    return {"tokens": batch["tokens"][index], "word_starts": batch["word_starts"][index],
            "lang": [batch["lang"][row] for row in rows]}


def capped_batches(batches: Iterable[dict[str, Any]], max_sentences: int | None) -> Iterator[dict[str, Any]]:
    """The ``text`` batches restricted to the first ``max_sentences`` rows of each language (None: all rows).

    Batches left without rows are dropped.
    """
    counts: dict[str, int] = {}
    for batch in batches:
        rows = []
        for row, lang in enumerate(batch["lang"]):
            if max_sentences is None or counts.get(lang, 0) < max_sentences:
                counts[lang] = counts.get(lang, 0) + 1
                rows.append(row)
        if rows:
            yield take_rows(batch, rows)


@register_evaluator("denoise")
def denoise(
    model: nn.Module,
    context: EvalContext,
    data: str = "demo:docs_val",
    languages: list[str] | None = None,
    max_sentences: int | None = None,
    mask_ratio: float = 0.35,
    poisson_lambda: float = 3.5,
    seed: int = 0,
    beam_size: int = 1,
    length_penalty: float = 1.0,
    max_length: int | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Exact match and chrF of the reconstructions of noised held-out documents, and of the copy baseline.

    Args:
        model: an ``mbart`` model (``generate``, ``language_tokens``, the tokenizer's ids).
        context: the trainer's evaluation context.
        data: ``text`` shards (a folder of per-language folders), read once, one sample (a
            document, or a sentence) per row: ``demo:docs_val`` (the default: documents of 4 sentences) or
            ``demo:text_val`` (single sentences).
        languages: the languages to read (None: all).
        max_sentences: at most this many rows (documents) per language (None: all).
        mask_ratio / poisson_lambda: the text infilling noise (mBART: 0.35, 3.5).
        seed: seed of the noise, so that every evaluation reconstructs the same sources.
        beam_size: 1: greedy decoding; more: beam search.
        length_penalty: beam search's length normalisation exponent.
        max_length: at most this many generated tokens (default: the tokenizer's context length, the
            longest held-out row, within the model's positions).
        batch_size: rows per batch.

    Returns:
        ``denoise_em`` (share of reconstructions equal to the original document),
        ``denoise_sentence_em`` (share of the original sentences reconstructed at their place),
        ``denoise_chrf`` (corpus chrF2, 0-100), the same of the copy baseline (the noised source,
        masks dropped) as ``denoise_copy_em`` / ``denoise_copy_sentence_em`` / ``denoise_copy_chrf``,
        and ``denoise_em/<lang>``.
    """
    noise = MultilingualDenoising(mask_ratio=mask_ratio, poisson_lambda=poisson_lambda)
    generator = torch.Generator().manual_seed(seed)
    max_length = max_length or min(context.tokenizer.context_length, model.max_positions - 1)
    tokenizer = context.tokenizer
    not_text = {model.mask_id, *model.language_token_id.values()}
    references: list[str] = []
    reconstructions: list[str] = []
    copies: list[str] = []
    row_languages: list[str] = []
    stream = text_batches(context, data, languages, batch_size, "denoise")
    with evaluating(model):
        for batch in capped_batches(stream, max_sentences):
            inputs = noise.corrupt(model, batch, generator)
            sentences = (inputs.source == model.eos_id).sum(dim=1).tolist()  # one </s> per sentence
            with autocast_context(context.autocast):
                generated = model.generate(inputs.source.to(context.device), batch["lang"], max_length=max_length,
                                           beam_size=beam_size, length_penalty=length_penalty, sentences=sentences)
            for source, target, output, count in zip(inputs.source.tolist(), inputs.target.tolist(),
                                                     generated.tokens.tolist(), sentences, strict=True):
                references.append(detokenize(tokenizer, [t for t in target if t != IGNORE_INDEX], not_text, count))
                reconstructions.append(detokenize(tokenizer, output, not_text, count))
                copies.append(detokenize(tokenizer, source, not_text, count))
            row_languages += batch["lang"]
    if not references:
        raise stream.no_samples_error("sentences")
    exact = [hyp == ref for hyp, ref in zip(reconstructions, references, strict=True)]
    total_sentences = sum(ref.count("\n") + 1 for ref in references)
    metrics = {
        "denoise_em": sum(exact) / len(exact),
        "denoise_sentence_em": sum(map(sentence_matches, reconstructions, references)) / total_sentences,
        "denoise_chrf": corpus_chrf(reconstructions, references),
        "denoise_copy_em": sum(c == r for c, r in zip(copies, references, strict=True)) / len(references),
        "denoise_copy_sentence_em": sum(map(sentence_matches, copies, references)) / total_sentences,
        "denoise_copy_chrf": corpus_chrf(copies, references),
    }
    for lang in sorted(set(row_languages)):
        hits = [hit for hit, row_lang in zip(exact, row_languages, strict=True) if row_lang == lang]
        metrics[f"denoise_em/{lang}"] = sum(hits) / len(hits)
    return metrics
