"""The ``mmptm`` command line: train, data, tokenizer, zeroshot, generate, convert, list."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from mmptm.generation.cli import add_generate_parser
from mmptm.interop.cli import add_convert_parser

if TYPE_CHECKING:
    from mmptm.data_pipelines.context import DataContext
    from mmptm.evaluation.common import Autocast


class CLIError(Exception):
    """A bad combination of command-line arguments (exit status 2, message without a traceback)."""

EXAMPLES = """examples:
  mmptm train clip_tiny.yaml                       train the demo CLIP (builds the demo data on first use)
  mmptm train clip_base.yaml train.max_steps=100 data.train.shards='/data/laion/{00000..00099}.tar'
  mmptm train my.yaml --resume --output-dir runs/my
  mmptm data demo                                  build the embedded demo dataset
  mmptm data shards images/ shards/                write webdataset shards from a folder, CSV or JSONL
  mmptm tokenizer train corpus.jsonl --output spm.model --vocab-size 32000 --alpha 0.3
  mmptm tokenizer images --checkpoint runs/dvae_tiny --data demo:train --out tokens/   dVAE image tokens
  mmptm zeroshot classify --checkpoint runs/clip_tiny --data demo:val --classnames demo:classnames \
      --templates demo:templates                   zero-shot accuracy of a checkpoint, as JSON
  mmptm zeroshot retrieve --checkpoint runs/clip_tiny --data demo:val --language en
  mmptm generate --checkpoint runs/dalle_tiny --prompt "a handwritten seven." --num 16 --out seven.png \
      --rerank runs/clip_tiny --keep 4            text-to-image with a token decoder, reranked by CLIP
  mmptm convert open_clip ViT-B-32.pt ckpt/ --model ViT-B-32      import OpenCLIP weights (also: hf, to-hf)
  mmptm list                                       registered encoders, models, objectives, datasets, configs
