"""Import Hugging Face ``MBartForConditionalGeneration`` / ``MBartModel`` folders as mmptm ``mbart`` checkpoints.

The released mBART models (Liu et al. 2020, "Multilingual Denoising Pre-training
for Neural Machine Translation": ``facebook/mbart-large-cc25``; Tang et al. 2020:
``facebook/mbart-large-50``) are the architecture of mmptm's ``mbart``: pre-norm
blocks, a layer norm on the embeddings and on top of each side, learned positions
per side, token embeddings tied between both sides and the LM head. What differs
is layout, handled here:

- token embeddings scaled by ``sqrt(d_model)`` (``scale_embedding``, true in the
  released configs) -> ``mbart``'s ``scale_embedding`` option;
- learned positions offset by 2 (``MBartLearnedPositionalEmbedding``: fairseq
  reserved rows 0-1 for its padding index, position ``i`` reads row ``i + 2``) ->
  the first 2 rows are dropped, so mmptm's row ``i`` is Hugging Face's row ``i + 2``;
- separate ``q_proj``/``k_proj``/``v_proj`` -> one packed ``in_proj_weight`` /
  ``in_proj_bias`` (query, key, value rows, as ``nn.MultiheadAttention``);
- ``final_logits_bias`` (a buffer added to the logits, zero in the released
  models): mmptm's LM head has no bias, so a non-zero one is refused.

Attention scaling (``head_dim ** -0.5``) and the layer norms' eps (1e-5, not
configurable in transformers' MBart) are the same in both; the config's
``dropout``, ``attention_dropout`` and ``activation_dropout`` (0.1, 0 and 0 in the
released models) become ``mbart``'s options of those names, applied where
transformers applies them, so continued pretraining regularises as the original did. Configurations mmptm's
``mbart`` cannot express are refused, naming the key and the accepted values.

The tokenizer is the folder's ``sentencepiece.bpe.model`` read in fairseq's id
layout (``<s>=0 <pad>=1 </s>=2 <unk>=3``, pieces shifted by one, the language
codes, ``<mask>``): :class:`~mmptm.data_pipelines.fairseq_spm.FairseqSentencePieceTokenizer`.
Its language codes come from the folder's ``tokenizer_config.json`` (or, where it names none,
are the released model's whose vocabulary size the checkpoint has: cc25's 25 or mBART-50's 52).
They become the model's ``languages`` with their ids as
``language_token_ids``; ``languages=["en=en_XX", ...]`` names codes as the data does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmptm.data_pipelines.fairseq_spm import (
    MBART50_LANGUAGE_CODES,
    MBART_CC25_LANGUAGE_CODES,
    FairseqSentencePieceTokenizer,
)
from mmptm.encoders.layers import check_probability
from mmptm.interop.common import (
    ConversionError,
    read_fairseq_tokenizer,
    read_hf_config,
    read_hf_weights,
    rename_tensor,
    write_checkpoint,
)

# MBartLearnedPositionalEmbedding's offset: position i is row i + 2 of Hugging Face's table.
POSITION_OFFSET = 2
DEFAULT_CONTEXT_LENGTH = 128
# Hugging Face activation name -> mmptm's (`gelu` is the exact GELU in both).
ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu"}
# Keys of legacy (BART-era) mBART configs, with the only value mmptm's pre-norm mBART (and
# transformers' MBart, which ignores them) can have; BART's post-norm configs differ here.
REQUIRED_VALUES: dict[str, Any] = {
    "normalize_before": True,
    "add_final_layer_norm": True,
    "normalize_embedding": True,
    "static_position_embeddings": False,
    "add_bias_logits": False,
    "extra_pos_embeddings": POSITION_OFFSET,
    "tie_word_embeddings": True,
}
# transformers' MBartConfig defaults, for the keys read here that a config.json may leave out.
HF_DEFAULTS: dict[str, Any] = {
    "d_model": 1024, "encoder_layers": 12, "decoder_layers": 12, "encoder_attention_heads": 16,
    "decoder_attention_heads": 16, "encoder_ffn_dim": 4096, "decoder_ffn_dim": 4096,
    "max_position_embeddings": 1024, "activation_function": "gelu", "scale_embedding": False,
    "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
    "dropout": 0.1, "attention_dropout": 0.0, "activation_dropout": 0.0,
}  # fmt: skip
DROPOUT_KEYS = ("dropout", "attention_dropout", "activation_dropout")

# Hugging Face name (``model.`` prefix removed) -> mmptm name, for tensors copied as they are.
_RENAMES = [
    (r"^shared\.weight$", "token_embedding.weight"),
    (r"^(encoder|decoder)\.layernorm_embedding\.", r"\1_embedding_norm."),
    (r"^(encoder|decoder)\.layer_norm\.", r"\1_norm."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"encoder.resblocks.\1.attn.out_proj."),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"encoder.resblocks.\1.ln_1."),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.resblocks.\1.ln_2."),
    (r"^encoder\.layers\.(\d+)\.fc1\.", r"encoder.resblocks.\1.mlp.c_fc."),
    (r"^encoder\.layers\.(\d+)\.fc2\.", r"encoder.resblocks.\1.mlp.c_proj."),
    (r"^decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"decoder.\1.self_attn.out_proj."),
    (r"^decoder\.layers\.(\d+)\.encoder_attn\.out_proj\.", r"decoder.\1.cross_attn.out_proj."),
    (r"^decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"decoder.\1.ln_1."),
    (r"^decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.", r"decoder.\1.ln_2."),
    (r"^decoder\.layers\.(\d+)\.final_layer_norm\.", r"decoder.\1.ln_3."),
    (r"^decoder\.layers\.(\d+)\.fc1\.", r"decoder.\1.mlp.c_fc."),
    (r"^decoder\.layers\.(\d+)\.fc2\.", r"decoder.\1.mlp.c_proj."),
]
# Separate query/key/value projections -> the packed projection of the mmptm attention module.
_QKV = re.compile(r"^(encoder\.layers\.(\d+)\.self_attn|decoder\.layers\.(\d+)\.(self_attn|encoder_attn))"
                  r"\.([qkv])_proj\.(weight|bias)$")
# Copies of the token embeddings that both models tie to ``shared.weight``.
_TIED_EMBEDDINGS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")


def _packed_name(match: re.Match[str]) -> str:
    """The mmptm packed-projection parameter a q/k/v projection of ``_QKV`` goes into."""
    _, encoder_layer, decoder_layer, kind, _, what = match.groups()
    if encoder_layer is not None:
        return f"encoder.resblocks.{encoder_layer}.attn.in_proj_{what}"
    attention = "self_attn" if kind == "self_attn" else "cross_attn"
    return f"decoder.{decoder_layer}.{attention}.in_proj_{what}"


def mbart_state_dict_from_hf(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a Hugging Face ``MBartForConditionalGeneration`` or ``MBartModel`` state dict to mmptm's ``mbart``.

    Args:
        hf_state: the model's tensors (``model.`` prefixes, as the generation model has them, are removed).

    Returns:
        Every ``mbart`` parameter under its mmptm name.

    Raises:
        ValueError: a tensor with no mmptm counterpart, a copy of the token embeddings (``lm_head``,
            ``embed_tokens``) that differs from ``shared.weight``, a non-zero ``final_logits_bias``,
            or an incomplete query/key/value triple (each named in the message).
    """
    state = {name.removeprefix("model."): tensor for name, tensor in hf_state.items()}
    shared = state.get("shared.weight")
    if shared is None:  # a checkpoint that kept only one of the tied copies
        shared = next((state[name] for name in _TIED_EMBEDDINGS if name in state), None)
        if shared is None:
            raise ValueError("no token embeddings ('model.shared.weight')")
        state["shared.weight"] = shared
    out: dict[str, torch.Tensor] = {}
    projections: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if name in _TIED_EMBEDDINGS:
            if not torch.equal(tensor, shared):
                raise ValueError(
                    f"'{name}' differs from 'model.shared.weight'; mmptm's mbart ties the token embeddings of "
                    "both sides and the LM head"
                )
            continue
        if name == "final_logits_bias":
            if bool(tensor.count_nonzero()):
                raise ValueError(
                    "'final_logits_bias' is not zero (it is in the released mBART models); mmptm's mbart LM head "
                    "has no bias"
                )
            continue
        if name in ("encoder.embed_positions.weight", "decoder.embed_positions.weight"):
            side = name.split(".")[0]
            out[f"{side}_positions.weight"] = tensor[POSITION_OFFSET:]
            continue
        qkv = _QKV.match(name)
        if qkv:
            projections.setdefault(_packed_name(qkv), {})[qkv.group(5)] = tensor
            continue
        renamed = rename_tensor(name, _RENAMES)
        if renamed is None:
            raise ValueError(f"MBart tensor '{name}' has no counterpart in mmptm's mbart")
        out[renamed] = tensor
    for packed, parts in projections.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"'{packed}': the checkpoint has only the {sorted(parts)} projections of q, k, v")
        out[packed] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def model_languages(names: Sequence[str], codes: Mapping[str, int]) -> dict[str, int]:
    """The model's ``{language: id}``: every language code of the tokenizer, renamed by ``names``.

    Every code stays a language of the model, so that decoding never produces any language id.

    Args:
        names: ``NAME=CODE`` items: the code ``CODE`` is the language ``NAME`` (what the data's ``lang``
            fields and the configs say, e.g. ``en=en_XX``); other codes keep their own name.
        codes: the tokenizer's ``{code: id}``, in id order.

    Raises:
        ConversionError: an item not of the form ``NAME=CODE``, a code the tokenizer lacks, a code
            renamed twice, or a name that would name two codes.
    """
    renamed: dict[str, str] = {}
    for item in names:
        name, _, code = item.partition("=")
        if not name or not code:
            raise ConversionError(f"languages: '{item}' is not of the form NAME=CODE (e.g. en=en_XX)")
        if code not in codes:
            raise ConversionError(
                f"languages: '{code}' (in '{item}') is not one of the tokenizer's language codes {list(codes)}"
            )
        if code in renamed:
            raise ConversionError(f"languages: '{code}' is renamed twice ('{renamed[code]}' and '{name}')")
        renamed[code] = name
    languages = [renamed.get(code, code) for code in codes]
    repeated = sorted({name for name in languages if languages.count(name) > 1})
    if repeated:
        raise ConversionError(f"languages: {repeated} would each name more than one language code")
    return dict(zip(languages, codes.values(), strict=True))


