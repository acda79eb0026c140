"""Zero-shot retrieval: image-text (COCO/Flickr30k protocol) and cross-lingual text-text (Tatoeba).

Image-text retrieval follows clip_benchmark's ``zeroshot_retrieval``: every
caption of an image is a query for text→image retrieval, and an image
retrieves its captions; Recall@k is the fraction of queries with at least one
correct item among the k most similar (cosine similarity of normalised
embeddings). ``image_retrieval_recall@k`` is text→image, ``text_retrieval_recall@k``
image→text.

Cross-lingual retrieval follows the Tatoeba evaluation of Artetxe & Schwenk
(2019) as run in XTREME (Hu et al. 2020): each sentence retrieves its
translation among all target sentences of its language pair by cosine
similarity of ``encode_text`` embeddings; accuracy@1 in both directions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from mmptm.evaluation.common import Autocast, CountingStream, EvaluationError, encode_images, encode_texts, evaluating

RECALL_K = (1, 5, 10)
# Query rows scored at once: bounds the similarity block held in memory.
_QUERY_CHUNK = 1024

Match = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (texts, their language) -> [len(texts), D] normalised embeddings.
Encode = Callable[[Sequence[str], str], torch.Tensor]


def recall_at_k(queries: torch.Tensor, candidates: torch.Tensor, match: Match, ks: Sequence[int]) -> dict[int, float]:
    """The fraction of queries with a correct candidate among their k most similar, for each k.

    Args:
        queries: ``[Q, D]`` normalised embeddings.
        candidates: ``[C, D]`` normalised embeddings.
        match: ``(query indices [q], candidate indices [q, k]) -> bool [q, k]``, whether a retrieved
            candidate is correct for its query.
        ks: the k's (a k above ``C`` counts every candidate).

    Returns:
        ``{k: recall}``.
    """
    largest = min(max(ks), len(candidates))
    hits = {k: 0 for k in ks}
    for start in range(0, len(queries), _QUERY_CHUNK):
        rows = torch.arange(start, min(start + _QUERY_CHUNK, len(queries)), device=queries.device)
        top = (queries[rows] @ candidates.T).topk(largest, dim=-1).indices
        correct = match(rows, top)
        for k in ks:
            hits[k] += int(correct[:, :k].any(dim=-1).sum())
    return {k: hits[k] / len(queries) for k in ks}


def retrieval_metrics(
    image_features: torch.Tensor, text_features: torch.Tensor, text_image: torch.Tensor, ks: Sequence[int] = RECALL_K
) -> dict[str, float]:
    """Image-text Recall@k in both directions, named as clip_benchmark names them.

    Args:
        image_features: ``[I, D]`` normalised image embeddings.
        text_features: ``[T, D]`` normalised caption embeddings.
        text_image: ``[T]`` the index of each caption's image.
        ks: the k's.

    Returns:
        ``{"image_retrieval_recall@k": text→image, "text_retrieval_recall@k": image→text}`` for each k.
    """
    text_to_image = recall_at_k(text_features, image_features, lambda rows, top: top == text_image[rows, None], ks)
    image_to_text = recall_at_k(image_features, text_features, lambda rows, top: text_image[top] == rows[:, None], ks)
    return _named_recalls(text_to_image, image_to_text, ks)


def ranking_metrics(
    image_to_text: torch.Tensor, text_to_image: torch.Tensor, text_image: torch.Tensor, ks: Sequence[int] = RECALL_K
) -> dict[str, float]:
    """:func:`retrieval_metrics` from rankings already made (by a matching head rather than embeddings).

    Args:
        image_to_text: ``[I, M]`` each image's best captions, best first (M at least ``min(max(ks), T)``).
        text_to_image: ``[T, M']`` each caption's best images, best first.
        text_image: ``[T]`` the index of each caption's image.
        ks: the k's.

    Returns:
        The same keys as :func:`retrieval_metrics`.
    """
    images = torch.arange(len(image_to_text), device=image_to_text.device)
    i2t_correct = text_image[image_to_text] == images[:, None]
    t2i_correct = text_to_image == text_image[:, None]
    # Counts divided in Python, as recall_at_k does, so equal rankings give equal numbers.
    text_to_image_recall = {k: int(t2i_correct[:, :k].any(dim=-1).sum()) / len(t2i_correct) for k in ks}
    image_to_text_recall = {k: int(i2t_correct[:, :k].any(dim=-1).sum()) / len(i2t_correct) for k in ks}
    return _named_recalls(text_to_image_recall, image_to_text_recall, ks)


def _named_recalls(
    text_to_image: dict[int, float], image_to_text: dict[int, float], ks: Sequence[int]
) -> dict[str, float]:
    return {
        **{f"image_retrieval_recall@{k}": text_to_image[k] for k in ks},
        **{f"text_retrieval_recall@{k}": image_to_text[k] for k in ks},
    }


class RetrievalSet(NamedTuple):
    """A dual encoder's normalised embeddings of an image-text set.

    Attributes:
        image_features: ``[I, D]`` image embeddings.
        text_features: ``[T, D]`` caption embeddings, image by image.
        captions: every image's captions (``T`` in all).
        skipped: samples the stream skipped.
    """

    image_features: torch.Tensor
    text_features: torch.Tensor
    captions: list[list[str]]
    skipped: int

    def text_image(self) -> torch.Tensor:
        """``[T]`` the index of each caption's image."""
        return caption_images(self.captions, self.image_features.device)


def caption_images(captions: Sequence[Sequence[str]], device: torch.device | str = "cpu") -> torch.Tensor:
    """``[T]`` the image index of each caption of a per-image caption list, flattened image by image."""
    return torch.tensor([i for i, texts in enumerate(captions) for _ in texts], dtype=torch.long, device=device)


def encode_retrieval_set(
    model: nn.Module,
    tokenizer: Any,
    batches: Iterable[Mapping[str, Any]],
    *,
    device: torch.device | str = "cpu",
    autocast: Autocast | None = None,
) -> RetrievalSet:
    """Encode every image and caption of an ``image_text`` stream with ``all_captions=True``.

    Raises:
        EvaluationError: the stream has no images.
    """
    stream = CountingStream(batches)
    image_features, text_features, captions = [], [], []
    with evaluating(model):
        for batch in stream:
            flat = [caption for texts in batch["captions"] for caption in texts]
            image_features.append(encode_images(model, batch["image"], device, autocast))
            text_features.append(encode_texts(model, tokenizer, flat, device, autocast))
            captions += [list(texts) for texts in batch["captions"]]
    if not image_features:
        raise stream.no_samples_error("images")
    return RetrievalSet(torch.cat(image_features), torch.cat(text_features), captions, stream.skipped)


def zeroshot_retrieval(
    model: nn.Module,
    tokenizer: Any,
    batches: Iterable[Mapping[str, Any]],
    *,
    device: torch.device | str = "cpu",
    autocast: Autocast | None = None,
    recall_k: Sequence[int] = RECALL_K,
) -> dict[str, Any]:
    """Image→text and text→image Recall@k of an image-text stream where an image may have several captions.

    Args:
        model: a dual encoder with ``encode_image`` / ``encode_text`` (OpenCLIP's interface).
        tokenizer: maps a list of strings to token ids.
        batches: ``{"image", "captions": [[str]]}`` batches (the ``image_text`` dataset with
            ``all_captions=True``); a batch's captions are encoded together, as clip_benchmark does.
        device: where the model runs.
        autocast: a context-manager factory for mixed precision.
        recall_k: the k's.

    Returns:
        ``{"image_retrieval_recall@k", "text_retrieval_recall@k" (for each k), "num_images", "num_texts",
        "skipped_samples"}``.

    Raises:
        EvaluationError: the stream has no images.
    """
    encoded = encode_retrieval_set(model, tokenizer, batches, device=device, autocast=autocast)
    metrics = retrieval_metrics(encoded.image_features, encoded.text_features, encoded.text_image(), recall_k)
    return {
        **metrics,
        "num_images": len(encoded.captions),
        "num_texts": len(encoded.text_features),
        "skipped_samples": encoded.skipped,
    }


def crosslingual_retrieval(
    model: nn.Module,
    tokenizer: Any,
    batches: Iterable[Mapping[str, Any]],
    *,
    languages: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
    autocast: Autocast | None = None,
    encode: Encode | None = None,
) -> dict[str, Any]:
    """Tatoeba-style cross-lingual sentence retrieval: accuracy@1 of finding each sentence's translation.

    Pairs are grouped by language pair (``"<src_lang>-<tgt_lang>"``); within a
    group every source sentence retrieves among all its target sentences and
    the other way round.

    Args:
        model: a model with ``encode_text``.
        tokenizer: maps a list of strings to token ids.
        batches: ``{"src", "tgt", "src_lang", "tgt_lang"}`` batches of strings (the ``parallel_text`` dataset).
        languages: keep only the pairs with one of these languages on either side (None: all).
        device: where the model runs.
        autocast: a context-manager factory for mixed precision.
        encode: ``(texts, language) -> [len(texts), D]`` normalised embeddings (e.g. mean-pooled
            states with language embeddings); default: the model's ``encode_text``.

    Returns:
        ``{"src_to_tgt_accuracy@1", "tgt_to_src_accuracy@1"}`` averaged over the language pairs,
        ``"num_pairs"``, ``"per_pair": {"fr-en": {"src_to_tgt_accuracy@1", "tgt_to_src_accuracy@1",
        "num_pairs"}}`` and ``"skipped_samples"``.

    Raises:
        EvaluationError: no pairs, or none in ``languages``.
    """
    if encode is None:

        def encode(texts: Sequence[str], lang: str) -> torch.Tensor:  # noqa: ARG001 (one model for every language)
            return encode_texts(model, tokenizer, texts, device, autocast)

    stream = CountingStream(batches)
    wanted = set(languages) if languages else None
    features: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    seen: set[str] = set()
    with evaluating(model):
        for batch in stream:
            seen.update(batch["src_lang"], batch["tgt_lang"])
            groups: dict[str, list[int]] = {}
            for i, pair in enumerate(zip(batch["src_lang"], batch["tgt_lang"], strict=True)):
                if wanted is None or wanted.intersection(pair):
                    groups.setdefault("-".join(pair), []).append(i)
            for name, rows in groups.items():
                src, tgt = features.setdefault(name, ([], []))
                src_lang, tgt_lang = batch["src_lang"][rows[0]], batch["tgt_lang"][rows[0]]
                src.append(encode([batch["src"][i] for i in rows], src_lang))
                tgt.append(encode([batch["tgt"][i] for i in rows], tgt_lang))
    if not seen:
        raise stream.no_samples_error("sentence pairs")
    if not features:
        raise EvaluationError(f"no sentence pair in languages {sorted(wanted or [])}; the data has {sorted(seen)}")
    same_index: Match = lambda rows, top: top == rows[:, None]
    per_pair = {}
    for name, (src, tgt) in sorted(features.items()):
        source, target = torch.cat(src), torch.cat(tgt)
        per_pair[name] = {
            "src_to_tgt_accuracy@1": recall_at_k(source, target, same_index, [1])[1],
            "tgt_to_src_accuracy@1": recall_at_k(target, source, same_index, [1])[1],
            "num_pairs": len(source),
        }
    return {
        **{
            key: sum(m[key] for m in per_pair.values()) / len(per_pair)
            for key in ("src_to_tgt_accuracy@1", "tgt_to_src_accuracy@1")
        },
        "num_pairs": sum(m["num_pairs"] for m in per_pair.values()),
        "per_pair": per_pair,
        "skipped_samples": stream.skipped,
    }
