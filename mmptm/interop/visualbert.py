"""Import Hugging Face ``VisualBertModel`` / ``VisualBertForPreTraining`` folders as mmptm ``visualbert`` checkpoints.

The two layouts hold the same tensors (Li et al. 2019's model as Hugging Face
implements it: post-norm BERT layers, visual tokens with segment 1 and position 0);
only the module names differ, so the import is a renaming. A ``visualbert`` built
with ``box_positions: false``, ``vision: null`` and ``visual_dim`` = the checkpoint's
``visual_embedding_dim`` then gives the Hugging Face model's hidden states. The
pretraining heads of ``VisualBertForPreTraining`` (sec. 3.3) become mmptm's: the
masked-LM head ``cls.predictions`` (its decoder tied to the word embeddings, as in
mmptm) that of the ``vl_mlm`` objective, and the sentence-image head
``cls.seq_relationship`` the ``itm`` head (column 0 "matches" in both). Heads the
folder lacks (all of them for a bare ``VisualBertModel``; the masked-region heads
always) keep mmptm's initialisation.

Hugging Face's VisualBERT folders carry no tokenizer (the released ones use
``bert-base-uncased``'s): pass BERT's ``vocab.txt`` (or a folder with it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmptm.encoders.bert import BERT_LAYER_NORM_EPS
from mmptm.interop.common import (
    HF_BERT_LAYER_RENAMES,
    ConversionError,
    read_hf_config,
    read_state_dict,
    rename_tensor,
    write_checkpoint,
)

# Hugging Face name pattern -> mmptm name (applied to names without the ``visual_bert.`` prefix).
_RENAMES = [
    (r"^embeddings\.LayerNorm\.", "embeddings.norm."),
    (r"^embeddings\.(word|position|token_type)_embeddings\.", r"embeddings.\1_embeddings."),
    (r"^embeddings\.(visual_token_type_embeddings|visual_position_embeddings|visual_projection)\.", r"\1."),
    *HF_BERT_LAYER_RENAMES,
    (r"^pooler\.dense\.", "pooler.dense."),
    # VisualBertForPreTraining's heads.
    (r"^cls\.predictions\.transform\.dense\.", "mlm_head.dense."),
    (r"^cls\.predictions\.transform\.LayerNorm\.", "mlm_head.norm."),
    (r"^cls\.predictions\.bias$", "mlm_head.bias"),
    (r"^cls\.seq_relationship\.", "itm_head."),
]
# The MLM decoder: its weight is the word embeddings and its bias ``cls.predictions.bias`` (tied in both models).
_TIED_DECODER = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
# The checkpoint's heads, by the mmptm module they fill.
HEADS = {"mlm_head": "cls.predictions (masked LM, the vl_mlm objective)",
         "itm_head": "cls.seq_relationship (sentence-image prediction, the itm objective)"}
DEFAULT_CONTEXT_LENGTH = 128


def visualbert_state_dict_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face ``VisualBertModel`` or ``VisualBertForPreTraining`` state dict to mmptm's names.

    Args:
        hf_state: the model's ``state_dict()`` (the pretraining model's ``visual_bert.`` prefix is
            stripped; buffers such as ``position_ids`` are dropped).

    Returns:
        The encoder's tensors, and the pretraining heads' where present, under mmptm names (load with
        ``strict=False``: the masked-region heads and the box embedding are mmptm's own).

    Raises:
        ValueError: a tensor whose name has no mmptm counterpart, or an MLM decoder not tied to the
            word embeddings (both named in the message).
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state.items():
        name = name.removeprefix("visual_bert.")
        if name.endswith("position_ids"):
            continue
        if name in _TIED_DECODER:
            tied = hf_state.get("visual_bert.embeddings.word_embeddings.weight") if name.endswith("weight") \
                else hf_state.get("cls.predictions.bias")
            if tied is not None and not torch.equal(tensor, tied):
                raise ValueError(f"'{name}' differs from the tensor it is tied to; mmptm's MLM head is always tied")
            continue
        renamed = rename_tensor(name, _RENAMES)
        if renamed is None:
            raise ValueError(f"VisualBERT tensor '{name}' has no counterpart in mmptm's visualbert")
        out[renamed] = tensor
    return out


def visualbert_config_from_hf(hf_config: dict[str, Any], path: Path) -> dict[str, Any]:
    """The mmptm ``visualbert`` model config of a Hugging Face ``VisualBertConfig`` dict (``config.json``).

    Raises:
        ConversionError: another model type, or options mmptm's VisualBERT does not have.
    """
    if hf_config.get("model_type") != "visual_bert":
        raise ConversionError(
            f"{path}: model_type '{hf_config.get('model_type')}' is not 'visual_bert' (a VisualBertModel or "
            "VisualBertForPreTraining folder); for CLIP use `mmptm convert hf`"
        )
    # transformers fills unset fields with its defaults when it loads a config; so do we, for the ones we read.
    config = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
              "visual_embedding_dim": 512, "max_position_embeddings": 512, "hidden_act": "gelu",
              "layer_norm_eps": BERT_LAYER_NORM_EPS, "type_vocab_size": 2, "bypass_transformer": False,
              "hidden_dropout_prob": 0.1, **hf_config}
    unsupported = {
        "hidden_act": (config["hidden_act"], "gelu"),
        "layer_norm_eps": (config["layer_norm_eps"], BERT_LAYER_NORM_EPS),
        "type_vocab_size": (config["type_vocab_size"], 2),
        "bypass_transformer": (config["bypass_transformer"], False),
    }
    for key, (value, supported) in unsupported.items():
        if value != supported:
            raise ConversionError(f"{path}: {key} {value!r} is not supported (mmptm's visualbert has {supported!r})")
    width = config["hidden_size"]
    return {
        "name": "visualbert",
        "width": width,
        "layers": config["num_hidden_layers"],
        "heads": config["num_attention_heads"],
        "mlp_ratio": config["intermediate_size"] / width,
        "dropout": config["hidden_dropout_prob"],
        "max_text_length": config["max_position_embeddings"],
        "vision": None,
        "box_positions": False,
        "visual_dim": config["visual_embedding_dim"],
    }


def import_hf_visualbert(
    model_dir: str | Path,
    output_dir: str | Path,
    tokenizer: str | Path | None = None,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
) -> tuple[Path, list[str]]:
    """Convert a Hugging Face VisualBERT folder (``save_pretrained``) into an mmptm checkpoint folder.

    The checkpoint reads region features (``vision: null``, ``visual_dim`` = ``visual_embedding_dim``),
    as the released models were trained on detector features: train or evaluate it on
    ``region_features`` shards, or set ``model.vision`` with ``train.init_from``.

    Args:
        model_dir: folder with ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``.
        output_dir: checkpoint folder to create.
        tokenizer: BERT's ``vocab.txt`` or a folder with it (or any tokenizer mmptm reads); default:
            the one in ``model_dir``.
        context_length: text positions of the tokenizer's rows ([CLS] and [SEP] included).

    Returns:
        ``(output_dir, the mmptm heads filled from the checkpoint: "mlm_head", "itm_head")``.

    Raises:
        ConversionError: not a VisualBERT folder, unsupported options, no tokenizer, or a tokenizer
            whose vocabulary does not fit the word embeddings.
    """
    from mmptm.data_pipelines.tokenizer import load_tokenizer
    from mmptm.models import create_model

    model_dir = Path(model_dir)
    hf_config, config_file = read_hf_config(model_dir)
    config = visualbert_config_from_hf(hf_config, config_file)
    if context_length > config["max_text_length"]:
        raise ConversionError(
            f"context length {context_length} exceeds the checkpoint's {config['max_text_length']} text positions"
        )
    weights = next((model_dir / n for n in ("model.safetensors", "pytorch_model.bin") if (model_dir / n).is_file()),
                   None)
    if weights is None:
        raise ConversionError(f"'{model_dir}': no model.safetensors or pytorch_model.bin")
    try:
        state = visualbert_state_dict_from_hf(read_state_dict(weights))
        text_tokenizer = load_tokenizer(tokenizer or model_dir, context_length=context_length)
    except FileNotFoundError as err:
        raise ConversionError(
            f"{err}; Hugging Face's VisualBERT folders hold no tokenizer: pass --tokenizer with BERT's vocab.txt "
            "(that of bert-base-uncased for the released checkpoints)"
        ) from None
    except ValueError as err:
        raise ConversionError(f"{weights}: {err}") from None
    embeddings = state.get("embeddings.word_embeddings.weight")
    if embeddings is not None and len(embeddings) != text_tokenizer.vocab_size:
        raise ConversionError(
            f"the tokenizer has {text_tokenizer.vocab_size} ids but the checkpoint's word embeddings {len(embeddings)}"
        )
    # mmptm-only parts (masked-region heads, heads a bare VisualBertModel lacks) keep a fresh initialisation.
    full = create_model(config, tokenizer=text_tokenizer).state_dict()
    full.update(state)
    heads = [head for head in HEADS if any(name.startswith(f"{head}.") for name in state)]
    output = write_checkpoint(output_dir, config, full, text_tokenizer, source=f"huggingface:{model_dir}")
    return output, heads
