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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from mmptm.encoders.fusion import MATCH, FusionModel, fusion_model, visual_batch
from mmptm.evaluation.common import CountingStream, EvalContext, EvaluationError, _autocast_context
from mmptm.evaluation.inputs import load_classnames, load_templates
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


def fusion_eval_stream(
    model: FusionModel, context: EvalContext, data: str, label_key: str, language: str, batch_size: int,
    num_workers: int,
) -> Any:
    """The labelled evaluation stream a fusion model reads: images (``image_text``) or region features."""
    if model.reads_regions:
        spec = {"name": "region_features", "shards": data, "label_key": label_key}
    else:
        spec = {"name": "image_text", "shards": data, "label_key": label_key, "caption_languages": [language]}
    return build(DATASETS, {**spec, "batch_size": batch_size, "num_workers": num_workers}, context=context.data)


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
    stream = CountingStream(
        fusion_eval_stream(model, context, data, label_key, language, batch_size, num_workers)
    )
    generator = torch.Generator().manual_seed(seed)
    scores, labels = [], []
    mlm_correct = mlm_total = 0.0
    with torch.no_grad(), _autocast_context(context.autocast):
        for batch in context.batches(stream, "itm retrieval"):
            batch = {k: v.to(context.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            visual = model.visual_inputs(**visual_batch(model, batch))
            images = len(batch["label"])
            pair_index = torch.arange(images, device=context.device).repeat_interleave(len(captions))
            logits = model(caption_tokens.repeat(images, 1), visual_inputs=visual, pair_index=pair_index).itm_logits
            match = F.log_softmax(logits.float(), dim=-1)[:, MATCH].view(images, num_classes, -1)
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
