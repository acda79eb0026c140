"""Import OpenCLIP and OpenAI CLIP checkpoints into mmptm checkpoint folders.

Supported: CLIP models with OpenAI's architecture, i.e. a ViT (``visual.proj``)
or ModifiedResNet (``visual.attnpool``) image tower and the causal text
transformer, in open_clip's ``CLIP`` layout (text weights at the top level, as
in OpenAI's files) or ``CustomTextCLIP`` layout (``text.`` prefix), as plain
state dicts, open_clip training checkpoints (``{"state_dict": ...}``,
``module.`` prefixes), ``.safetensors`` or OpenAI's TorchScript archives.
Architectures are inferred from tensor shapes as open_clip's
``build_model_from_openai_state_dict`` does; variants this cannot express
(timm or Hugging Face towers, attentional pooling, layer scale, ...) are
rejected with the keys that do not fit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from mmptm.interop.common import ConversionError, infer_layers, is_torchscript, read_state_dict, write_checkpoint

# Entries of OpenAI's state dicts that are hyper-parameters, not weights.
_OPENAI_SCALARS = ("input_resolution", "context_length", "vocab_size")
HEAD_WIDTH = 64  # open_clip's default width per attention head


def open_clip_bpe_path() -> Path:
    """open_clip's bundled CLIP BPE merges file (``bpe_simple_vocab_16e6.txt.gz``).

    Raises:
        ConversionError: open_clip is not installed (pass the tokenizer file explicitly then).
    """
    try:
        import open_clip
    except ImportError:
        raise ConversionError(
            "the CLIP BPE vocabulary comes from open_clip: pip install open_clip_torch, or pass --tokenizer "
            "(bpe_simple_vocab_16e6.txt.gz, or a folder with vocab.json + merges.txt)"
        ) from None
    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def to_mmptm_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip ``CLIP`` (text at the top level) or ``CustomTextCLIP`` keys -> mmptm's (``visual.``, ``text.``)."""
    converted = {}
    for key, value in state_dict.items():
        if key in _OPENAI_SCALARS or key.endswith("attn_mask"):
            continue
        if key.startswith(("visual.", "text.")) or key in ("logit_scale", "logit_bias"):
            converted[key] = value
        else:
            converted[f"text.{key}"] = value
    return converted