"""


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a YAML config",
        description="Train a model from a YAML config. CONFIG is a path or the name of a bundled config "
        "(see `mmptm list`); overrides a.b=c are parsed as YAML and applied on top.",
    )
    p.add_argument("config", help="config file, or a bundled config name such as clip_tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="a.b=c", help="config overrides, e.g. train.max_steps=100")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output dir")
    p.add_argument(
        "--output-dir",
        help="run folder (default: train.output_dir or runs/<config name>); a run without --resume needs one "
        "without checkpoints",
    )
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a module (pkg.module or path/to/file.py) that registers components; repeatable",
    )
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from mmptm.config import load_config

    config = load_config(args.config, args.overrides, imports=args.imports)
    from mmptm.training.trainer import Trainer

    trainer = Trainer(config, output_dir=args.output_dir, resume=args.resume)
    metrics = trainer.fit()
    if trainer.is_main:
        print(f"run folder: {trainer.output_dir}")
        if trainer.stopped_by:
            print(f"stopped by {trainer.stopped_by} at step {trainer.step}; continue with --resume")
        elif "eval/zeroshot_top1" in metrics:
            langs = {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.startswith("eval/zeroshot_top1/")}
            print(
                f"zero-shot top-1 ({trainer.zeroshot_language}): {metrics['eval/zeroshot_top1']:.4f}  "
                + "  ".join(f"{lang}={acc:.3f}" for lang, acc in langs.items())
            )
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build datasets: the embedded demo data, or shards from your files")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="{demo,shards}")
    demo = data_sub.add_parser(
        "demo",
        help="build the embedded demo data (handwritten digits with captions in 10 languages; "
        "multilingual text corpus)",
        description="Build the demo data into $MMPTM_CACHE (default ~/.cache/mmptm): 'images' is demo-v2, "
        "scikit-learn's 1,797 handwritten digits as webdataset shards with multilingual captions, "
        "a seeded train/val split and a sentencepiece tokenizer; 'multilingual' is demo-multilingual-v2, "
        "num2words numbers and CLDR names as monolingual and parallel text shards in 8 languages with "
        "held-out items and a sentencepiece tokenizer. Bundled configs build what they need on first use.",
    )
    demo.add_argument(
        "--corpus", choices=("images", "multilingual", "all"), default="all", help="what to build (default all)"
    )
    demo.add_argument("--root", help="build here instead of the cache folder (needs --corpus images or multilingual)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    demo.add_argument("--force", action="store_true", help="rebuild even if it exists")
    demo.set_defaults(func=_data_demo)

    shards = data_sub.add_parser(
        "shards",
        help="write webdataset shards (img2dataset layout) from a folder, CSV, JSONL or parquet",
        description="SOURCE is a folder of images with same-named .txt captions, or a CSV/JSONL/parquet "
        "file with image path and caption columns (paths relative to the file).",
    )
    shards.add_argument("source")
    shards.add_argument("output_dir")
    shards.add_argument("--samples-per-shard", type=int, default=10000)
    shards.add_argument("--image-column", default="image")
    shards.add_argument("--caption-column", default="caption")
    shards.add_argument("--resize", type=int, help="re-encode images with this shorter side")
    shards.add_argument("--max-samples", type=int)
    shards.set_defaults(func=_data_shards)


def _data_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mmptm.data_pipelines.demo import ensure_demo
    from mmptm.data_pipelines.demo_multilingual import ensure_multilingual_demo

    if args.root and args.corpus == "all":
        raise CLIError("data demo: --root builds one corpus; add --corpus images or --corpus multilingual")
    root = Path(args.root) if args.root else None
    built: dict[str, object] = {}
    if args.corpus in ("images", "all"):
        paths = ensure_demo(root=root, seed=args.seed, force=args.force)
        built["images"] = {
            "root": str(paths.root),
            "train_shards": paths.train_shards,
            "val_shards": paths.val_shards,
            "tokenizer": str(paths.tokenizer),
            "num_train": paths.num_train,
            "num_val": paths.num_val,
            "languages": list(paths.languages),
        }
    if args.corpus in ("multilingual", "all"):
        directory = ensure_multilingual_demo(root=root, seed=args.seed, force=args.force)
        built["multilingual"] = {"root": str(directory), **json.loads((directory / "info.json").read_text())}
    _print_json(**built)
    return 0


def _print_json(**fields: object) -> None:
    """A command's result: one JSON object on stdout."""
    print(json.dumps(fields, indent=2))


def _data_shards(args: argparse.Namespace) -> int:
    from mmptm.data_pipelines.shards import write_shards

    stats = write_shards(
        args.source,
        args.output_dir,
        samples_per_shard=args.samples_per_shard,
        image_column=args.image_column,
        caption_column=args.caption_column,
        resize=args.resize,
        max_samples=args.max_samples,
    )
    _print_json(
        num_samples=stats.num_samples,
        num_skipped=stats.num_skipped,
        shards=[str(s) for s in stats.shards],
        skipped_reasons=stats.skipped_reasons,
    )
    return 0


