"""Zero-shot classification with prompt ensembling (Radford et al. 2021, sec 3.1.4).

Each class's text embedding is the mean of its L2-normalised template
embeddings, renormalised; an image is assigned the class of highest cosine
similarity. Image features are computed once and scored against the
classifier of every prompt language. The metrics follow clip_benchmark's
``zeroshot_classification`` (top-1, top-5, and mean per-class recall, which is
scikit-learn's balanced accuracy over the classes that have images).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmptm.evaluation.common import Autocast, CountingStream, EvaluationError, encode_images, encode_texts, evaluating

Prompts = Mapping[str, Sequence[str]] | Sequence[str]


def _by_language(prompts: Prompts) -> Mapping[str, Sequence[str]]:
    """Prompts by language; a plain list is the ``"default"`` language's."""
    return prompts if isinstance(prompts, Mapping) else {"default": prompts}


def check_templates(templates: Prompts, source: str = "templates") -> None:
    """Raise :class:`EvaluationError` for a template that does not fill one class name into ``{}``.

    A template is filled with ``template.format(classname)`` (open_clip's convention), so one with a
    second placeholder, a named one or a stray brace would fail only at evaluation, after training.
    """
    for lang, items in _by_language(templates).items():
        for template in items:
            where = "" if lang == "default" else f" (language '{lang}')"
            try:
                filled = template.format("\0")
            except (IndexError, KeyError, ValueError) as err:
                raise EvaluationError(
                    f"{source}: template '{template}'{where} cannot be filled with a class name by "
                    f"str.format ({type(err).__name__}: {err}); use one '{{}}' and write a literal brace as '{{{{'"
                ) from None
            if "\0" not in filled:
                raise EvaluationError(
                    f"{source}: template '{template}'{where} has no '{{}}' placeholder for the class name"
                )


def prompt_languages(
    classnames: Prompts,
    templates: Prompts,
    languages: Sequence[str] | None = None,
    primary_language: str | None = None,
) -> tuple[list[str], str]:
    """Check the prompts and choose the languages to score.

    A language is scored when it has class names and templates, either its own
    or the ``"default"`` (language-less) entry of its file. Every language must
    list the same number of class names.

    Args:
        classnames / templates: by language (``{"en": [...], "fr": [...]}``), or plain lists.
        languages: the languages to score (None: every language both files cover).
        primary_language: the language of the headline metrics (None: ``"en"`` if scored, else the first).

    Returns:
        The languages to score, and the primary one.

    Raises:
        EvaluationError: empty prompt lists, class-name lists of different lengths,
            a template without ``{}``, an unknown language.
    """
    classnames, templates = _by_language(classnames), _by_language(templates)
    for what, prompts in (("class names", classnames), ("templates", templates)):
        empty = [lang for lang, items in prompts.items() if not items]
        if not prompts or empty:
            where = f" for language '{empty[0]}'" if empty and empty[0] != "default" else ""
            raise EvaluationError(f"no {what}{where}")
    check_templates(templates)
    counts = {lang: len(items) for lang, items in classnames.items()}
    if len(set(counts.values())) > 1:
        raise EvaluationError(f"the languages have different numbers of class names: {counts}")
    named = [lang for lang in dict.fromkeys([*classnames, *templates]) if lang != "default"]
    covered = [
        lang
        for lang in named or ["default"]
        if (lang in classnames or "default" in classnames) and (lang in templates or "default" in templates)
    ]
    if not covered:
        raise EvaluationError(
            f"no language has both class names ({', '.join(classnames)}) and templates ({', '.join(templates)})"
        )
    for lang in [*(languages or []), *([primary_language] if primary_language is not None else [])]:
        if lang not in covered:
            raise EvaluationError(f"unknown language '{lang}'; the prompts cover: {', '.join(covered)}")
    chosen = list(dict.fromkeys(languages)) if languages else covered
    if primary_language is None:
        primary_language = "en" if "en" in chosen else chosen[0]
    elif primary_language not in chosen:
        raise EvaluationError(f"primary language '{primary_language}' is not among the scored: {', '.join(chosen)}")
    return chosen, primary_language


