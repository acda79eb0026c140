"""How often a CLIP recognises what a token decoder was asked to draw, with and without CLIP reranking.

Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", sec. 2.3 and 3.2:
images sampled for a caption are reranked by a contrastive model, and the
share of samples that match the caption grows with the number reranked. On a
labelled prompt set (the demo's "a handwritten <digit>" in several
languages) a generated image counts as correct when CLIP's zero-shot
classifier over the class names (prompt-ensembled, in one language, as
:mod:`mmptm.evaluation.zeroshot`) assigns it the prompted class:

- ``gen_clip_acc``: over every sample (no reranking);
- ``gen_clip_acc_reranked``: over the best sample of each prompt, the one whose
  CLIP embedding is most similar to the prompt's (best of ``num_samples``);
- the same per prompt language (``gen_clip_acc/<lang>``, ``gen_clip_acc_reranked/<lang>``),
  and ``gen_clip_score``, the mean image-prompt cosine similarity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from mmptm.data_pipelines.demo import resolve
from mmptm.evaluation.common import EvalContext, EvaluationError, evaluating
from mmptm.evaluation.inputs import load_prompt_file, load_templates
from mmptm.evaluation.zeroshot import prompt_languages, zeroshot_classifier
from mmptm.generation.pipeline import (
    GenerationError,
    clip_image_features,
    clip_prompt_scores,
    generate_images,
    load_clip,
)
from mmptm.generation.sampling import SamplingOptions
from mmptm.models import Pretrained
from mmptm.registry import register_evaluator


class GenerationEvaluation(NamedTuple):
    """What :func:`clip_generation_accuracy` returns.

    Attributes:
        metrics: ``gen_clip_acc``, ``gen_clip_acc_reranked``, their per-language values, ``gen_clip_score``
            and ``gen_num_images``.
        prompts: the captions, language-major then class order.
        images: ``[len(prompts), num_samples, 3, H, W]`` in [0, 1].
        best: ``[len(prompts)]`` index of each prompt's best sample by CLIP score.
    """

    metrics: dict[str, float]
    prompts: list[str]
    images: torch.Tensor
    best: torch.Tensor


def class_prompts(
    classnames: Mapping[str, Sequence[str]], templates: Mapping[str, Sequence[str]], languages: Sequence[str],
    template_index: int,
) -> tuple[list[str], list[int], list[str]]:
    """Template ``template_index`` of each language filled with each of its class names.

    Returns:
        ``(prompts, labels, languages)``, one entry per prompt, language-major.

    Raises:
        EvaluationError: a language without that many templates.
    """
    prompts, labels, prompt_langs = [], [], []
    for lang in languages:
        names = classnames.get(lang, classnames.get("default"))
        lang_templates = templates.get(lang, templates.get("default"))
        if not -len(lang_templates) <= template_index < len(lang_templates):
            raise EvaluationError(f"template_index {template_index}: language '{lang}' has {len(lang_templates)} "
                                  "templates")
        for label, name in enumerate(names):
            prompts.append(lang_templates[template_index].format(name))
            labels.append(label)
            prompt_langs.append(lang)
    return prompts, labels, prompt_langs


def clip_generation_accuracy(
    decoder: Any,
    tokenizer: Any,
    clip: Pretrained,
    classnames: Mapping[str, Sequence[str]],
    templates: Mapping[str, Sequence[str]],
    *,
    languages: Sequence[str] | None = None,
    classify_language: str = "en",
    template_index: int = 0,
    num_samples: int = 8,
    options: SamplingOptions | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> GenerationEvaluation:
    """Generate ``num_samples`` images per class prompt and score them with a CLIP zero-shot classifier.

    Args:
        decoder: the token decoder (with its image tokenizer).
        tokenizer: its text tokenizer.
        clip: the CLIP checkpoint (model, tokenizer, eval transform) that classifies and reranks.
        classnames / templates: by language (``{"en": [...], ...}``), as the zero-shot prompt files.
        languages: the prompt languages (None: those the decoder was trained on if recorded, else every
            language the prompt files cover).
        classify_language: the language of CLIP's classifier prompts.
        template_index: which template of each language makes the generation prompt.
        num_samples: images per prompt (the reranking keeps the best one).
        options: how tokens are drawn.
        generator: the source of every random draw.
        batch_size: images sampled together.
        device: where the models are.

    Raises:
        EvaluationError: unknown languages, or languages the decoder was not trained on.
    """
    if languages is None and decoder.languages is not None:
        languages = decoder.languages
    chosen, _ = prompt_languages(classnames, templates, languages)
    prompt_languages(classnames, templates, [classify_language])
    for lang in chosen:
        try:
            decoder.check_language(lang)
        except ValueError as err:
            raise EvaluationError(str(err)) from None
    prompts, labels, prompt_langs = class_prompts(classnames, templates, chosen, template_index)
    images = generate_images(decoder, tokenizer, prompts, num_samples, options, generator, batch_size)
    features = clip_image_features(clip, images, device)
    names = classnames.get(classify_language, classnames.get("default"))
    with evaluating(clip.model):
        classifier = zeroshot_classifier(
            clip.model, clip.tokenizer, names, templates.get(classify_language, templates.get("default")), device
        )
    predicted = (features @ classifier).argmax(dim=-1).view(len(prompts), num_samples).cpu()
    scores = clip_prompt_scores(clip, features, [p for p in prompts for _ in range(num_samples)], device)
    scores = scores.view(len(prompts), num_samples).cpu()
    best = scores.argmax(dim=1)
    correct = predicted == torch.tensor(labels)[:, None]
    best_correct = correct[torch.arange(len(prompts)), best]
    metrics = {
        "gen_clip_acc": correct.float().mean().item(),
        "gen_clip_acc_reranked": best_correct.float().mean().item(),
        "gen_clip_score": scores.mean().item(),
        "gen_num_images": float(correct.numel()),
    }
    for lang in chosen:
        rows = torch.tensor([prompt_lang == lang for prompt_lang in prompt_langs])
        metrics[f"gen_clip_acc/{lang}"] = correct[rows].float().mean().item()
        metrics[f"gen_clip_acc_reranked/{lang}"] = best_correct[rows].float().mean().item()
    shape = (len(prompts), num_samples, *images.shape[1:])
    return GenerationEvaluation(metrics, prompts, images.view(shape), best)


@register_evaluator("gen_clip")
def gen_clip(
    model: Any,
    context: EvalContext,
    clip: str,
    languages: list[str] | None = None,
    classify_language: str = "en",
    classnames: str = "demo:classnames",
    templates: str = "demo:templates",
    template_index: int = 0,
    num_samples: int = 8,
    batch_size: int = 128,
    seed: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance_scale: float | None = None,
) -> dict[str, float]:
    """CLIP zero-shot accuracy of images generated for class prompts, without and with CLIP reranking.

    Args:
        model: the token decoder being trained.
        context: the trainer's evaluation context.
        clip: the CLIP checkpoint or run folder that classifies and reranks.
        languages: the prompt languages (None: the decoder's recorded languages, else all the prompts cover).
        classify_language: the language of CLIP's classifier prompts.
        classnames / templates: prompt files (``{lang: [...]}`` JSON), as for zero-shot classification.
        template_index: the template of each language that makes the generation prompt
            (the demo's 0: "a handwritten {}." and its translations).
        num_samples: images per prompt; the reranked accuracy keeps the best of them.
        batch_size: images sampled together.
        seed: seed of the sampling.
        temperature / top_k / top_p / guidance_scale: see :class:`~mmptm.generation.sampling.SamplingOptions`.

    Returns:
        ``gen_clip_acc``, ``gen_clip_acc_reranked``, per language ``gen_clip_acc/<lang>`` and
        ``gen_clip_acc_reranked/<lang>``, ``gen_clip_score`` and ``gen_num_images``.
    """
    try:
        clip_checkpoint = load_clip(resolve(clip), device=str(context.device))
    except (FileNotFoundError, GenerationError) as err:
        raise EvaluationError(f"gen_clip: clip={clip}: {err}") from None
    generator = torch.Generator(device=context.device).manual_seed(seed)
    return clip_generation_accuracy(
        model,
        context.tokenizer,
        clip_checkpoint,
        load_prompt_file(classnames, "classnames"),
        load_templates(templates),
        languages=languages,
        classify_language=classify_language,
        template_index=template_index,
        num_samples=num_samples,
        options=SamplingOptions(temperature, top_k, top_p, guidance_scale),
        generator=generator,
        batch_size=batch_size,
        device=context.device,
    ).metrics