def _add_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train text tokenizers; tokenise image shards with a dVAE")
    tok_sub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="{train,images}")
    t = tok_sub.add_parser(
        "train",
        help="train a multilingual sentencepiece model",
        description="Train a sentencepiece model on .txt (one sentence per line; language = file stem), "
        ".jsonl ({'text', 'lang'}) or webdataset .tar inputs, sampling languages with q_i ~ p_i^alpha "
        "(Lample & Conneau 2019).",
    )
    t.add_argument("inputs", nargs="+", help="text, JSONL or tar shard files")
    t.add_argument("--output", required=True, help="path of the .model file to write")
    t.add_argument("--vocab-size", type=int, default=32000)
    t.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    t.add_argument("--character-coverage", type=float, default=0.9995)
    t.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false")
    t.add_argument("--alpha", type=float, help="language sampling exponent (XLM: 0.5, XLM-R: 0.3)")
    t.add_argument("--text-key", default="text")
    t.add_argument("--lang-key", default="lang")
    t.set_defaults(func=_tokenizer_train)

    images = tok_sub.add_parser(
        "images",
        help="precompute the image tokens of image-text shards with a dvae/vqvae checkpoint",
        description="Write token shards (00000.tar, ...): per sample its key, tokens.npy (the dVAE's token "
        "grid, int16/int32), its txt and json captions and its cls label, for the image_tokens data stream "
        "(DALL-E's token decoder). Samples without a decodable image or caption are skipped and counted. "
        "Prints one JSON object.",
    )
    images.add_argument("--checkpoint", required=True, help="a dvae/vqvae checkpoint, or a run folder (its latest)")
    images.add_argument("--data", required=True, help="image-text shards (pattern, folder of *.tar, demo:train)")
    images.add_argument("--out", required=True, help="folder to write the token shards into")
    images.add_argument("--batch-size", type=_int_at_least(1), default=256)
    images.add_argument("--samples-per-shard", type=_int_at_least(1), default=10000)
    images.add_argument("--num-workers", type=_int_at_least(0), default=2, help="data loader processes")
    images.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    images.set_defaults(func=_tokenizer_images)


def _tokenizer_train(args: argparse.Namespace) -> int:
    from mmptm.data_pipelines.tokenizer import train_tokenizer_cli

    path = train_tokenizer_cli(
        args.inputs,
        args.output,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        byte_fallback=args.byte_fallback,
        alpha=args.alpha,
        text_key=args.text_key,
        lang_key=args.lang_key,
    )
    print(path)
    return 0


