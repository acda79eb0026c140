"""Evaluators of multilingual encoders, registered for ``eval.tasks``: retrieval, zero-shot transfer, MLM accuracy.

- ``xlret``: Tatoeba-style cross-lingual sentence retrieval (Artetxe & Schwenk
  2019; XTREME, Hu et al. 2020, sec. 3.3): mean-pooled encoder states, accuracy@1
  both ways per language pair (:func:`~mmptm.evaluation.retrieval.crosslingual_retrieval`),
  logged as ``xlret_acc`` (mean over directions and pairs).
- ``xltransfer``: XNLI-style zero-shot cross-lingual transfer (Conneau et al.
  2018; XLM, sec. 5.1): a linear classifier fit on the sentence embeddings of
  one language for a label the data carries, scored on the other languages.
- ``mlm_accuracy``: masked-token accuracy per language on held-out text.

All take a model with the ``multilingual_encoder`` interface (``encode_text``
with ``languages`` and ``layer``, ``language_ids``, ``mlm_logits``) and read
held-out shards through the ``text`` and ``parallel_text`` datasets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmptm.data_pipelines.parallel_text import parallel_text
from mmptm.data_pipelines.text import NO_LABEL, text
from mmptm.evaluation.common import CountingStream, EvalContext, EvaluationError, autocast_context, evaluating
from mmptm.evaluation.retrieval import crosslingual_retrieval
from mmptm.objectives.masking import IGNORE_INDEX
from mmptm.objectives.mlm import mask_tokens
from mmptm.registry import register_evaluator


def sentence_embeddings(
    model: nn.Module, tokens: torch.Tensor, languages: Sequence[str], context: EvalContext, layer: int | None
) -> torch.Tensor:
    """L2-normalised float32 mean-pooled states ``[B, D]`` of ``tokens`` in ``languages`` (one code per row)."""
    tokens = tokens.to(context.device)
    with autocast_context(context.autocast):
        features = model.encode_text(tokens, languages=model.language_ids(languages, tokens.device), layer=layer)
    return F.normalize(features.float(), dim=-1)


def text_batches(context: EvalContext, data: str, languages: list[str] | None, batch_size: int, what: str) -> Any:
    """The held-out ``text`` stream ``data``, read once, as the trainer's evaluation batches."""
    stream = text(context.data, data, languages=languages, batch_size=batch_size)
    return CountingStream(context.batches(stream, what))


