"""CLIP: an image tower and a text tower embedding into one space, compared by cosine similarity.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision". The interface is open_clip's (``encode_image``, ``encode_text``,
``logit_scale``, ``forward`` returning normalised features), so evaluators written
for open_clip models work unchanged. Either tower is any registered encoder.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmptm.registry import ENCODERS, EncoderSpec, build, register_model


def _build_tower(role: str, spec: dict[str, Any], **context: Any) -> nn.Module:
    """Build an encoder; a bad option's error names its config section."""
    try:
        return build(ENCODERS, spec, **context)
    except ValueError as err:
        raise ValueError(f"model.{role}: {err}") from err


@register_model("clip")
class CLIP(nn.Module):
    """A contrastive dual encoder with a learned temperature.

    Args:
        embed_dim: size of the joint embedding space; passed to both towers.
        vision: the image tower's config section, ``{"name": <encoder>, **options}``; without a
            name, ``"timm"`` if it has a ``timm_model`` key, else ``"vit"``.
        text: the text tower's config section.
        init_logit_scale: initial log of the softmax temperature's inverse (CLIP: ``log(1 / 0.07)``).
        max_logit_scale: the scale is clamped to at most this (CLIP: 100) so training stays stable.
        init_logit_bias: initial learned logit bias (SigLIP uses ``-10``); ``None``: no bias.
        vocab_size: tokenizer vocabulary size (filled in from the tokenizer).
        pad_id: padding id (filled in from the tokenizer).
        eot_id: end-of-text id (filled in from the tokenizer).
    """

    def __init__(
        self,
        embed_dim: int = 512,
        # Read-only defaults (copied before use); the config loader validates them as dicts.
        vision: EncoderSpec = {"name": "vit"},  # noqa: B006
        text: EncoderSpec = {"name": "text_transformer"},  # noqa: B006
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = 100.0,
        init_logit_bias: float | None = None,
        vocab_size: int | None = None,
        pad_id: int = 0,
        eot_id: int | None = None,
    ) -> None:
        super().__init__()
        vision = dict(vision)
        vision.setdefault("name", "timm" if "timm_model" in vision else "vit")
        self.visual = _build_tower("vision", vision, embed_dim=embed_dim)
        # Unknown tokenizer values are left out so a tower keeps its own default for them.
        tokenizer_values = {"vocab_size": vocab_size, "pad_id": pad_id, "eot_id": eot_id}
        self.text = _build_tower(
            "text", text, embed_dim=embed_dim, **{k: v for k, v in tokenizer_values.items() if v is not None}
        )
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.max_logit_scale = max_logit_scale

    @property
    def image_size(self) -> int:
        """The vision tower's input size, for data pipelines and preprocessing."""
        return self.visual.image_size

    @property
    def image_mean(self) -> tuple[float, ...]:
        """The vision tower's normalisation mean."""
        return self.visual.image_mean

    @property
    def image_std(self) -> tuple[float, ...]:
        """The vision tower's normalisation standard deviation."""
        return self.visual.image_std

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory in both towers."""
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image features ``[B, embed_dim]``, unit-length if ``normalize``."""
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text features ``[B, embed_dim]`` from token ids ``[B, L]``, unit-length if ``normalize``."""
        features = self.text(text)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None) -> dict[str, Any]:
        """Embed a batch for a contrastive loss.

        Args:
            image: input of the vision tower (``[B, 3, H, W]`` images), or ``None``.
            text: token ids ``[B, L]``, or ``None``.

        Returns:
            ``image_features`` and ``text_features`` (unit-length, ``None`` for a missing input),
            ``logit_scale`` (the temperature's inverse, ``exp`` of the parameter, at most
            ``max_logit_scale``) and, when the model has one, ``logit_bias``.
        """
        out: dict[str, Any] = {
            "image_features": None if image is None else self.encode_image(image, normalize=True),
            "text_features": None if text is None else self.encode_text(text, normalize=True),
            "logit_scale": self.logit_scale.clamp(max=math.log(self.max_logit_scale)).exp(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out
