"""Retrieval with the image-text matching head of a fusion model, and its masked-token accuracy.

A fusion model (VisualBERT, ViLBERT) has no separate embeddings to compare: an
image and a caption are scored together by the matching head (Li et al. 2019,
sec. 3.2; Lu et al. 2019, sec. 4 "caption-based image retrieval" scores every
pair with the alignment head). On a labelled set with a small caption set, such
as the ten digit classes of the demo data, every image is scored against every
class's captions (the class score is the mean matching log-probability over the
templates, as CLIP's prompt ensembling averages over templates), giving
image→text Recall@1/5 and text→image Recall@1 (whether each class caption's
best-scoring image is of that class). The same pass measures masked-LM accuracy
on each image's own caption, masked with a fixed seed.

On an image-text set (``mmptm zeroshot retrieve``) the head ranks captions
and images as in the COCO/Flickr30k protocol: every pair is scored for small
sets, or, with a dual encoder, only its top-k candidates of each query are
reranked (the retrieve-then-rerank of ALBEF, Li et al. 2021, "Align before
Fuse", the usual way to afford a cross-encoder over large sets).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmptm.data_pipelines.context import DataContext
from mmptm.encoders.fusion import MATCH, FusionModel, fusion_model, visual_batch
from mmptm.encoders.visual_inputs import VisualInputs
from mmptm.evaluation.common import (
    Autocast,
    CountingStream,
    EvalContext,
    EvaluationError,
    autocast_context,
    evaluating,
)
from mmptm.evaluation.inputs import load_classnames, load_templates
from mmptm.evaluation.retrieval import RECALL_K, caption_images, encode_retrieval_set, ranking_metrics
from mmptm.objectives.vl_mlm import mask_caption_tokens, masked_token_loss
from mmptm.registry import DATASETS, build, register_evaluator


def class_captions(
    classnames: dict[str, list[str]], templates: dict[str, list[str]], language: str
) -> tuple[list[str], int]:
    """Every template filled with every class name of ``language``, class-major.

    Returns:
        ``(captions, C)``: the ``C × T`` captions and the number of classes C.

    Raises:
        EvaluationError: no class names or templates in ``language`` (nor ``"default"`` ones).
    """
    names = classnames.get(language, classnames.get("default"))
    prompts = templates.get(language, templates.get("default"))
    if names is None or prompts is None:
        raise EvaluationError(
            f"itm_retrieval: language '{language}' has no class names or templates "
            f"(class names in {sorted(classnames)}, templates in {sorted(templates)})"
        )
    return [template.format(name) for name in names for template in prompts], len(names)


def fusion_stream(
    model: FusionModel,
    context: DataContext,
    data: str,
    languages: list[str] | None,
    batch_size: int,
    num_workers: int,
    label_key: str | None = None,
    all_captions: bool = False,
) -> Any:
    """The evaluation stream a fusion model reads: images (``image_text``) or region features.

    Args:
        model: the fusion model (whether it reads region features).
        context: the evaluation data context.
        data: the shards.
        languages: caption languages (None: all).
        batch_size / num_workers: as the datasets take them.
        label_key: extension of the integer label file (None: no labels).
        all_captions: every caption of each sample (retrieval) instead of one.
    """
    name = "region_features" if model.reads_regions else "image_text"
    spec = {"name": name, "shards": data, "label_key": label_key, "caption_languages": languages,
            "all_captions": all_captions, "batch_size": batch_size, "num_workers": num_workers}
    return build(DATASETS, spec, context=context)


def match_log_probs(
    model: FusionModel, visual: VisualInputs, image_index: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """The matching head's float32 log-probability that each caption row describes its image.

    Args:
        model: the fusion model.
        visual: the visual inputs of B images (:meth:`FusionModel.visual_inputs`), encoded once.
        image_index: ``[P]`` the image of each caption row.
        tokens: ``[P, L]`` caption token ids.

    Returns:
        ``[P]`` ``log p(match)``.
    """
    logits = model(tokens, visual_inputs=visual, pair_index=image_index).itm_logits
    return F.log_softmax(logits.float(), dim=-1)[:, MATCH]


@register_evaluator("itm_retrieval")
def itm_retrieval(
    model: Any,
    context: EvalContext,
    data: str = "demo:val",
    classnames: str = "demo:classnames",
    templates: str = "demo:templates",
    language: str = "en",
    label_key: str = "cls",
    batch_size: int = 32,
    num_workers: int = 0,
    mask_prob: float = 0.15,
    seed: int = 0,
) -> dict[str, float]:
    """ITM-based retrieval over the class captions of a labelled set, and masked-token accuracy.

    Args:
        model: a fusion model (``visualbert``, ``vilbert``).
        context: the trainer's evaluation context.
        data: labelled shards (images, or region features for a model without a tower).
        classnames: class names file (``{lang: [...]}`` JSON or one per line), in label order.
        templates: caption templates file (each with ``{}``).
        language: the language of the captions, class names and templates.
        label_key: extension of the integer label file of each sample.
        batch_size: images per batch (each scored against every class caption).
        num_workers: DataLoader workers.
        mask_prob: share of each caption's tokens masked for the masked-token accuracy.
        seed: seed of that masking.

    Returns:
        ``itm_i2t_r1``, ``itm_i2t_r5``, ``itm_t2i_r1``, ``mlm_acc`` (top-1 over masked caption
        tokens), ``itm_num_images`` and ``itm_skipped_samples``.
    """
    model = fusion_model(model)
    captions, num_classes = class_captions(load_classnames(classnames, data), load_templates(templates), language)
    caption_tokens = context.tokenizer(captions).to(context.device)
    stream = CountingStream(fusion_stream(model, context.data, data, [language], batch_size, num_workers, label_key))
    generator = torch.Generator().manual_seed(seed)
    scores, labels = [], []
    mlm_correct = mlm_total = 0.0
    with torch.no_grad(), autocast_context(context.autocast):
        for batch in context.batches(stream, "itm retrieval"):
            batch = {k: v.to(context.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            visual = model.visual_inputs(**visual_batch(model, batch))
            images = len(batch["label"])
            pair_index = torch.arange(images, device=context.device).repeat_interleave(len(captions))
            match = match_log_probs(model, visual, pair_index, caption_tokens.repeat(images, 1))
            match = match.view(images, num_classes, -1)
            scores.append(match.mean(dim=-1).cpu())
            labels.append(batch["label"].cpu())
            inputs, targets = mask_caption_tokens(model, batch["text"].cpu(), mask_prob, generator)
            out = model(inputs.to(context.device), visual_inputs=visual, mlm=True)
            _, accuracy = masked_token_loss(out.mlm_logits, targets.to(context.device))
            predicted = float((targets != -100).sum())
            mlm_correct += float(accuracy) * predicted
            mlm_total += predicted
    if not scores:
        raise stream.no_samples_error("images")
    score, label = torch.cat(scores), torch.cat(labels)
    ranked = score.argsort(dim=1, descending=True)
    best_image = score.argmax(dim=0)  # per class caption: the image it scores highest
    return {
        "itm_i2t_r1": (ranked[:, 0] == label).float().mean().item(),
        "itm_i2t_r5": (ranked[:, :5] == label[:, None]).any(dim=1).float().mean().item(),
        "itm_t2i_r1": (label[best_image] == torch.arange(num_classes)).float().mean().item(),
        "mlm_acc": mlm_correct / max(mlm_total, 1.0),
        "itm_num_images": float(len(label)),
        "itm_skipped_samples": float(stream.skipped),
    }


class RerankCandidates(NamedTuple):
    """A dual encoder's ranking of an image-text set, whose top-k the matching head reorders.

    Attributes:
        captions: every image's captions, in stream order (the fusion model's stream must agree).
        image_to_text: ``[I, M]`` each image's captions by falling similarity.
        text_to_image: ``[T, M']`` each caption's images by falling similarity.
        top_k: how many of each ranking the matching head rescores.
    """

    captions: list[list[str]]
    image_to_text: torch.Tensor
    text_to_image: torch.Tensor
    top_k: int


def dual_encoder_candidates(
    model: nn.Module,
    tokenizer: Any,
    batches: Iterable[Mapping[str, Any]],
    top_k: int,
    recall_k: Sequence[int] = RECALL_K,
    *,
    device: torch.device | str = "cpu",
    autocast: Autocast | None = None,
) -> RerankCandidates:
    """Rank an image-text stream (``all_captions=True``) with a dual encoder (``encode_image``/``encode_text``).

    Each ranking keeps ``max(top_k, max(recall_k))`` entries: the matching head reorders the first
    ``top_k``, the rest keep the dual encoder's order, so Recall@k for k above ``top_k`` stays defined.
    """
    encoded = encode_retrieval_set(model, tokenizer, batches, device=device, autocast=autocast)
    similarity = (encoded.image_features @ encoded.text_features.T).cpu()
    keep = max(top_k, *recall_k)
    image_to_text = similarity.topk(min(keep, similarity.shape[1]), dim=1).indices
    text_to_image = similarity.T.topk(min(keep, similarity.shape[0]), dim=1).indices
    return RerankCandidates(encoded.captions, image_to_text, text_to_image, top_k)


def itm_image_text_retrieval(
    model: nn.Module,
    tokenizer: Any,
    batches: Iterable[Mapping[str, Any]],
    *,
    candidates: RerankCandidates | None = None,
    device: torch.device | str = "cpu",
    autocast: Autocast | None = None,
    recall_k: Sequence[int] = RECALL_K,
    pairs_per_forward: int = 256,
) -> dict[str, Any]:
    """Image→text and text→image Recall@k of an image-text set, ranked by a fusion model's matching head.

    Without ``candidates`` every (image, caption) pair is scored, I × T forward rows: for small sets.
    With them, each image's top-k captions and each caption's top-k images under the dual encoder are
    rescored and reordered by ``log p(match)``, ties broken by index, so that ``top_k`` ≥ the set size
    gives the full scoring's numbers. The stream is read twice without candidates (its captions first).

    Args:
        model: a fusion model (``visualbert``, ``vilbert``).
        tokenizer: the fusion model's tokenizer.
        batches: the fusion model's stream with every caption of each sample (``"captions": [[str]]``,
            see :func:`fusion_stream`).
        candidates: a dual encoder's rankings of the same set (:func:`dual_encoder_candidates`).
        device: where the model runs.
        autocast: a context-manager factory for mixed precision.
        recall_k: the k's.
        pairs_per_forward: (image, caption) pairs scored per forward pass.

    Returns:
        The keys of :func:`~mmptm.evaluation.retrieval.zeroshot_retrieval` (``image_retrieval_recall@k``,
        ``text_retrieval_recall@k``, ``num_images``, ``num_texts``, ``skipped_samples``), plus
        ``itm_pairs_scored`` and ``rerank_top_k`` (None when every pair is scored).

    Raises:
        EvaluationError: no images, or a stream whose images and captions differ from the candidates'.
    """
    fusion = fusion_model(model)
    captions = candidates.captions if candidates is not None else _stream_captions(batches)
    flat = [caption for texts in captions for caption in texts]
    num_images, num_texts = len(captions), len(flat)
    text_image = caption_images(captions)
    if candidates is None:
        image_to_text = torch.arange(num_texts).expand(num_images, num_texts)
        text_to_image = torch.arange(num_images).expand(num_texts, num_images)
        top_k = max(num_images, num_texts)
    else:
        image_to_text, text_to_image, top_k = candidates.image_to_text, candidates.text_to_image, candidates.top_k
    i2t_top, t2i_top = image_to_text[:, :top_k], text_to_image[:, :top_k]
    # Every pair either direction needs, as sorted ids image * T + caption: grouped by image.
    pair_ids = torch.cat([
        (torch.arange(num_images)[:, None] * num_texts + i2t_top).flatten(),
        (t2i_top * num_texts + torch.arange(num_texts)[:, None]).flatten(),
    ]).unique()
    pair_scores, skipped = _score_pairs(
        fusion, tokenizer, batches, captions, pair_ids, device, autocast, pairs_per_forward
    )

    def reranked(ranking: torch.Tensor, pair_id: torch.Tensor) -> torch.Tensor:
        """``ranking`` with its first ``top_k`` columns reordered by score (ties: lower index first)."""
        head = ranking[:, :top_k].sort(dim=1).values
        ids = pair_id(head)
        order = pair_scores[torch.searchsorted(pair_ids, ids)].argsort(dim=1, descending=True, stable=True)
        return torch.cat([head.gather(1, order), ranking[:, top_k:]], dim=1)

    image_rows, text_rows = torch.arange(num_images)[:, None], torch.arange(num_texts)[:, None]
    metrics = ranking_metrics(
        reranked(image_to_text, lambda texts: image_rows * num_texts + texts),
        reranked(text_to_image, lambda images: images * num_texts + text_rows),
        text_image,
        recall_k,
    )
    return {
        **metrics,
        "num_images": num_images,
        "num_texts": num_texts,
        "skipped_samples": skipped,
        "itm_pairs_scored": len(pair_ids),
        "rerank_top_k": None if candidates is None else top_k,
    }


def _stream_captions(batches: Iterable[Mapping[str, Any]]) -> list[list[str]]:
    stream = CountingStream(batches)
    captions = [list(texts) for batch in stream for texts in batch["captions"]]
    if not captions:
        raise stream.no_samples_error("images")
    return captions


def _score_pairs(
    model: FusionModel,
    tokenizer: Any,
    batches: Iterable[Mapping[str, Any]],
    captions: list[list[str]],
    pair_ids: torch.Tensor,
    device: torch.device | str,
    autocast: Autocast | None,
    pairs_per_forward: int,
) -> tuple[torch.Tensor, int]:
    """``(log p(match) of the pairs pair_ids (sorted image * T + caption), samples skipped)``, batch by batch."""
    num_texts = sum(map(len, captions))
    tokens = tokenizer([caption for texts in captions for caption in texts])
    scores = torch.full((len(pair_ids),), float("nan"))
    stream = CountingStream(batches)
    first = 0
    with evaluating(model), autocast_context(autocast):
        for batch in stream:
            count = len(batch["captions"])
            if [list(texts) for texts in batch["captions"]] != captions[first : first + count]:
                raise EvaluationError(
                    f"the fusion model's stream differs from the dual encoder's at image {first}: read both from "
                    "the same shards (a sample one model's stream skips, e.g. without an image, shifts the other)"
                )
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            visual = model.visual_inputs(**visual_batch(model, batch))
            start, end = torch.searchsorted(pair_ids, torch.tensor([first, first + count]) * num_texts).tolist()
            for lo in range(start, end, pairs_per_forward):
                ids = pair_ids[lo : min(lo + pairs_per_forward, end)]
                image_index = (ids // num_texts - first).to(device)
                scores[lo : lo + len(ids)] = match_log_probs(
                    model, visual, image_index, tokens[ids % num_texts].to(device)
                ).cpu()
            first += count
    if first != len(captions):
        raise EvaluationError(
            f"the fusion model's stream has {first} images but the captions were read from {len(captions)}"
        )
    return scores, stream.skipped