def infer_model_config(
    state_dict: dict[str, torch.Tensor], act: str, text_heads: int | None = None, vision_heads: int | None = None
) -> dict[str, Any]:
    """The mmptm ``clip`` model config of mmptm-layout OpenCLIP weights (see :func:`to_mmptm_layout`).

    Args:
        state_dict: weights in mmptm's layout.
        act: ``"gelu"`` or ``"quick_gelu"`` (OpenAI's weights, and open_clip's ``-quickgelu`` models).
        text_heads / vision_heads: attention heads, when known; default width / 64 as OpenAI's.

    Raises:
        ConversionError: weights of neither a ViT nor a ModifiedResNet CLIP.
    """
    if "text.text_projection" not in state_dict or "text.token_embedding.weight" not in state_dict:
        raise ConversionError("no CLIP text transformer (token_embedding, text_projection) in the weights")
    projection = state_dict["text.text_projection"]
    if projection.ndim != 2:
        raise ConversionError(f"text_projection has shape {tuple(projection.shape)}; expected [width, embed_dim]")
    embed_dim = projection.shape[1]
    text_width = state_dict["text.ln_final.weight"].shape[0]
    text = {
        "name": "text_transformer",
        "context_length": state_dict["text.positional_embedding"].shape[0],
        "width": text_width,
        "heads": text_heads or text_width // HEAD_WIDTH,
        "layers": infer_layers(state_dict, "text.transformer.resblocks."),
        "mlp_ratio": state_dict["text.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
        "act": act,
    }
    if "visual.proj" in state_dict:
        width = state_dict["visual.conv1.weight"].shape[0]
        patch_size = state_dict["visual.conv1.weight"].shape[-1]
        grid = round(math.sqrt(state_dict["visual.positional_embedding"].shape[0] - 1))
        vision = {
            "name": "vit",
            "image_size": patch_size * grid,
            "patch_size": patch_size,
            "width": width,
            "layers": infer_layers(state_dict, "visual.transformer.resblocks."),
            "heads": vision_heads or width // HEAD_WIDTH,
            "mlp_ratio": state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
            "act": act,
        }
    elif "visual.attnpool.positional_embedding" in state_dict:
        width = state_dict["visual.layer1.0.conv1.weight"].shape[0]
        grid = round(math.sqrt(state_dict["visual.attnpool.positional_embedding"].shape[0] - 1))
        vision = {
            "name": "modified_resnet",
            "layers": [infer_layers(state_dict, f"visual.layer{i}.") for i in (1, 2, 3, 4)],
            "width": width,
            "heads": vision_heads or width * 32 // HEAD_WIDTH,
            "image_size": grid * 32,
        }
    else:
        tower = sorted({k.split(".")[1] for k in state_dict if k.startswith("visual.")})[:8]
        raise ConversionError(
            f"unknown image tower (its weights start with visual.{{{','.join(tower)}}}): "
            "supported are OpenAI-style ViT (visual.proj) and ModifiedResNet (visual.attnpool) towers"
        )
    return {
        "name": "clip",
        "embed_dim": embed_dim,
        "vision": vision,
        "text": text,
        "init_logit_scale": float(state_dict.get("logit_scale", torch.tensor(math.log(1 / 0.07)))),
        **({"init_logit_bias": float(state_dict["logit_bias"])} if "logit_bias" in state_dict else {}),
    }


def _named_config(model_name: str) -> dict[str, Any]:
    try:
        import open_clip
    except ImportError:
        raise ConversionError("--model needs open_clip installed (pip install open_clip_torch)") from None
    config = open_clip.get_model_config(model_name)
    if config is None:
        names = open_clip.list_models()
        from mmptm.registry import did_you_mean

        raise ConversionError(f"unknown open_clip model '{model_name}';{did_you_mean(model_name, names)}")
    return config


# open_clip config options that change the features without adding weights, so the weights cannot show
# them: (section, key) -> the values mmptm's towers compute. Text "eos" pooling is checked against the
# tokenizer in import_open_clip. final_ln_after_pool is not listed: with single-token pooling ("tok",
# "argmax", "eos") the per-token LayerNorm before or after pooling gives the same features.
_FEATURE_OPTIONS: dict[tuple[str, str], tuple[Any, ...]] = {
    ("vision_cfg", "pool_type"): ("tok",),
    ("vision_cfg", "act_kwargs"): (None, {}),
    ("vision_cfg", "norm_kwargs"): (None, {}),
    ("text_cfg", "pool_type"): ("argmax", "eos"),
    ("text_cfg", "no_causal_mask"): (False,),
    ("text_cfg", "act_kwargs"): (None, {}),
    ("text_cfg", "norm_kwargs"): (None, {}),
}
# open_clip's CLIPTextCfg / CLIPVisionCfg defaults for the keys read here (a named config may omit them).
_OPEN_CLIP_TEXT_DEFAULTS = {"heads": 8, "eos_id": 2}
_OPEN_CLIP_VISION_HEAD_WIDTH = 64


def check_named_options(named: dict[str, Any], model_name: str) -> None:
    """Refuse an open_clip model config whose options change the features without adding weights.

    Args:
        named: the open_clip model config (``open_clip.get_model_config``).
        model_name: its name, for messages.

    Raises:
        ConversionError: naming the first such key, its value and the accepted values.
    """
    for (section, key), accepted in _FEATURE_OPTIONS.items():
        value = (named.get(section) or {}).get(key, accepted[0])
        if value not in accepted:
            raise ConversionError(
                f"open_clip model '{model_name}': {section}.{key} = {value!r} changes the features in a way "
                f"mmptm's towers do not compute; accepted: {' or '.join(repr(a) for a in accepted)}"
            )


def named_heads(named: dict[str, Any]) -> tuple[int, int | None]:
    """``(text_heads, vision_heads)`` of an open_clip model config, by open_clip's rules.

    Text: ``text_cfg.heads`` (default 8). Vision: ``width // head_width`` for a ViT and
    ``width * 32 // head_width`` (the attention pool's width is 32x the stem's) for a
    ModifiedResNet (``layers`` a list), ``head_width`` 64 by default; None without a ``width``.
    """
    text_heads = (named.get("text_cfg") or {}).get("heads", _OPEN_CLIP_TEXT_DEFAULTS["heads"])
    vision_cfg = named.get("vision_cfg") or {}
    if "width" not in vision_cfg:
        return text_heads, None
    head_width = vision_cfg.get("head_width", _OPEN_CLIP_VISION_HEAD_WIDTH)
    is_resnet = isinstance(vision_cfg.get("layers"), (list, tuple))
    return text_heads, (vision_cfg["width"] * 32 if is_resnet else vision_cfg["width"]) // head_width


def import_open_clip(
    weights: str | Path,
    output_dir: str | Path,
    model_name: str | None = None,
    quick_gelu: bool | None = None,
    tokenizer: str | Path | None = None,
) -> Path:
    """Convert an OpenCLIP/OpenAI CLIP weights file into an mmptm checkpoint folder.

    Args:
        weights: ``.pt``/``.pth``/``.bin``/``.safetensors`` file or TorchScript archive.
        output_dir: the checkpoint folder to create.
        model_name: the open_clip model config the weights belong to (e.g.
            ``"ViT-B-32"``, ``"RN50-quickgelu"``): gives the activation and head counts, and
            its options that change the features without adding weights are checked (vision
            ``pool_type`` other than ``'tok'``, text ``pool_type`` other than ``'argmax'``/``'eos'``
            at the tokenizer's end-of-text id, text ``no_causal_mask``, ``act_kwargs``/``norm_kwargs``)
            and refused. Without it such options cannot be detected from the weights: the import
            succeeds and the features differ from open_clip's.
        quick_gelu: QuickGELU activations; default: from ``model_name``, else True for
            OpenAI TorchScript archives and False otherwise (open_clip's non-``-quickgelu`` models).
        tokenizer: the CLIP BPE vocabulary (``.txt.gz`` merges file or a folder with
            ``vocab.json`` + ``merges.txt``); default: the one open_clip ships.

    Returns:
        The checkpoint folder.

    Raises:
        ConversionError: weights of an unsupported architecture, an unknown ``model_name`` or one
            with feature-changing options (see above), or a tokenizer that does not fit.
    """
    from mmptm.data_pipelines.tokenizer import load_tokenizer

    path = Path(weights)
    state_dict = to_mmptm_layout(read_state_dict(path))
    text_heads = vision_heads = None
    named: dict[str, Any] = {}
    if model_name is not None:
        named = _named_config(model_name)
        check_named_options(named, model_name)
        if quick_gelu is None:
            quick_gelu = bool(named.get("quick_gelu", False))
        text_heads, vision_heads = named_heads(named)
    if quick_gelu is None:
        quick_gelu = is_torchscript(path)
    config = infer_model_config(state_dict, "quick_gelu" if quick_gelu else "gelu", text_heads, vision_heads)
    bpe = load_tokenizer(tokenizer or open_clip_bpe_path(), context_length=config["text"]["context_length"])
    if bpe.vocab_size != state_dict["text.token_embedding.weight"].shape[0]:
        raise ConversionError(
            f"the tokenizer has {bpe.vocab_size} tokens but the text tower embeds "
            f"{state_dict['text.token_embedding.weight'].shape[0]}: pass the model's own --tokenizer"
        )
    text_cfg = named.get("text_cfg", {})
    if text_cfg.get("pool_type") == "eos" and text_cfg.get("eos_id", _OPEN_CLIP_TEXT_DEFAULTS["eos_id"]) != bpe.eos_id:
        raise ConversionError(
            f"open_clip model '{model_name}': text_cfg.pool_type 'eos' pools at eos_id "
            f"{text_cfg.get('eos_id', _OPEN_CLIP_TEXT_DEFAULTS['eos_id'])}, but mmptm pools at the tokenizer's "
            f"end-of-text id {bpe.eos_id}; accepted: pool_type 'argmax', or 'eos' with eos_id {bpe.eos_id}"
        )
    return write_checkpoint(output_dir, config, state_dict, bpe, source=f"open_clip:{path}")