@register_evaluator("xlret")
def xlret(
    model: nn.Module,
    context: EvalContext,
    data: str = "demo:parallel_val",
    languages: list[str] | None = None,
    layer: int | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """Cross-lingual retrieval accuracy@1 on held-out pairs, both directions, mean-pooled states.

    Args:
        model: a multilingual encoder.
        context: the trainer's evaluation context.
        data: parallel-text shards of held-out pairs.
        languages: keep the pairs with one of these languages (None: all).
        layer: pool the states after this many blocks (None: the final states).
        batch_size: pairs per batch.

    Returns:
        ``xlret_acc`` (mean over both directions and every language pair), ``xlret_src_to_tgt``,
        ``xlret_tgt_to_src`` and ``xlret_acc/<src>-<tgt>`` per pair.
    """
    stream = context.batches(parallel_text(context.data, data, batch_size=batch_size, num_workers=0), "xlret")

    def encode(texts: Sequence[str], lang: str) -> torch.Tensor:
        return sentence_embeddings(model, context.tokenizer(list(texts)), [lang] * len(texts), context, layer)

    result = crosslingual_retrieval(model, context.tokenizer, stream, languages=languages, encode=encode)
    metrics = {
        "xlret_src_to_tgt": result["src_to_tgt_accuracy@1"],
        "xlret_tgt_to_src": result["tgt_to_src_accuracy@1"],
        "xlret_acc": (result["src_to_tgt_accuracy@1"] + result["tgt_to_src_accuracy@1"]) / 2,
    }
    for pair, scores in result["per_pair"].items():
        metrics[f"xlret_acc/{pair}"] = (scores["src_to_tgt_accuracy@1"] + scores["tgt_to_src_accuracy@1"]) / 2
    return metrics


@register_evaluator("xltransfer")
def xltransfer(
    model: nn.Module,
    context: EvalContext,
    data: str = "demo:text_val",
    source_language: str = "en",
    languages: list[str] | None = None,
    layer: int | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """Zero-shot cross-lingual transfer of a linear probe on sentence embeddings (XNLI-style).

    Every language's held-out shards list the same items in the same order (the demo
    corpus does); the probe (multinomial logistic regression) is fit on the
    ``source_language`` embeddings of the even-numbered labelled items and scored on the
    odd-numbered items of every other language, so no test item is seen in any language.

    Args:
        model: a multilingual encoder.
        context: the trainer's evaluation context.
        data: ``text`` shards (a folder of per-language folders) whose json carries an integer ``label``.
        source_language: the language the probe is fit on.
        languages: the languages to read (None: all).
        layer: pool the states after this many blocks (None: the final states).
        batch_size: sentences per batch.

    Returns:
        ``xltransfer_acc`` (mean over the target languages), ``xltransfer_acc/<lang>`` for each
        language (the source language's held-out items included, not in the mean).

    Raises:
        EvaluationError: no labelled sentences, or none in ``source_language``.
    """
    from sklearn.linear_model import LogisticRegression  # slow to import; only this evaluator needs it

    features: dict[str, list[torch.Tensor]] = {}
    labels: dict[str, list[torch.Tensor]] = {}
    stream = text_batches(context, data, languages, batch_size, "xltransfer")
    with evaluating(model):
        for batch in stream:
            keep = batch["label"] != NO_LABEL
            if not keep.any():
                continue
            langs = [lang for lang, kept in zip(batch["lang"], keep.tolist(), strict=True) if kept]
            embeddings = sentence_embeddings(model, batch["tokens"][keep], langs, context, layer).cpu()
            for lang in dict.fromkeys(langs):
                rows = torch.tensor([i for i, row_lang in enumerate(langs) if row_lang == lang])
                features.setdefault(lang, []).append(embeddings[rows])
                labels.setdefault(lang, []).append(batch["label"][keep][rows])
    if source_language not in features:
        raise EvaluationError(
            f"xltransfer: no labelled '{source_language}' sentences in {data}; labelled languages: {sorted(features)}"
        )
    x = {lang: torch.cat(parts).numpy() for lang, parts in features.items()}
    y = {lang: torch.cat(parts).numpy() for lang, parts in labels.items()}
    probe = LogisticRegression(max_iter=1000).fit(x[source_language][::2], y[source_language][::2])
    metrics = {f"xltransfer_acc/{lang}": float(probe.score(x[lang][1::2], y[lang][1::2])) for lang in sorted(x)}
    targets = [value for key, value in metrics.items() if key != f"xltransfer_acc/{source_language}"]
    metrics["xltransfer_acc"] = float(np.mean(targets)) if targets else float("nan")
    return metrics


@register_evaluator("mlm_accuracy")
def mlm_accuracy(
    model: nn.Module,
    context: EvalContext,
    data: str = "demo:text_val",
    languages: list[str] | None = None,
    mask_prob: float = 0.15,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, float]:
    """Masked-token accuracy per language on held-out text (BERT masking, Devlin et al. 2019, sec. 3.1).

    Args:
        model: a multilingual encoder.
        context: the trainer's evaluation context.
        data: ``text`` shards (a folder of per-language folders), read once, one sentence per row.
        languages: the languages to read (None: all).
        mask_prob: share of each sentence's tokens masked.
        seed: seed of the masking, so that every evaluation masks the same tokens.
        batch_size: sentences per batch.

    Returns:
        ``mlm_acc`` (mean over languages) and ``mlm_acc/<lang>``.
    """
    generator = torch.Generator().manual_seed(seed)
    correct: dict[str, int] = {}
    total: dict[str, int] = {}
    stream = text_batches(context, data, languages, batch_size, "mlm accuracy")
    with evaluating(model):
        for batch in stream:
            inputs, targets = mask_tokens(model, batch["tokens"], mask_prob, generator=generator)
            inputs, targets = inputs.to(context.device), targets.to(context.device)
            with autocast_context(context.autocast):
                hidden = model(inputs, languages=model.language_ids(batch["lang"], inputs.device))
                predictions = model.mlm_logits(hidden).argmax(dim=-1)
            hits = ((predictions == targets) & (targets != IGNORE_INDEX)).sum(dim=1).tolist()
            counts = (targets != IGNORE_INDEX).sum(dim=1).tolist()
            for lang, hit, count in zip(batch["lang"], hits, counts, strict=True):
                correct[lang] = correct.get(lang, 0) + hit
                total[lang] = total.get(lang, 0) + count
    if not total:
        raise stream.no_samples_error("sentences")
    metrics = {f"mlm_acc/{lang}": correct[lang] / max(total[lang], 1) for lang in sorted(total)}
    metrics["mlm_acc"] = float(np.mean(list(metrics.values())))
    return metrics