def mbart_config_from_hf(hf_config: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The mmptm ``mbart`` architecture options of a Hugging Face ``MBartConfig`` dict (``config.json``).

    ``languages`` and ``language_token_ids`` come from the tokenizer (:func:`import_hf_mbart`).

    Raises:
        ConversionError: another model type, or an option mmptm's ``mbart`` cannot express (the key, its
            value and the accepted values named).
    """
    if hf_config.get("model_type") != "mbart":
        raise ConversionError(
            f"{path}: model_type {hf_config.get('model_type')!r} is not 'mbart' (an MBartForConditionalGeneration "
            "or MBartModel folder); BART's post-norm models ('bart') have no mmptm counterpart"
        )
    config = {**HF_DEFAULTS, **hf_config}

    def refuse(key: str, accepted: str) -> ConversionError:
        return ConversionError(f"{path}: {key}={config[key]!r} is not supported by mmptm's mbart; accepted: {accepted}")

    for key, required in REQUIRED_VALUES.items():
        if key in config and config[key] != required:
            raise refuse(key, repr(required))
    if config["activation_function"] not in ACTIVATIONS:
        raise refuse("activation_function", ", ".join(map(repr, ACTIVATIONS)))
    for encoder_key, decoder_key in (("encoder_attention_heads", "decoder_attention_heads"),
                                     ("encoder_ffn_dim", "decoder_ffn_dim")):
        if config[encoder_key] != config[decoder_key]:
            raise refuse(decoder_key, f"the same as {encoder_key}={config[encoder_key]!r}: one value for both sides")
    width, ffn = config["d_model"], config["encoder_ffn_dim"]
    if config["encoder_attention_heads"] < 1 or width % config["encoder_attention_heads"]:
        raise refuse("encoder_attention_heads", f"a divisor of d_model={width}")
    mlp_ratio = ffn / width
    if int(width * mlp_ratio) != ffn:  # mmptm sizes the MLP as int(width * mlp_ratio)
        raise refuse("encoder_ffn_dim", f"a size int(d_model * ratio) reproduces for d_model={width}")
    for key, fairseq_id in (("pad_token_id", 1), ("bos_token_id", 0), ("eos_token_id", 2)):
        if config[key] != fairseq_id:
            raise refuse(key, f"{fairseq_id}, fairseq's id, which the sentencepiece tokenizer gives")
    for key in DROPOUT_KEYS:
        try:
            check_probability(key, config[key])
        except ValueError:
            raise refuse(key, "a probability in [0, 1]") from None
    return {
        "name": "mbart",
        "width": width,
        "encoder_layers": config["encoder_layers"],
        "decoder_layers": config["decoder_layers"],
        "heads": config["encoder_attention_heads"],
        "mlp_ratio": mlp_ratio,
        "max_positions": config["max_position_embeddings"],
        "act": ACTIVATIONS[config["activation_function"]],
        "scale_embedding": bool(config["scale_embedding"]),
        **{key: float(config[key]) for key in DROPOUT_KEYS},
    }


def _with_released_language_codes(
    tokenizer: FairseqSentencePieceTokenizer, vocab_size: int | None, tokenizer_dir: Path
) -> FairseqSentencePieceTokenizer:
    """The tokenizer with the language codes of the released model whose vocabulary ``vocab_size`` is.

    A folder whose ``tokenizer_config.json`` names neither the codes nor an mBART tokenizer class
    (Hugging Face then goes by the model type) gets mbart-large-cc25's 25 codes or mbart-large-50's
    52, whichever fills the checkpoint's ``vocab_size`` between the pieces and ``<mask>``.

    Raises:
        ConversionError: neither fits.
    """
    missing = (vocab_size or 0) - tokenizer.vocab_size
    for codes in (MBART_CC25_LANGUAGE_CODES, MBART50_LANGUAGE_CODES):
        if missing == len(codes):
            return FairseqSentencePieceTokenizer(tokenizer.path, tokenizer.context_length, codes)
    raise ConversionError(
        f"tokenizer: '{tokenizer_dir}' names no language codes and the checkpoint's vocab_size={vocab_size} leaves "
        f"{missing} ids for them (mbart-large-cc25 has {len(MBART_CC25_LANGUAGE_CODES)}, mbart-large-50 "
        f"{len(MBART50_LANGUAGE_CODES)}); list them in its tokenizer_config.json as \"language_codes\""
    )


def import_hf_mbart(
    model_dir: str | Path,
    output_dir: str | Path,
    languages: Sequence[str] | None = None,
    tokenizer: str | Path | None = None,
    context_length: int | None = None,
) -> Path:
    """Convert a Hugging Face mBART folder (``save_pretrained``, or the hub's files) into an mmptm checkpoint.

    The checkpoint's ``mbart`` gives the Hugging Face model's logits; train it further with the
    ``denoising`` objective (``train.init_from``) or decode with ``generate``.

    Args:
        model_dir: folder with ``config.json``, ``model.safetensors`` or ``pytorch_model.bin``, and
            the tokenizer's ``sentencepiece.bpe.model`` (+ ``tokenizer_config.json``).
        output_dir: checkpoint folder to create.
        languages: ``NAME=CODE`` items naming language codes as the data does (``en=en_XX``: the
            data's ``en`` rows get ``en_XX``'s id); the model's languages are all the tokenizer's codes,
            these under their new name.
        tokenizer: a folder with ``sentencepiece.bpe.model`` (default: ``model_dir``).
        context_length: the tokenizer's row length (its ``__call__``; the evaluators' default
            generation length), at most ``max_position_embeddings`` (None: 128, or
            ``max_position_embeddings`` if fewer).

    Returns:
        ``output_dir``.

    Raises:
        ConversionError: a missing file, a configuration or tensor mmptm's ``mbart`` cannot express,
            a tokenizer whose vocabulary does not fit the embeddings (or without language codes, where
            none of the released models' fits), or unknown language codes.
    """
    model_dir = Path(model_dir)
    hf_config, config_file = read_hf_config(model_dir)
    config = mbart_config_from_hf(hf_config, config_file)
    if context_length is None:
        context_length = min(DEFAULT_CONTEXT_LENGTH, config["max_positions"])
    if not 1 <= context_length <= config["max_positions"]:
        raise ConversionError(
            f"context length {context_length} must be in [1, max_position_embeddings={config['max_positions']}]"
        )
    tokenizer_dir = Path(tokenizer) if tokenizer is not None else model_dir
    text_tokenizer = read_fairseq_tokenizer(tokenizer_dir, context_length, "mBART")
    if not text_tokenizer.language_token_ids:
        text_tokenizer = _with_released_language_codes(text_tokenizer, hf_config.get("vocab_size"), tokenizer_dir)
    codes = text_tokenizer.language_token_ids
    language_ids = model_languages(languages or [], codes)
    try:
        state = mbart_state_dict_from_hf(read_hf_weights(model_dir))
    except ConversionError:
        raise
    except ValueError as err:
        raise ConversionError(f"'{model_dir}' weights: {err}") from None
    rows = len(state["token_embedding.weight"])
    if rows != text_tokenizer.vocab_size:
        raise ConversionError(
            f"the tokenizer in '{tokenizer_dir}' has {text_tokenizer.vocab_size} ids ({len(codes)} language codes) "
            f"but the weights in '{model_dir}' have {rows} token embeddings (vocab_size); the language codes "
            "must be the checkpoint's"
        )
    config.update(languages=list(language_ids), language_token_ids=language_ids)
    return write_checkpoint(output_dir, config, state, text_tokenizer, source=f"huggingface:{model_dir}")
