"""Import Hugging Face XLM-R folders (``XLMRobertaForMaskedLM``, ``XLMRobertaModel``) as mmptm checkpoints.

XLM-R (Conneau et al. 2020, "Unsupervised Cross-lingual Representation Learning
at Scale", sec. 2-3) is RoBERTa trained with multilingual masked LM: the summed
word, position and (single) token-type embeddings go through a LayerNorm, then
post-norm BERT layers, with no final norm; positions start at fairseq's padding
id + 1 = 2. A ``multilingual_encoder`` with ``norm_first: false``,
``position_offset: 2``, the checkpoint's ``layer_norm_eps`` and no language
embeddings computes the same states, so the import is a renaming. The one
token-type row every input uses is added to the position table, which gives the
same sums. The MLM head ``lm_head`` (dense -> GELU -> LayerNorm -> decoder tied
to the word embeddings + bias) becomes mmptm's ``mlm_head``, the head of the
mmlm / tlm / clwr objectives. Heads the folder lacks keep mmptm's initialisation:
the MLM head of a bare ``XLMRobertaModel``, and always the Unicoder heads
(``word_recovery`` of CLWR, ``pair_classifier`` of CLPC; Huang et al. 2019,
sec. 3, who start Unicoder from XLM). ``XLMRobertaModel``'s pooler has no
counterpart (XLM-R was trained without a sentence-level task) and is dropped.

The tokenizer is the folder's ``sentencepiece.bpe.model`` read with fairseq's
ids (:class:`~mmptm.data_pipelines.fairseq_spm.FairseqSentencePieceTokenizer`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mmptm.data_pipelines.tokenizer import FAIRSEQ_MODEL_FILENAME
from mmptm.interop.common import (
    HF_BERT_LAYER_RENAMES,
    ConversionError,
    read_fairseq_tokenizer,
    read_hf_config,
    read_hf_weights,
    rename_tensor,
    write_checkpoint,
)

# transformers' XLMRobertaConfig defaults, for the keys read here that a config.json may leave out.
HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "max_position_embeddings": 512,
    "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 1, "position_embedding_type": "absolute",
    "is_decoder": False, "add_cross_attention": False,
}  # fmt: skip
# Options mmptm's encoder has one value of: key -> the accepted values.
REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("gelu",),  # exact GELU, as BERT layers and the MLM head compute it
    "position_embedding_type": ("absolute",),
    "pad_token_id": (1,),  # fairseq's <pad>: the tokenizer's, and the positions start after it
    "is_decoder": (False,),
    "add_cross_attention": (False,),
}
# Hugging Face name pattern -> mmptm name (applied to names without the ``roberta.`` prefix).
_RENAMES = [
    (r"^embeddings\.word_embeddings\.", "token_embedding."),
    (r"^embeddings\.position_embeddings\.", "position_embedding."),
    (r"^embeddings\.LayerNorm\.", "embedding_norm."),
    *HF_BERT_LAYER_RENAMES,
    (r"^lm_head\.dense\.", "mlm_head.dense."),
    (r"^lm_head\.layer_norm\.", "mlm_head.norm."),
    (r"^lm_head\.bias$", "mlm_head.bias"),
]
TOKEN_TYPES = "embeddings.token_type_embeddings.weight"
# XLMRobertaForMaskedLM ties its MLM decoder's weight and bias to these tensors.
_TIED = {"lm_head.decoder.weight": "embeddings.word_embeddings.weight", "lm_head.decoder.bias": "lm_head.bias"}
# XLMRobertaModel's tensors without a counterpart, dropped with a report.
_DROPPED = r"^pooler\."
HEADS = {"mlm_head": "lm_head (masked LM: the mmlm, tlm and clwr objectives)"}


class XlmrImport(NamedTuple):
    """What :func:`import_hf_xlmr` returns."""

    output_dir: Path
    heads_imported: list[str]  # mmptm heads filled from the checkpoint (``mlm_head``), the others kept fresh
    dropped: list[str]  # checkpoint tensors without a counterpart (``XLMRobertaModel``'s pooler)


def xlmr_config_from_hf(
    hf_config: dict[str, Any], path: Path, languages: list[str] | None = None
) -> dict[str, Any]:
    """The mmptm ``multilingual_encoder`` config of a Hugging Face ``XLMRobertaConfig`` dict (``config.json``).

    Args:
        hf_config: the parsed ``config.json``.
        path: its file, for messages.
        languages: the language codes recorded in the model config (no language embeddings, so any
            code is accepted whatever they are).

    Raises:
        ConversionError: another model type, or an option value mmptm's encoder does not have (naming
            the key and the accepted values).
    """
    model_type = hf_config.get("model_type")
    if model_type != "xlm-roberta":
        layout = " (XLM-R XL/XXL are pre-norm with a final LayerNorm, a layout the import does not map)" \
            if model_type == "xlm-roberta-xl" else ""
        raise ConversionError(
            f"{path}: model_type {model_type!r} is not supported{layout}; accepted: 'xlm-roberta' "
            "(an XLMRobertaForMaskedLM or XLMRobertaModel folder)"
        )
    config = {**HF_DEFAULTS, **hf_config}
    for key, accepted in REQUIRED_VALUES.items():
        if config[key] not in accepted:
            raise ConversionError(
                f"{path}: {key}={config[key]!r} is not supported by mmptm's multilingual_encoder "
                f"(accepted: {', '.join(map(repr, accepted))})"
            )
    width = config["hidden_size"]
    mlp_ratio = config["intermediate_size"] / width
    if int(width * mlp_ratio) != config["intermediate_size"]:
        raise ConversionError(
            f"{path}: intermediate_size={config['intermediate_size']} is not a multiple mmptm can express of "
            f"hidden_size={width} (accepted: hidden_size * r for a ratio r that rounds back to it)"
        )
    offset = config["pad_token_id"] + 1
    if config["max_position_embeddings"] <= offset:
        raise ConversionError(
            f"{path}: max_position_embeddings={config['max_position_embeddings']} leaves no position after the "
            f"first {offset} (accepted: more than {offset})"
        )
    return {
        "name": "multilingual_encoder",
        "width": width,
        "layers": config["num_hidden_layers"],
        "heads": config["num_attention_heads"],
        "mlp_ratio": mlp_ratio,
        "max_positions": config["max_position_embeddings"],
        "languages": list(languages or []),
        "language_embeddings": False,
        "norm_first": False,
        "layer_norm_eps": float(config["layer_norm_eps"]),
        "position_offset": offset,
        "dropout": float(config["hidden_dropout_prob"]),
    }


def xlmr_state_dict_from_hf(hf_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a Hugging Face ``XLMRobertaForMaskedLM`` or ``XLMRobertaModel`` state dict to mmptm's names.

    The token-type embedding is folded into the position table (every input uses its row 0).

    Args:
        hf_state: the model's tensors (the masked-LM model's ``roberta.`` prefix is stripped; buffers
            such as ``position_ids`` are dropped).

    Returns:
        ``(tensors under mmptm names, names of the dropped tensors)``; load with the fresh model's other
        tensors (the heads the checkpoint lacks).

    Raises:
        ConversionError: a tensor without a counterpart, a decoder not tied to the word embeddings, or
            token-type rows that differ (``type_vocab_size`` > 1 with a use of the other rows).
    """
    state = {name.removeprefix("roberta."): tensor for name, tensor in hf_state.items()}
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for name, tensor in state.items():
        if name.endswith(("position_ids", "token_type_ids")) or name == TOKEN_TYPES:
            continue
        if name in _TIED:
            tied = state.get(_TIED[name])
            if tied is not None and not torch.equal(tensor, tied):
                raise ConversionError(f"'{name}' differs from '{_TIED[name]}'; mmptm's MLM head is always tied to it")
            continue
        if re.match(_DROPPED, name):
            dropped.append(name)
            continue
        renamed = rename_tensor(name, _RENAMES)
        if renamed is None:
            raise ConversionError(
                f"XLM-R tensor '{name}' has no counterpart in mmptm's multilingual_encoder (import an "
                "XLMRobertaForMaskedLM or XLMRobertaModel folder)"
            )
        out[renamed] = tensor
    token_types = state.get(TOKEN_TYPES)
    if token_types is not None:
        if not (token_types == token_types[0]).all():
            raise ConversionError(
                f"type_vocab_size={len(token_types)} with distinct rows of '{TOKEN_TYPES}' is not supported (accepted: "
                "1, or rows that are all equal): mmptm's encoder has no token types and folds the one used into "
                "the positions"
            )
        # In float32: a half-precision checkpoint would round the sum again.
        out["position_embedding.weight"] = out["position_embedding.weight"].float() + token_types[0].float()
    return out, dropped


