"""Build models from config (``create_model``) and load trained checkpoints (``load_pretrained``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from torch import nn

from mmptm.config import RUNTIME_PARAMETERS, ConfigError, validate_component
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
        **options: override entries of the section; the run-time values a tokenizer gives
            (``vocab_size``, ``pad_id``, ``eot_id``, ``bos_id``, ``mask_id``) may be passed here
            instead of ``tokenizer`` (and take precedence over it).

    Returns:
        The model, randomly initialised.

    Raises:
        ConfigError: an unknown model/encoder name or option, naming the valid choices; or a model
            whose text tower needs a tokenizer value (``vocab_size``, ...) that neither ``tokenizer``
            nor ``options`` gives.
    """
    import mmptm.encoders  # noqa: F401  (register built-in encoders)

    runtime_names = RUNTIME_PARAMETERS["model"]
    section = {"name": config} if isinstance(config, str) else dict(config)
    section.update({k: v for k, v in options.items() if k not in runtime_names})
    context = {**tokenizer_context(tokenizer), **{k: v for k, v in options.items() if k in runtime_names}}
    section = validate_component(MODELS, section, "model", "create_model")
    try:
        return build(MODELS, section, **context)
    except TypeError as err:
        # A text tower's required tokenizer value (``vocab_size``) arrives only through the context.
        missing = re.search(r"missing \d+ required .*argument.*?'(\w+)'", str(err))
        if missing is None or missing.group(1) not in runtime_names or missing.group(1) in context:
            raise
        raise ConfigError(
            f"create_model('{section['name']}'): the model needs '{missing.group(1)}', which comes from its "
            "tokenizer: pass tokenizer= (e.g. mmptm.data_pipelines.tokenizer.load_tokenizer(...)) "
            f"or {missing.group(1)}=..."
        ) from None


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
        raise ConfigError(
            f"checkpoint {checkpoint} has an architecture this mmptm cannot build: {err}; a model or encoder "
            "registered in your own module must be imported first: import it before load_pretrained, or list it "
            "under 'imports:' in the checkpoint's config.yaml (as `mmptm train --import` does)"
        ) from None
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