def _tokenizer_images(args: argparse.Namespace) -> int:
    import torch

    from mmptm.data_pipelines.image_tokens import tokenize_image_shards

    stats = tokenize_image_shards(
        args.checkpoint,
        args.data,
        args.out,
        batch_size=args.batch_size,
        samples_per_shard=args.samples_per_shard,
        num_workers=args.num_workers,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )
    _print_json(
        num_samples=stats.num_samples,
        num_skipped=stats.num_skipped,
        shards=[str(path) for path in stats.shards],
        grid_size=stats.grid_size,
        codebook_size=stats.codebook_size,
    )
    return 0


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers >= ``minimum``."""

    def parse(value: str) -> int:
        number = int(value)
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {number}")
        return number

    return parse


def _add_zeroshot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zeroshot", help="zero-shot evaluation of a checkpoint: classification, retrieval")
    zs_sub = p.add_subparsers(dest="zeroshot_command", required=True, metavar="{classify,retrieve}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="an mmptm checkpoint, or a run folder (its latest one)")
    common.add_argument(
        "--language",
        dest="languages",
        action="append",
        metavar="LANG",
        help="language(s) to evaluate, repeatable or comma-separated (default: all in the prompts or captions)",
    )
    common.add_argument("--batch-size", type=_int_at_least(1), default=256)
    common.add_argument(
        "--num-workers", type=_int_at_least(0), default=2, help="data loader processes (0: in this process)"
    )
    common.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast precision")
    common.add_argument("--device", help="torch device (default: cuda if available, else cpu)")

    classify = zs_sub.add_parser(
        "classify",
        parents=[common],
        help="zero-shot classification with prompt ensembling; prints one JSON object",
        description="Zero-shot classification (Radford et al. 2021): each class is the mean of its normalised "
        "template embeddings; top-1, top-5 and mean per-class recall as clip_benchmark computes them, for "
        "the primary language, plus top-1 per language.",
    )
    classify.add_argument(
        "--data",
        required=True,
        help="labelled webdataset shards (pattern, folder of *.tar, demo:val) or an image folder with one "
        "subfolder per class (ImageNet layout)",
    )
    classify.add_argument(
        "--classnames",
        help="class names: a text file (one per line) or JSON {lang: [...]}; default for an image folder: "
        "its subfolder names, sorted",
    )
    classify.add_argument(
        "--templates",
        required=True,
        help="prompts with {} for the class name: a text file (one per line) or JSON {lang: [...]}",
    )
    classify.add_argument("--label-key", default="cls", help="extension of the integer label file in the shards")
    classify.add_argument(
        "--primary-language", help="language of the headline metrics (default: en if scored, else the first)"
    )
    classify.add_argument("--per-class", action="store_true", help="add the recall of every class")
    classify.set_defaults(func=_zeroshot_classify)

    retrieve = zs_sub.add_parser(
        "retrieve",
        parents=[common],
        help="zero-shot image-text (or, with --parallel, cross-lingual) retrieval; prints one JSON object",
        description="Image->text and text->image Recall@1/5/10 on image-text shards; every caption of an image "
        "(its json captions in the chosen languages, or its txt) counts, as in the COCO/Flickr30k protocol of "
        "clip_benchmark. With --parallel: Tatoeba-style accuracy@1 of retrieving each sentence's translation, "
        "both ways, on parallel-text shards ({src, tgt, src_lang, tgt_lang} json). A fusion checkpoint "
        "(visualbert, vilbert) ranks with its image-text matching head: every pair (small sets), or with "
        "--rerank-from the top-k candidates of a dual encoder.",
    )
    retrieve.add_argument("--data", required=True, help="image-text shards, or parallel-text shards with --parallel")
    retrieve.add_argument("--parallel", action="store_true", help="cross-lingual text->text retrieval")
    retrieve.add_argument(
        "--rerank-from",
        metavar="CHECKPOINT",
        help="fusion checkpoints only: a dual encoder (CLIP) checkpoint whose top-k captions per image and images "
        "per caption the matching head reorders (default: score every image-caption pair)",
    )
    retrieve.add_argument(
        "--top-k", type=_int_at_least(1), default=16, help="candidates per query reranked with --rerank-from"
    )
    retrieve.set_defaults(func=_zeroshot_retrieve)


def _split_languages(values: list[str] | None) -> list[str] | None:
    """``--language en --language fr,de`` -> ``["en", "fr", "de"]`` (None when not given)."""
    return [lang for value in values for lang in value.split(",") if lang] if values else None


def _load_for_evaluation(
    args: argparse.Namespace, checkpoint: str | None = None
) -> tuple[Any, Any, DataContext, str, Autocast | None]:
    """The model and tokenizer of ``checkpoint`` (default: ``--checkpoint``), its eval data context, the device
    and the autocast factory."""
    import torch

    from mmptm.data_pipelines.context import model_data_context
    from mmptm.evaluation import precision_autocast
    from mmptm.models import load_pretrained

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    autocast = precision_autocast(args.precision, device)
    model, tokenizer, _ = load_pretrained(checkpoint or args.checkpoint, device=device)
    # The dataset's eval transform is load_pretrained's preprocess: built from the same tower attributes.
    context = model_data_context(model, tokenizer=tokenizer, training=False)
    return model, tokenizer, context, device, autocast


def _zeroshot_classify(args: argparse.Namespace) -> int:
    from mmptm.evaluation import (
        classification_stream,
        load_classnames,
        load_templates,
        prompt_languages,
        zeroshot_classification,
    )

    languages = _split_languages(args.languages)
    classnames = load_classnames(args.classnames, args.data)
    templates = load_templates(args.templates)
    prompt_languages(classnames, templates, languages, args.primary_language)  # bad prompts fail before any work
    model, tokenizer, context, device, autocast = _load_for_evaluation(args)
    stream = classification_stream(args.data, context, args.label_key, args.batch_size, args.num_workers)
    result = zeroshot_classification(
        model,
        tokenizer,
        stream,
        classnames,
        templates,
        languages=languages,
        primary_language=args.primary_language,
        device=device,
        autocast=autocast,
        per_class=args.per_class,
    )
    _print_json(**result)
    return 0


def _zeroshot_retrieve(args: argparse.Namespace) -> int:
    from mmptm.encoders.fusion import FusionModel
    from mmptm.evaluation import (
        EvaluationError,
        crosslingual_retrieval,
        parallel_stream,
        retrieval_stream,
        zeroshot_retrieval,
    )

    languages = _split_languages(args.languages)
    model, tokenizer, context, device, autocast = _load_for_evaluation(args)
    if isinstance(model, FusionModel) and not args.parallel:
        return _itm_retrieve(args, model, tokenizer, context, device, autocast, languages)
    if args.rerank_from:
        raise EvaluationError(
            "--rerank-from reranks with a fusion model's matching head; --checkpoint must be a visualbert or "
            f"vilbert checkpoint (got {type(model).__name__}) and --parallel unset"
        )
    if args.parallel:
        stream = parallel_stream(args.data, context, args.batch_size, args.num_workers)
        result = crosslingual_retrieval(model, tokenizer, stream, languages=languages, device=device, autocast=autocast)
    else:
        stream = retrieval_stream(args.data, context, languages, args.batch_size, args.num_workers)
        result = zeroshot_retrieval(model, tokenizer, stream, device=device, autocast=autocast)
    _print_json(**result)
    return 0


def _itm_retrieve(
    args: argparse.Namespace,
    model: Any,
    tokenizer: Any,
    context: DataContext,
    device: str,
    autocast: Autocast | None,
    languages: list[str] | None,
) -> int:
    """``zeroshot retrieve`` of a fusion checkpoint: its matching head ranks all pairs or a dual encoder's top-k."""
    from mmptm.evaluation import dual_encoder_candidates, fusion_stream, itm_image_text_retrieval, retrieval_stream

    candidates = None
    if args.rerank_from:
        dual, dual_tokenizer, dual_context, _, _ = _load_for_evaluation(args, args.rerank_from)
        dual_stream = retrieval_stream(args.data, dual_context, languages, args.batch_size, args.num_workers)
        candidates = dual_encoder_candidates(
            dual, dual_tokenizer, dual_stream, args.top_k, device=device, autocast=autocast
        )
    stream = fusion_stream(
        model, context, args.data, languages, args.batch_size, args.num_workers, all_captions=True
    )
    result = itm_image_text_retrieval(
        model, tokenizer, stream, candidates=candidates, device=device, autocast=autocast
    )
    _print_json(**result)
    return 0