def import_hf_xlmr(
    model_dir: str | Path,
    output_dir: str | Path,
    languages: list[str] | None = None,
    context_length: int | None = None,
    tokenizer: str | Path | None = None,
) -> XlmrImport:
    """Convert a Hugging Face XLM-R folder (``save_pretrained``) into an mmptm ``multilingual_encoder`` checkpoint.

    The checkpoint trains with ``train.init_from`` under the mmlm, tlm, clwr and clpc objectives
    (Unicoder, Huang et al. 2019, sec. 4, starts from a pretrained cross-lingual model) and loads with
    :func:`mmptm.load_pretrained`.

    Args:
        model_dir: folder with ``config.json``, ``model.safetensors`` or ``pytorch_model.bin`` (or their
            sharded index), and ``sentencepiece.bpe.model``.
        output_dir: checkpoint folder to create.
        languages: language codes recorded in the model config (default none: without language
            embeddings the model takes text of any language; data streams choose theirs).
        context_length: token rows of the saved tokenizer config, ``<s>`` and ``</s>`` included (default:
            every position, 512 for the released models).
        tokenizer: ``sentencepiece.bpe.model`` or a folder with it (default: ``model_dir``).

    Returns:
        The output folder, the heads imported (``["mlm_head"]`` for the masked-LM model) and the
        dropped tensors (``XLMRobertaModel``'s pooler).

    Raises:
        ConversionError: not an XLM-R folder, an unsupported option (naming the key and the accepted
            values), a missing weights or tokenizer file, or a tokenizer whose vocabulary does not fit.
    """
    from mmptm.models import create_model

    model_dir = Path(model_dir)
    hf_config, config_file = read_hf_config(model_dir)
    config = xlmr_config_from_hf(hf_config, config_file, languages)
    positions = config["max_positions"] - config["position_offset"]
    context_length = positions if context_length is None else context_length
    if context_length > positions:
        raise ConversionError(f"context length {context_length} exceeds the checkpoint's {positions} positions")
    text_tokenizer = read_fairseq_tokenizer(Path(tokenizer) if tokenizer else model_dir, context_length, "XLM-R")
    state, dropped = xlmr_state_dict_from_hf(read_hf_weights(model_dir))
    vocab_size = hf_config.get("vocab_size", HF_DEFAULTS["vocab_size"])
    if text_tokenizer.vocab_size != vocab_size:
        raise ConversionError(
            f"the tokenizer has {text_tokenizer.vocab_size} ids but the checkpoint's vocab_size is {vocab_size} "
            f"(XLM-R's: the pieces of {FAIRSEQ_MODEL_FILENAME} + 2, with no language codes)"
        )
    full = create_model(config, tokenizer=text_tokenizer).state_dict()
    full.update(state)
    heads = [head for head in HEADS if any(name.startswith(f"{head}.") for name in state)]
    output = write_checkpoint(output_dir, config, full, text_tokenizer, source=f"huggingface:{model_dir}")
    return XlmrImport(output, heads, dropped)
