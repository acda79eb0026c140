"""Zero-shot classification with prompt ensembling (Radford et al. 2021, sec 3.1.4).

Each class's text embedding is the mean of its L2-normalised template
embeddings, renormalised; an image is assigned the class of highest cosine
similarity. Image features are computed once and scored against the
classifier of every prompt language.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def load_prompt_file(path: str | Path, what: str) -> dict[str, list[str]]:
    """Class names or templates by language.

    Accepts a JSON file ``{lang: [...]}`` (or a plain JSON list) or a text file
    with one entry per line; a list without languages is returned under ``"default"``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file '{path}' not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, list):
            data = {"default": data}
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise ValueError(f"{path}: {what} JSON must be a list or a mapping language -> list")
    else:
        data = {"default": [line.strip() for line in text.splitlines() if line.strip()]}
    return {lang: [str(x) for x in items] for lang, items in data.items()}


@torch.no_grad()
def zeroshot_classifier(
    model: nn.Module,
    tokenizer: Any,
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str,
) -> torch.Tensor:
    """Class embeddings ``[embed_dim, num_classes]``: mean of normalised template embeddings, renormalised."""
    for template in templates:
        if "{}" not in template:
            raise ValueError(f"template '{template}' has no '{{}}' placeholder for the class name")
    weights = []
    for name in classnames:
        tokens = tokenizer([template.format(name) for template in templates]).to(device)
        embeddings = F.normalize(model.encode_text(tokens).float(), dim=-1)
        weights.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(weights, dim=1)


@torch.no_grad()
def image_features_and_labels(
    model: nn.Module, batches: Iterable[Mapping[str, Any]], device: torch.device | str, autocast: Any = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Normalised image features and labels of a whole stream, plus its skipped-sample count."""
    features, labels, skipped = [], [], 0
    input_key = getattr(getattr(model, "visual", None), "input_key", "image")
    for batch in batches:
        skipped += int(batch.get("skipped", 0))
        if batch.get("empty"):
            continue
        with autocast() if autocast is not None else contextlib.nullcontext():
            encoded = model.encode_image(batch[input_key].to(device))
        features.append(F.normalize(encoded.float(), dim=-1))
        labels.append(batch["label"].to(device))
    if not features:
        raise ValueError("the zero-shot evaluation stream produced no images")
    return torch.cat(features), torch.cat(labels), skipped


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """top-1, top-5 and mean per-class recall, plus per-class recall."""
    k = min(5, num_classes)
    topk = logits.topk(k, dim=-1).indices
    top1 = topk[:, 0] == labels
    top5 = (topk == labels[:, None]).any(dim=-1)
    per_class = {}
    for c in range(num_classes):
        mask = labels == c
        if mask.any():
            per_class[c] = top1[mask].float().mean().item()
    return {
        "top1": top1.float().mean().item(),
        "top5": top5.float().mean().item(),
        "mean_per_class_recall": sum(per_class.values()) / max(1, len(per_class)),
        "per_class_recall": per_class,
        "num_images": int(labels.numel()),
    }


def zeroshot_classification(
    model: nn.Module,
    tokenizer: Any,
    batches: Iterable[Mapping[str, Any]],
    classnames: Mapping[str, Sequence[str]],
    templates: Mapping[str, Sequence[str]],
    device: torch.device | str = "cpu",
    languages: Sequence[str] | None = None,
    autocast: Any = None,
) -> dict[str, dict[str, Any]]:
    """Zero-shot metrics per prompt language.

    Args:
        model: a dual encoder with ``encode_image`` / ``encode_text``.
        tokenizer: maps a list of strings to token ids.
        batches: an evaluation stream of ``{"image", "label"}`` batches.
        classnames / templates: by language (``{"en": [...], "fr": [...]}``); a
            language missing from ``templates`` falls back to its ``"default"`` entry.
        languages: which languages to score (default: every language of ``classnames``).
        autocast: a context-manager factory for mixed precision.

    Returns:
        ``{lang: {"top1", "top5", "mean_per_class_recall", "per_class_recall", "num_images"}}``,
        plus ``"skipped"`` under the key ``"_stream"``.
    """
    was_training = model.training
    model.eval()
    try:
        features, labels, skipped = image_features_and_labels(model, batches, device, autocast)
        results: dict[str, dict[str, Any]] = {}
        for lang in languages or list(classnames):
            if lang not in classnames:
                raise ValueError(f"no class names for language '{lang}'; available: {', '.join(classnames)}")
            lang_templates = templates.get(lang, templates.get("default"))
            if not lang_templates:
                raise ValueError(f"no templates for language '{lang}'; available: {', '.join(templates)}")
            with autocast() if autocast is not None else contextlib.nullcontext():
                classifier = zeroshot_classifier(model, tokenizer, classnames[lang], lang_templates, device)
            logits = features @ classifier.float()
            results[lang] = classification_metrics(logits, labels, len(classnames[lang]))
        results["_stream"] = {"skipped": skipped}
        return results
    finally:
        model.train(was_training)