def _add_list(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list registered components and bundled configs")
    p.add_argument(
        "--import", dest="imports", action="append", default=[], metavar="MODULE", help="import a user module first"
    )
    p.set_defaults(func=_list)


def _list(args: argparse.Namespace) -> int:
    import mmptm.data_pipelines  # noqa: F401
    import mmptm.encoders  # noqa: F401
    import mmptm.evaluation  # noqa: F401
    import mmptm.objectives  # noqa: F401
    from mmptm.config import bundled_config_names, import_modules
    from mmptm.registry import DATASETS, ENCODERS, EVALUATORS, MODELS, OBJECTIVES

    import_modules(args.imports)
    for registry in (MODELS, ENCODERS, OBJECTIVES, DATASETS, EVALUATORS):
        print(f"{registry.kind}s:")
        for name in registry.names():
            print(f"  {registry.describe(name)}")
    print("configs:")
    for name in bundled_config_names():
        print(f"  {name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmptm",
        description="Multimodal and multilingual pretraining.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{train,data,tokenizer,zeroshot,generate,convert,list}"
    )
    _add_train(sub)
    _add_data(sub)
    _add_tokenizer(sub)
    _add_zeroshot(sub)
    add_generate_parser(sub)
    add_convert_parser(sub)
    _add_list(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options (`train x.yaml --resume a.b=c`): argparse leaves those over.
    if extra and getattr(args, "command", None) == "train" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from mmptm.config import ConfigError
    from mmptm.evaluation.common import EvaluationError
    from mmptm.generation.pipeline import GenerationError
    from mmptm.interop.common import ConversionError
    from mmptm.registry import UnknownNameError

    try:
        return args.func(args)
    except (
        CLIError, ConfigError, UnknownNameError, FileNotFoundError, EvaluationError, ConversionError, GenerationError
    ) as err:
        print(f"mmptm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
