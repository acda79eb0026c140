"""``mmptm generate``: images from a caption with a token decoder, optionally reranked by CLIP, or its CLIP accuracy."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mmptm.encoders.dalle import TokenDecoder
    from mmptm.generation.sampling import SamplingOptions

EXAMPLES = """examples:
  mmptm generate --checkpoint runs/dalle_tiny --prompt "a handwritten seven." --num 16 --out seven.png
  mmptm generate --checkpoint runs/dalle_tiny --prompt "le chiffre sept écrit à la main." --lang fr \\
      --num 32 --rerank runs/clip_tiny --keep 8 --out best.png --out-dir best/
  mmptm generate --checkpoint runs/dalle_tiny --evaluate runs/clip_tiny --lang en,fr,de --num 8 --out eval.png
"""


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse ``type``: a number of ``kind`` (int, float) above 0."""

    def parse(value: str) -> float:
        number = kind(value)
        if number <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
        return number

    return parse


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``generate`` subcommand to the ``mmptm`` parser."""
    p = sub.add_parser(
        "generate",
        help="generate images from a caption with a token decoder (DALL-E), optionally reranked by a CLIP",
        description="Sample images for a caption with a token decoder checkpoint (`mmptm train dalle_tiny.yaml`),\n"
        "decode them with its image tokenizer and write a PNG grid; with --rerank, a CLIP checkpoint orders\n"
        "them by image-caption similarity and the best --keep are written (Ramesh et al. 2021, sec. 2.3).\n"
        "With --evaluate CLIP instead of --prompt: generate --num images for each class prompt\n"
        "('a handwritten <digit>.' in each --lang) and report how often CLIP classifies them as the prompted\n"
        "class, without (eval/gen_clip_acc) and with reranking (eval/gen_clip_acc_reranked: the best of --num\n"
        "by CLIP similarity to the prompt). Prints one JSON object.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="token decoder checkpoint, or a run folder (its latest one)")
    task = p.add_mutually_exclusive_group(required=True)
    task.add_argument("--prompt", help="the caption to draw")
    task.add_argument("--evaluate", metavar="CLIP_CHECKPOINT", help="report the CLIP accuracy of class prompts")
    p.add_argument(
        "--lang",
        help="the prompt's language, checked against the languages the model was trained on; with --evaluate "
        "comma-separated languages of the class prompts (default: the model's)",
    )
    p.add_argument("--num", type=_positive(int), default=8, help="images to sample (per class prompt with --evaluate)")
    p.add_argument("--out", help="PNG grid to write (with --evaluate: the best image of each class prompt)")
    p.add_argument("--out-dir", help="also write each kept image as DIR/000.png, 001.png, ... (best first)")
    p.add_argument("--rerank", metavar="CLIP_CHECKPOINT", help="order the images by CLIP similarity to the prompt")
    p.add_argument("--keep", type=_positive(int), help="with --rerank: keep the best K (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 is greedy (default 1)")
    p.add_argument("--top-k", type=_positive(int), help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=_positive(float), help="sample among the most likely tokens holding mass p")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (needs text_dropout in training)")
    p.add_argument("--classnames", default="demo:classnames", help="--evaluate: class names file")
    p.add_argument("--templates", default="demo:templates", help="--evaluate: templates file (the first makes "
                   "the generation prompt; CLIP classifies with all English ones)")
    p.add_argument("--batch-size", type=_positive(int), default=64, help="images sampled together")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from mmptm.generation.pipeline import GenerationError, load_token_decoder
    from mmptm.generation.sampling import SamplingOptions

    if args.prompt is not None and not args.out:
        raise GenerationError("--out is required with --prompt: the PNG grid to write")
    if args.keep is not None and not args.rerank:
        raise GenerationError("--keep needs --rerank CLIP_CHECKPOINT (which images are best)")
    if args.evaluate and args.rerank:
        raise GenerationError("--evaluate reranks with its own CLIP checkpoint: leave --rerank out")
    try:
        options = SamplingOptions(args.temperature, args.top_k, args.top_p, args.guidance)
    except ValueError as err:
        raise GenerationError(str(err)) from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    model, tokenizer, _ = load_token_decoder(args.checkpoint, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    common = {
        "checkpoint": str(args.checkpoint),
        "seed": args.seed,
        "sampling": {"temperature": options.temperature, "top_k": options.top_k, "top_p": options.top_p,
                     "guidance_scale": options.guidance_scale},
    }
    if args.evaluate:
        result = _evaluate(args, model, tokenizer, options, generator, device)
    else:
        result = _prompt(args, model, tokenizer, options, generator, device)
    print(json.dumps({**result, **common, "seconds": round(time.perf_counter() - started, 2)}, indent=2,
                     ensure_ascii=False))
    return 0


def _prompt(
    args: argparse.Namespace, model: TokenDecoder, tokenizer: Any, options: SamplingOptions,
    generator: torch.Generator, device: str,
) -> dict[str, Any]:
    """Sample, optionally rerank, and write the images of one prompt."""
    from mmptm.generation.pipeline import (
        GenerationError,
        clip_image_features,
        clip_prompt_scores,
        generate_images,
        load_clip,
        save_grid,
        save_images,
    )

    if args.lang is not None:
        try:
            model.check_language(args.lang)
        except ValueError as err:
            raise GenerationError(str(err)) from None
    clip = load_clip(args.rerank, device) if args.rerank else None  # a bad CLIP fails before the sampling
    images = generate_images(model, tokenizer, [args.prompt], args.num, options, generator, args.batch_size)
    result: dict[str, Any] = {"prompt": args.prompt, "language": args.lang, "num_generated": len(images)}
    if clip is not None:
        scores = clip_prompt_scores(clip, clip_image_features(clip, images, device), [args.prompt] * len(images),
                                    device).cpu()
        order = scores.argsort(descending=True)[: args.keep or len(images)]
        images = images[order]
        result["clip_scores"] = [round(float(s), 4) for s in scores[order]]
        result["rerank"] = str(args.rerank)
    result["num_kept"] = len(images)
    result["grid"] = str(save_grid(images, args.out))
    if args.out_dir:
        result["images"] = [str(path) for path in save_images(images, args.out_dir)]
    return result


def _evaluate(
    args: argparse.Namespace, model: TokenDecoder, tokenizer: Any, options: SamplingOptions,
    generator: torch.Generator, device: str,
) -> dict[str, Any]:
    """The CLIP accuracy of generated class prompts (``gen_clip``), with a grid of each prompt's best image."""
    from mmptm.evaluation import clip_generation_accuracy, load_prompt_file, load_templates
    from mmptm.generation.pipeline import load_clip, save_grid, save_images

    languages = [lang for lang in args.lang.split(",") if lang] if args.lang else None
    classnames = load_prompt_file(args.classnames, "classnames")
    templates = load_templates(args.templates)
    clip = load_clip(args.evaluate, device)
    evaluation = clip_generation_accuracy(
        model, tokenizer, clip, classnames, templates, languages=languages, num_samples=args.num, options=options,
        generator=generator, batch_size=args.batch_size, device=device,
    )
    result: dict[str, Any] = {f"eval/{key}": value for key, value in evaluation.metrics.items()}
    result["clip"] = str(args.evaluate)
    best = evaluation.images[torch.arange(len(evaluation.prompts)), evaluation.best]
    if args.out:  # one row per language, one column per class
        result["grid"] = str(save_grid(best, args.out, columns=len(next(iter(classnames.values())))))
    if args.out_dir:
        result["images"] = [str(path) for path in save_images(best, args.out_dir)]
    result["prompts"] = evaluation.prompts
    return result
