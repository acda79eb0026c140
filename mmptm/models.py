"""Build models from config (``create_model``) and load trained checkpoints (``load_pretrained``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from torch import nn

from mmptm.config import ConfigError, validate_component
from mmptm.registry import MODELS, build


def tokenizer_context(tokenizer: Any) -> dict[str, int]:
    """Run-time values a text tower takes from its tokenizer."""
    if tokenizer is None:
        return {}
    values = {"vocab_size": tokenizer.vocab_size, "pad_id": tokenizer.pad_id, "eot_id": tokenizer.eos_id}
    # BERT-style models also take [CLS] (bos) and the mask id; a tokenizer without them leaves the model's default.
    for name in ("bos_id", "mask_id"):
        if getattr(tokenizer, name, None) is not None:
            values[name] = getattr(tokenizer, name)
    return values


def create_model(config: str | dict[str, Any], tokenizer: Any = None, **options: Any) -> nn.Module:
    """Build a registered model, as timm's ``create_model``.

    Args:
        config: a registered model name (``"clip"``) or a model config section
            (``{"name": "clip", "embed_dim": 64, "vision": {...}, "text": {...}}``).
        tokenizer: fills the text tower's ``vocab_size``, ``pad_id`` and ``eot_id``.
        **options: override entries of the section.

    Returns:
        The model, randomly initialised.

    Raises:
        ConfigError: an unknown model/encoder name or option, naming the valid choices.
    """
    import mmptm.encoders  # noqa: F401  (register built-in encoders)

    section = {"name": config} if isinstance(config, str) else dict(config)
    section.update(options)
    section = validate_component(MODELS, section, "model", "create_model")
    return build(MODELS, section, **tokenizer_context(tokenizer))


class Pretrained(NamedTuple):
    """What :func:`load_pretrained` returns: unpack as ``model, tokenizer, preprocess``."""

    model: nn.Module
    tokenizer: Any
    preprocess: Callable[..., Any]


def load_pretrained(path: str | Path, device: str = "cpu") -> Pretrained:
    """Load an mmptm checkpoint: the model (eval mode), its tokenizer and its eval image transform.

    Args:
        path: a checkpoint folder (``.../checkpoints/step_00000100``) or a run folder
            (its latest checkpoint is used).
        device: where to put the model.
    """
    from mmptm.data_pipelines.context import image_tower
    from mmptm.data_pipelines.tokenizer import load_tokenizer
    from mmptm.data_pipelines.transforms import image_transform
    from mmptm.training.checkpoint import load_weights, resolve_checkpoint

    checkpoint = resolve_checkpoint(path)
    run_config = yaml.safe_load((checkpoint / "config.yaml").read_text(encoding="utf-8")) or {}
    if "model" not in run_config:
        raise ConfigError(f"{checkpoint / 'config.yaml'}: no 'model' section")
    from mmptm.config import import_modules

    import_modules(run_config.get("imports") or [])
    import mmptm.encoders  # noqa: F401  (register built-in encoders)

    try:  # the architecture first: an unknown one is the error to report, not what follows from it
        validate_component(MODELS, dict(run_config["model"]), "model", str(checkpoint / "config.yaml"))
    except ConfigError as err:
        raise ConfigError(f"checkpoint {checkpoint} has an architecture this mmptm cannot build: {err}") from None
    context_length = (run_config.get("tokenizer") or {}).get("context_length", 77)
    tokenizer = load_tokenizer(checkpoint, context_length=context_length)
    model = create_model(run_config["model"], tokenizer=tokenizer)
    load_weights(model, checkpoint / "model.safetensors")
    model.to(device).eval()
    visual = image_tower(model)
    preprocess = image_transform(
        getattr(visual, "image_size", 224),
        getattr(visual, "image_mean", (0.48145466, 0.4578275, 0.40821073)),
        getattr(visual, "image_std", (0.26862954, 0.26130258, 0.27577711)),
        training=False,
    )
    return Pretrained(model, tokenizer, preprocess)
