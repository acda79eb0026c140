"""``mmptm convert``: import OpenCLIP / OpenAI / Hugging Face CLIP checkpoints, export to Hugging Face."""

from __future__ import annotations

import argparse
import json


def add_convert_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``mmptm convert {open_clip,hf,hf-visualbert,hf-xlmr,hf-mbart,to-hf}``."""
    p = sub.add_parser(
        "convert",
        help="import OpenCLIP / Hugging Face CLIP, VisualBERT, XLM-R and mBART checkpoints; export CLIP to HF",
        description="Convert checkpoints into mmptm checkpoint folders (config.yaml + model.safetensors + "
        "the original tokenizer files), usable by load_pretrained, `mmptm zeroshot` and train.init_from; "
        "or export an mmptm CLIP as a Hugging Face CLIPModel folder.",
    )
    convert_sub = p.add_subparsers(
        dest="convert_command", required=True, metavar="{open_clip,hf,hf-visualbert,hf-xlmr,hf-mbart,to-hf}"
    )
    oc = convert_sub.add_parser(
        "open_clip",
        help="an OpenCLIP or OpenAI CLIP weights file (.pt/.bin/.safetensors, TorchScript archive)",
        description="Import OpenAI-architecture CLIP weights (ViT or ModifiedResNet image tower). The "
        "architecture is read from the tensor shapes; --model names the open_clip config for the activation "
        "and head counts, and refuses configs whose options change the features without adding weights "
        "(pooling other than open_clip's default, text no_causal_mask). Without --model those options cannot "
        "be detected from the weights.",
    )
    oc.add_argument("weights", help="weights file")
    oc.add_argument("output_dir", help="checkpoint folder to create")
    oc.add_argument("--model", dest="model_name", help="open_clip model name, e.g. ViT-B-32 or RN50-quickgelu")
    gelu = oc.add_mutually_exclusive_group()
    gelu.add_argument("--quick-gelu", dest="quick_gelu", action="store_true", default=None,
                      help="QuickGELU activations (OpenAI's weights; default for TorchScript archives)")
    gelu.add_argument("--gelu", dest="quick_gelu", action="store_false", help="exact GELU activations")
    oc.add_argument("--tokenizer", help="CLIP BPE vocabulary (.txt.gz, or a folder with vocab.json + merges.txt); "
                    "default: the one open_clip ships")
    oc.set_defaults(func=_convert_open_clip)

    hf = _hf_folder_parser(convert_sub, "hf", "folder written by CLIPModel.save_pretrained (with its tokenizer files)",
                           help="a Hugging Face CLIPModel folder (config.json + safetensors)")
    hf.set_defaults(func=_convert_hf)

    vb = _hf_folder_parser(
        convert_sub,
        "hf-visualbert",
        SAVE_PRETRAINED_FOLDER,
        help="a Hugging Face VisualBertModel / VisualBertForPreTraining folder",
        description="Import VisualBERT (Li et al. 2019) weights, with the pretraining heads when present "
        "(cls.predictions -> the masked-LM head, cls.seq_relationship -> the image-text matching head), as a "
        "visualbert checkpoint that reads region features (vision: null).",
    )
    vb.add_argument("--tokenizer", help="BERT's vocab.txt or a folder with it (default: the model folder's); the "
                    "released checkpoints use bert-base-uncased's")
    vb.add_argument("--context-length", type=int, default=128, help="text positions per row, [CLS] and [SEP] included")
    vb.set_defaults(func=_convert_hf_visualbert)

    xlmr = _hf_folder_parser(
        convert_sub,
        "hf-xlmr",
        SAVE_PRETRAINED_FOLDER,
        help="a Hugging Face XLMRobertaForMaskedLM / XLMRobertaModel folder (XLM-R)",
        description="Import XLM-R (Conneau et al. 2020) weights, with the masked-LM head when present, as a "
        "multilingual_encoder checkpoint (post-norm layers, no language embeddings) that continues pretraining "
        "with mmlm, tlm, clwr and clpc; the tokenizer is the folder's sentencepiece.bpe.model in fairseq's ids.",
    )
    xlmr.add_argument("--languages", nargs="+", help="language codes recorded in the model config (default: none; "
                      "without language embeddings the model takes any language)")
    xlmr.add_argument("--context-length", type=int, help="token rows of the saved tokenizer, <s> and </s> included "
                      "(default: every position, 512 for the released models)")
    xlmr.add_argument("--tokenizer", help="sentencepiece.bpe.model or a folder with it (default: the model folder's)")
    xlmr.set_defaults(func=_convert_hf_xlmr)

    mbart = _hf_folder_parser(
        convert_sub,
        "hf-mbart",
        "folder with config.json, model.safetensors/pytorch_model.bin and sentencepiece.bpe.model",
        help="a Hugging Face MBartForConditionalGeneration / MBartModel folder (mbart-large-cc25, mbart-large-50)",
        description="Import mBART (Liu et al. 2020) weights as an mbart checkpoint that continues denoising "
        "pretraining and decodes; the tokenizer is the folder's sentencepiece.bpe.model in fairseq's ids, its "
        "language codes (e.g. en_XX) the model's languages.",
    )
    mbart.add_argument("--languages", nargs="+", default=[], metavar="NAME=CODE",
                       help="name language codes as the data does, e.g. en=en_XX fr=fr_XX (default: the codes)")
    mbart.add_argument("--tokenizer", help="sentencepiece.bpe.model or a folder with it (default: the model folder's)")
    mbart.add_argument("--context-length", type=int, help="token rows of the saved tokenizer (default: 128)")
    mbart.set_defaults(func=_convert_hf_mbart)

    to_hf = convert_sub.add_parser("to-hf", help="export an mmptm CLIP as a Hugging Face CLIPModel folder")
    to_hf.add_argument("checkpoint", help="mmptm checkpoint or run folder")
    to_hf.add_argument("output_dir", help="folder to create")
    to_hf.set_defaults(func=_convert_to_hf)


SAVE_PRETRAINED_FOLDER = "folder written by save_pretrained (config.json + model.safetensors/.bin)"


def _hf_folder_parser(
    convert_sub: argparse._SubParsersAction, name: str, model_help: str, **parser_options: str
) -> argparse.ArgumentParser:
    """A ``mmptm convert <name> MODEL_DIR OUTPUT_DIR`` subcommand that imports a Hugging Face folder."""
    parser = convert_sub.add_parser(name, **parser_options)
    parser.add_argument("model_dir", help=model_help)
    parser.add_argument("output_dir", help="checkpoint folder to create")
    return parser


def _report(output: object, **fields: object) -> int:
    print(json.dumps({"output_dir": str(output), **fields}, indent=2))
    return 0


def _convert_open_clip(args: argparse.Namespace) -> int:
    from mmptm.interop.open_clip import import_open_clip

    out = import_open_clip(args.weights, args.output_dir, args.model_name, args.quick_gelu, args.tokenizer)
    return _report(out, source=args.weights)


def _convert_hf(args: argparse.Namespace) -> int:
    from mmptm.interop.hf import import_hf_clip

    return _report(import_hf_clip(args.model_dir, args.output_dir), source=args.model_dir)


def _convert_hf_visualbert(args: argparse.Namespace) -> int:
    from mmptm.interop.visualbert import import_hf_visualbert

    out, heads = import_hf_visualbert(args.model_dir, args.output_dir, args.tokenizer, args.context_length)
    return _report(out, source=args.model_dir, heads_imported=heads)


def _convert_hf_xlmr(args: argparse.Namespace) -> int:
    from mmptm.interop.common import training_overrides
    from mmptm.interop.xlmr import import_hf_xlmr

    result = import_hf_xlmr(args.model_dir, args.output_dir, args.languages, args.context_length, args.tokenizer)
    return _report(result.output_dir, source=args.model_dir, heads_imported=result.heads_imported,
                   dropped=result.dropped, train_overrides=training_overrides(result.output_dir))


def _convert_hf_mbart(args: argparse.Namespace) -> int:
    from mmptm.interop.common import training_overrides
    from mmptm.interop.mbart import import_hf_mbart

    out = import_hf_mbart(args.model_dir, args.output_dir, args.languages, args.tokenizer, args.context_length)
    return _report(out, source=args.model_dir, train_overrides=training_overrides(out))


def _convert_to_hf(args: argparse.Namespace) -> int:
    from mmptm.interop.hf import export_hf_clip

    return _report(export_hf_clip(args.checkpoint, args.output_dir), source=args.checkpoint)
