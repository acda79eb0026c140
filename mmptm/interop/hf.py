"""Import Hugging Face ``CLIPModel`` folders into mmptm checkpoints, and export mmptm CLIPs as such folders.

A ``CLIPModel`` folder (``save_pretrained``) holds ``config.json``,
``model.safetensors`` (or ``pytorch_model.bin``, or shards with an index), the CLIP
BPE tokenizer (``vocab.json`` + ``merges.txt``, or only ``tokenizer.json`` from
transformers 5) and ``preprocessor_config.json`` (transformers 5:
``processor_config.json``). The two
towers are the same networks as mmptm's ``vit`` and ``text_transformer``; the
weights differ only in names, in separate q/k/v projections (mmptm keeps
open_clip's packed ``in_proj``) and in transposed output projections.
Reading uses only the files (no ``transformers`` import); writing produces a
folder that ``transformers.CLIPModel.from_pretrained`` loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmptm.interop.common import (
    ConversionError,
    new_folder,
    read_hf_config,
    read_hf_weights,
    read_json_object,
    write_checkpoint,
)

_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}  # Hugging Face hidden_act -> mmptm act
_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which mmptm's towers use
_HF_LEGACY_EOS_ID = 2  # CLIPTextModel pools by argmax over token ids when eos_token_id is this

# Per-block parameter names: Hugging Face CLIPEncoderLayer -> open_clip/mmptm ResidualAttentionBlock.
_BLOCK_RENAMES = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _blocks_from_hf(hf: dict[str, torch.Tensor], hf_prefix: str, prefix: str, layers: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(layers):
        src, dst = f"{hf_prefix}encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [hf[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0
            )
            for hf_name, name in _BLOCK_RENAMES.items():
                out[f"{dst}{name}.{kind}"] = hf[f"{src}{hf_name}.{kind}"]
    return out


def _blocks_to_hf(sd: dict[str, torch.Tensor], prefix: str, hf_prefix: str, layers: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(layers):
        src, dst = f"{prefix}transformer.resblocks.{i}.", f"{hf_prefix}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            for proj, tensor in zip("qkv", sd[f"{src}attn.in_proj_{kind}"].chunk(3, dim=0), strict=True):
                out[f"{dst}self_attn.{proj}_proj.{kind}"] = tensor.clone()
            for hf_name, name in _BLOCK_RENAMES.items():
                out[f"{dst}{hf_name}.{kind}"] = sd[f"{src}{name}.{kind}"]
    return out


def state_dict_from_hf(hf: dict[str, torch.Tensor], text_layers: int, vision_layers: int) -> dict[str, torch.Tensor]:
    """Hugging Face ``CLIPModel`` weights -> mmptm ``clip`` weights (``vit`` + ``text_transformer``)."""
    v, t = "vision_model.", "text_model."
    try:
        sd = {
            "visual.class_embedding": hf[f"{v}embeddings.class_embedding"],
            "visual.conv1.weight": hf[f"{v}embeddings.patch_embedding.weight"],
            "visual.positional_embedding": hf[f"{v}embeddings.position_embedding.weight"],
            "visual.ln_pre.weight": hf[f"{v}pre_layrnorm.weight"],
            "visual.ln_pre.bias": hf[f"{v}pre_layrnorm.bias"],
            "visual.ln_post.weight": hf[f"{v}post_layernorm.weight"],
            "visual.ln_post.bias": hf[f"{v}post_layernorm.bias"],
            "visual.proj": hf["visual_projection.weight"].t().contiguous(),
            "text.token_embedding.weight": hf[f"{t}embeddings.token_embedding.weight"],
            "text.positional_embedding": hf[f"{t}embeddings.position_embedding.weight"],
            "text.ln_final.weight": hf[f"{t}final_layer_norm.weight"],
            "text.ln_final.bias": hf[f"{t}final_layer_norm.bias"],
            "text.text_projection": hf["text_projection.weight"].t().contiguous(),
            "logit_scale": hf["logit_scale"],
            **_blocks_from_hf(hf, v, "visual.", vision_layers),
            **_blocks_from_hf(hf, t, "text.", text_layers),
        }
    except KeyError as err:
        raise ConversionError(f"not the weights of a CLIPModel: no {err.args[0]}") from None
    return sd


def state_dict_to_hf(sd: dict[str, torch.Tensor], text_layers: int, vision_layers: int) -> dict[str, torch.Tensor]:
    """mmptm ``clip`` weights (``vit`` + ``text_transformer``) -> Hugging Face ``CLIPModel`` weights."""
    v, t = "vision_model.", "text_model."
    return {
        f"{v}embeddings.class_embedding": sd["visual.class_embedding"],
        f"{v}embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        f"{v}embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        f"{v}pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        f"{v}pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        f"{v}post_layernorm.weight": sd["visual.ln_post.weight"],
        f"{v}post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].t().contiguous(),
        f"{t}embeddings.token_embedding.weight": sd["text.token_embedding.weight"],
        f"{t}embeddings.position_embedding.weight": sd["text.positional_embedding"],
        f"{t}final_layer_norm.weight": sd["text.ln_final.weight"],
        f"{t}final_layer_norm.bias": sd["text.ln_final.bias"],
        "text_projection.weight": sd["text.text_projection"].t().contiguous(),
        "logit_scale": sd["logit_scale"],
        **_blocks_to_hf(sd, "visual.", v, vision_layers),
        **_blocks_to_hf(sd, "text.", t, text_layers),
    }


def _tower_options(section: dict[str, Any], which: str, path: Path) -> dict[str, Any]:
    act = section.get("hidden_act", "quick_gelu")
    if act not in _ACTIVATIONS:
        raise ConversionError(f"{path}: {which}.hidden_act '{act}' is not supported; supported: {sorted(_ACTIVATIONS)}")
    eps = section.get("layer_norm_eps", _LAYER_NORM_EPS)
    if abs(eps - _LAYER_NORM_EPS) > 1e-12:
        raise ConversionError(f"{path}: {which}.layer_norm_eps {eps} is not supported (mmptm uses {_LAYER_NORM_EPS})")
    width = section["hidden_size"]
    return {
        "width": width,
        "layers": section["num_hidden_layers"],
        "heads": section["num_attention_heads"],
        "mlp_ratio": section["intermediate_size"] / width,
        "act": _ACTIVATIONS[act],
    }


def model_config_from_hf(hf_config: dict[str, Any], path: Path) -> dict[str, Any]:
    """The mmptm ``clip`` model config of a Hugging Face ``CLIPConfig`` dict (``config.json``)."""
    if hf_config.get("model_type") != "clip":
        raise ConversionError(
            f"{path}: model_type '{hf_config.get('model_type')}' is not supported; only 'clip' (CLIPModel) is"
        )
    text, vision = hf_config.get("text_config") or {}, hf_config.get("vision_config") or {}
    # transformers fills unset fields with its defaults when it loads a config; so do we, for the ones we read.
    text = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8,
            "max_position_embeddings": 77, **text}
    vision = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
              "image_size": 224, "patch_size": 32, **vision}
    if vision.get("num_channels", 3) != 3:
        raise ConversionError(f"{path}: vision_config.num_channels must be 3")
    return {
        "name": "clip",
        "embed_dim": hf_config.get("projection_dim", 512),
        "vision": {"name": "vit", "image_size": vision["image_size"], "patch_size": vision["patch_size"],
                   **_tower_options(vision, "vision_config", path)},
        "text": {"name": "text_transformer", "context_length": text["max_position_embeddings"],
                 **_tower_options(text, "text_config", path)},
    }


def import_hf_clip(model_dir: str | Path, output_dir: str | Path) -> Path:
    """Convert a Hugging Face ``CLIPModel`` folder into an mmptm checkpoint folder.

    Weights: ``model.safetensors``, ``pytorch_model.bin`` or the shards of their
    ``*.index.json``. The tokenizer: ``vocab.json`` + ``merges.txt``, else the BPE of
    ``tokenizer.json`` (transformers 5 saves only that). The image normalisation of
    ``preprocessor_config.json``, else of ``processor_config.json``'s ``image_processor``
    (transformers 5), is kept in the vision config, so ``load_pretrained``'s transform matches.

    Raises:
        ConversionError: not a CLIPModel folder, unsupported options, or no CLIP BPE tokenizer files.
    """
    from mmptm.data_pipelines.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    hf_config, config_file = read_hf_config(model_dir)
    config = model_config_from_hf(hf_config, config_file)
    hf = read_hf_weights(model_dir)
    state_dict = state_dict_from_hf(hf, config["text"]["layers"], config["vision"]["layers"])
    config["init_logit_scale"] = float(state_dict["logit_scale"])
    config["vision"].update(_image_normalization(model_dir))
    context_length = config["text"]["context_length"]
    if (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file():
        tokenizer = load_tokenizer(model_dir, context_length=context_length)
    elif (model_dir / "tokenizer.json").is_file():
        tokenizer = _bpe_from_tokenizer_json(model_dir / "tokenizer.json", context_length)
    else:
        raise ConversionError(f"'{model_dir}': no CLIP BPE tokenizer (vocab.json + merges.txt, or tokenizer.json)")
    return write_checkpoint(output_dir, config, state_dict, tokenizer, source=f"huggingface:{model_dir}")


def _image_normalization(model_dir: Path) -> dict[str, list[float]]:
    """``image_mean`` / ``image_std`` of the folder's image processor, those it sets.

    transformers < 5 writes them to ``preprocessor_config.json``; transformers 5's
    ``CLIPProcessor.save_pretrained`` to the ``image_processor`` entry of ``processor_config.json``.
    """
    preprocessor, processor = model_dir / "preprocessor_config.json", model_dir / "processor_config.json"
    if preprocessor.is_file():
        settings = read_json_object(preprocessor)
    elif processor.is_file():
        settings = read_json_object(processor).get("image_processor") or {}
    else:
        return {}
    return {key: [float(x) for x in settings[key]] for key in ("image_mean", "image_std") if key in settings}


def _bpe_from_tokenizer_json(path: Path, context_length: int) -> Any:
    """The CLIP BPE of a ``tokenizers`` file (``tokenizer.json``, all transformers 5 saves).

    Its ``model`` holds the ``vocab`` and the ``merges`` (pairs ``[a, b]``, or ``"a b"`` strings
    in files of ``tokenizers`` < 0.20); ``<|startoftext|>``/``<|endoftext|>`` may be only among
    its ``added_tokens``.

    Raises:
        ConversionError: not a BPE model, or not a CLIP byte-level vocabulary.
    """
    from mmptm.data_pipelines.clip_bpe import ClipBPETokenizer

    data = read_json_object(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict) or not isinstance(
        model.get("merges"), list
    ):
        raise ConversionError(f"{path}: not a BPE tokenizer (model.type 'BPE' with model.vocab and model.merges)")
    vocab = dict(model["vocab"])
    for token in data.get("added_tokens") or []:
        vocab.setdefault(token["content"], token["id"])
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in model["merges"]]
    if any(len(pair) != 2 for pair in merges):
        raise ConversionError(f"{path}: model.merges must be symbol pairs")
    try:
        return ClipBPETokenizer(vocab, merges, context_length)
    except ValueError as err:
        raise ConversionError(f"{path}: not a CLIP BPE tokenizer: {err}") from None


def export_hf_clip(checkpoint: str | Path, output_dir: str | Path) -> Path:
    """Write an mmptm CLIP (``vit`` + ``text_transformer`` towers) as a Hugging Face ``CLIPModel`` folder.

    Writes ``config.json``, ``model.safetensors``, ``preprocessor_config.json``
    and the tokenizer: CLIP BPE as ``vocab.json`` + ``merges.txt`` (loadable by
    ``CLIPTokenizer``); an mmptm sentencepiece tokenizer is copied as
    ``tokenizer.model`` (transformers has no CLIP tokenizer class reading it:
    tokenise with mmptm's). ``eos_token_id`` is the tokenizer's end-of-text id,
    so ``CLIPModel`` pools at the same token as mmptm.

    Raises:
        ConversionError: towers other than ``vit`` + ``text_transformer``, a model with a logit bias,
            or a tokenizer whose end-of-text id is 2 (which ``CLIPTextModel`` would pool wrongly).
    """
    from safetensors.torch import save_file

    from mmptm.models import load_pretrained

    model, tokenizer, _ = load_pretrained(checkpoint)
    visual, text = model.visual, model.text
    kinds = (type(visual).__name__, type(text).__name__)
    if kinds != ("VisionTransformer", "TextTransformer"):
        raise ConversionError(
            f"{checkpoint}: a CLIPModel export needs 'vit' and 'text_transformer' towers, not {kinds}"
        )
    if model.logit_bias is not None:
        raise ConversionError(f"{checkpoint}: CLIPModel has no logit bias (a SigLIP-style model cannot be exported)")
    if tokenizer.eos_id == _HF_LEGACY_EOS_ID:
        # transformers' CLIPTextModel reads eos_token_id == 2 as a pre-2023 config and pools at the
        # highest token id (argmax) instead of the end-of-text token, so its text features would differ.
        raise ConversionError(
            f"{checkpoint}: its tokenizer's end-of-text id is {_HF_LEGACY_EOS_ID} ({type(tokenizer).__name__}), "
            f"which transformers' CLIPTextModel treats as the legacy config and pools at the highest token id "
            f"instead of at end-of-text, giving wrong text features; export only models trained with a tokenizer "
            f"whose end-of-text id is not {_HF_LEGACY_EOS_ID} (e.g. the CLIP BPE), or use the mmptm checkpoint"
        )
    v_blocks, t_blocks = visual.transformer.resblocks, text.transformer.resblocks
    act = {name: hf_name for hf_name, name in _ACTIVATIONS.items()}
    hf_config = {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": visual.proj.shape[1],
        "logit_scale_init_value": model.logit_scale.item(),
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": text.vocab_size,
            "hidden_size": text.transformer.width,
            "intermediate_size": t_blocks[0].mlp.c_fc.out_features,
            "num_hidden_layers": len(t_blocks),
            "num_attention_heads": t_blocks[0].attn.heads,
            "max_position_embeddings": text.context_length,
            "hidden_act": act[text.transformer.act],
            "layer_norm_eps": _LAYER_NORM_EPS,
            "projection_dim": visual.proj.shape[1],
            "pad_token_id": tokenizer.pad_id,
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": visual.transformer.width,
            "intermediate_size": v_blocks[0].mlp.c_fc.out_features,
            "num_hidden_layers": len(v_blocks),
            "num_attention_heads": v_blocks[0].attn.heads,
            "image_size": visual.image_size,
            "patch_size": visual.conv1.kernel_size[0],
            "num_channels": 3,
            "hidden_act": act[visual.transformer.act],
            "layer_norm_eps": _LAYER_NORM_EPS,
            "projection_dim": visual.proj.shape[1],
        },
    }
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": visual.image_size},
        "resample": 3,  # bicubic, as mmptm's eval transform
        "do_center_crop": True,
        "crop_size": {"height": visual.image_size, "width": visual.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(visual.image_mean),
        "image_std": list(visual.image_std),
        "do_convert_rgb": True,
    }
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    hf = state_dict_to_hf(sd, len(t_blocks), len(v_blocks))
    with new_folder(output_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2), encoding="utf-8")
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2), encoding="utf-8")
        save_file(hf, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(tmp)
    return Path(output_dir)