def zeroshot_classifier(
    model: nn.Module,
    tokenizer: Any,
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str,
    autocast: Autocast | None = None,
) -> torch.Tensor:
    """Class embeddings ``[embed_dim, num_classes]``: mean of normalised template embeddings, renormalised.

    Args:
        model: a dual encoder with ``encode_text``.
        tokenizer: maps a list of strings to token ids.
        classnames: the class names.
        templates: prompts with a ``{}`` placeholder for the class name; a class's prompts are encoded as one batch.
        device: where the model runs.
        autocast: a context-manager factory for mixed precision.
    """
    check_templates(templates)
    weights = []
    with torch.no_grad():
        for name in classnames:
            embeddings = encode_texts(model, tokenizer, [t.format(name) for t in templates], device, autocast)
            weights.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(weights, dim=1)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """top-1, top-5 and mean per-class recall as clip_benchmark computes them, plus per-class recall.

    Args:
        logits: ``[N, num_classes]`` scores.
        labels: ``[N]`` true classes.
        num_classes: the number of classes (top-5 is top-``min(5, num_classes)``).

    Returns:
        ``{"top1", "top5", "mean_per_class_recall", "per_class_recall": {class index: recall}, "num_images"}``;
        ``per_class_recall`` and the mean cover the classes that have images (as ``balanced_accuracy_score``).
    """
    n = int(labels.numel())
    topk = logits.topk(min(5, num_classes), dim=-1).indices
    top1 = topk[:, 0] == labels
    top5 = (topk == labels[:, None]).any(dim=-1)
    per_class = {}
    for c in labels.unique().tolist():
        mask = labels == c
        per_class[c] = int(top1[mask].sum()) / int(mask.sum())
    return {
        "top1": int(top1.sum()) / n,
        "top5": int(top5.sum()) / n,
        "mean_per_class_recall": sum(per_class.values()) / len(per_class),
        "per_class_recall": dict(sorted(per_class.items())),
        "num_images": n,
    }


def _image_features_and_labels(
    model: nn.Module, stream: CountingStream, device: torch.device | str, autocast: Autocast | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image features and labels of a whole stream."""
    features, labels = [], []
    input_key = getattr(getattr(model, "visual", None), "input_key", "image")
    for batch in stream:
        features.append(encode_images(model, batch[input_key], device, autocast))
        labels.append(batch["label"].to(device))
    if not features:
        raise stream.no_samples_error("images")
    return torch.cat(features), torch.cat(labels)


def zeroshot_classification(
    model: nn.Module,
    tokenizer: Any,
    batches: Iterable[Mapping[str, Any]],
    classnames: Prompts,
    templates: Prompts,
    *,
    languages: Sequence[str] | None = None,
    primary_language: str | None = None,
    device: torch.device | str = "cpu",
    autocast: Autocast | None = None,
    per_class: bool = False,
) -> dict[str, Any]:
    """Zero-shot classification of a labelled image stream, in every prompt language.

    Args:
        model: a dual encoder with ``encode_image`` / ``encode_text`` (OpenCLIP's interface).
        tokenizer: maps a list of strings to token ids.
        batches: ``{"image", "label"}`` batches (``image_text`` with a ``label_key``, or ``image_folder``);
            their ``"skipped"`` counts are summed.
        classnames / templates: by language (``{"en": [...], "fr": [...]}``) or plain lists; a language
            missing from one file uses that file's ``"default"`` entry (see :func:`prompt_languages`).
        languages: the languages to score (None: all the prompts cover).
        primary_language: the language of the headline metrics (None: ``"en"`` if scored, else the first).
        device: where the model runs.
        autocast: a context-manager factory for mixed precision (e.g. ``accelerator.autocast``).
        per_class: add the primary language's recall per class name.

    Returns:
        ``{"top1", "top5", "mean_per_class_recall", "num_images"}`` of the primary language, plus
        ``"primary_language"``, ``"per_language": {lang: {"top1", "top5", "mean_per_class_recall"}}``,
        ``"skipped_samples"`` and, with ``per_class``, ``"per_class_recall": {class name: recall}``
        (classes with images only).

    Raises:
        EvaluationError: bad prompts or languages (before any image is encoded), no images, or a label
            beyond the class names.
    """
    classnames, templates = _by_language(classnames), _by_language(templates)
    chosen, primary = prompt_languages(classnames, templates, languages, primary_language)
    stream = CountingStream(batches)
    with evaluating(model):
        features, labels = _image_features_and_labels(model, stream, device, autocast)
        num_classes = len(next(iter(classnames.values())))
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.numel():
            raise EvaluationError(
                f"the data has label {int(bad[0])} but {num_classes} class names (labels 0..{num_classes - 1})"
            )
        metrics = {}
        for lang in chosen:
            names = classnames.get(lang, classnames.get("default"))
            classifier = zeroshot_classifier(
                model, tokenizer, names, templates.get(lang, templates.get("default")), device, autocast
            )
            metrics[lang] = classification_metrics(features @ classifier, labels, num_classes)
    headline = metrics[primary]
    result = {
        **{key: headline[key] for key in ("top1", "top5", "mean_per_class_recall", "num_images")},
        "primary_language": primary,
        "per_language": {
            lang: {key: m[key] for key in ("top1", "top5", "mean_per_class_recall")} for lang, m in metrics.items()
        },
        "skipped_samples": stream.skipped,
    }
    if per_class:
        names = classnames.get(primary, classnames.get("default"))
        result["per_class_recall"] = {names[c]: recall for c, recall in headline["per_class_recall"].items()}
    return result
