"""CLIP: an image tower and a text tower embedding into one space, compared by cosine similarity.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision". The interface is open_clip's (``encode_image``, ``encode_text``,
``logit_scale``, ``forward`` returning normalised features), so evaluators written
for open_clip models work unchanged. Either tower is any registered encoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmptm.config import ConfigError
from mmptm.data_pipelines.transforms import normalization_affine
from mmptm.encoders.layers import grad_cached
from mmptm.encoders.towers import build_tower, load_tower_weights
from mmptm.registry import TowerSpec, register_model


@register_model("clip")
class CLIP(nn.Module):
    """A contrastive dual encoder with a learned temperature.

    Args:
        embed_dim: size of the joint embedding space; passed to both towers.
        vision: the image tower's config section, ``{"name": <encoder>, **options}``; without a
            name, ``"timm"`` if it has a ``timm_model`` key, else ``"vit"``. Either tower's section
            also takes ``init_from``, ``frozen`` and ``unfreeze_at_step`` (:mod:`mmptm.encoders.towers`).
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
        vision: TowerSpec = {"name": "vit"},  # noqa: B006
        text: TowerSpec = {"name": "text_transformer"},  # noqa: B006
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
        self.visual, vision_options = build_tower("vision", vision, embed_dim=embed_dim)
        # Unknown tokenizer values are left out so a tower keeps its own default for them.
        tokenizer_values = {"vocab_size": vocab_size, "pad_id": pad_id, "eot_id": eot_id}
        self.text, text_options = build_tower(
            "text", text, embed_dim=embed_dim, **{k: v for k, v in tokenizer_values.items() if v is not None}
        )
        towers = {"vision": ("visual", vision_options), "text": ("text", text_options)}
        # role -> (attribute, checkpoint) of the towers to start from another checkpoint's weights
        self.tower_sources = {
            role: (attribute, options.init_from) for role, (attribute, options) in towers.items() if options.init_from
        }
        # attribute -> the step it trains from (None: never), for the towers configured frozen
        self.frozen_towers = {
            attribute: options.unfreeze_at_step for attribute, options in towers.values() if options.frozen
        }
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.max_logit_scale = max_logit_scale
        # uint8 pixels -> the tower's normalised input, on the model's device without a per-step copy
        if hasattr(self.visual, "image_mean") and hasattr(self.visual, "image_std"):
            gain, offset = normalization_affine(self.visual.image_mean, self.visual.image_std)
            self.register_buffer("pixel_gain", gain, persistent=False)
            self.register_buffer("pixel_offset", offset, persistent=False)

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

    def init_towers(self) -> None:
        """Load each tower's ``init_from`` checkpoint (see :func:`~mmptm.encoders.towers.load_tower_weights`).

        Raises:
            ValueError: weights that do not fit a tower, naming the section and the parameter.
        """
        for role, (attribute, source) in self.tower_sources.items():
            try:
                load_tower_weights(getattr(self, attribute), source, attribute)
            except ValueError as err:
                raise ValueError(f"model.{role}.{err}") from err

    def update_frozen_towers(self, step: int) -> list[str]:
        """Freeze the ``frozen`` towers before their ``unfreeze_at_step`` and let them train from it on.

        The trainer calls this after building the optimizer (which therefore holds a tower that
        unfreezes later) and before every step.

        Returns:
            The attributes of the towers frozen at ``step``.
        """
        frozen = []
        for attribute, unfreeze_at in self.frozen_towers.items():
            trainable = unfreeze_at is not None and step >= unfreeze_at
            getattr(self, attribute).requires_grad_(trainable)
            if not trainable:
                frozen.append(attribute)
        self.train(self.training)
        return frozen

    def train(self, mode: bool = True) -> CLIP:
        """Set train/eval mode; a frozen tower stays in eval mode (no dropout, fixed norm statistics)."""
        super().train(mode)
        for attribute in self.frozen_towers:
            tower = getattr(self, attribute)
            if not any(p.requires_grad for p in tower.parameters()):
                tower.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory in both towers.

        Raises:
            ConfigError: enabling it with a tower (e.g. a user-registered encoder) that has no
                ``set_grad_checkpointing(enable)`` method, naming the tower's class.
        """
        towers = {"vision": self.visual, "text": self.text}
        if enable:
            lacking = [f"model.{role} ({type(tower).__name__})" for role, tower in towers.items()
                       if not callable(getattr(tower, "set_grad_checkpointing", None))]
            if lacking:
                raise ConfigError(
                    f"train.grad_checkpointing: the encoder of {' and '.join(lacking)} has no "
                    "set_grad_checkpointing(enable: bool) method; implement it (recompute its layers in backward, "
                    "e.g. with torch.utils.checkpoint) or set train.grad_checkpointing=false"
                )
        for tower in towers.values():
            if hasattr(tower, "set_grad_checkpointing"):  # a tower without it never had it enabled
                tower.set_grad_checkpointing(enable)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image features ``[B, embed_dim]``, unit-length if ``normalize``.

        ``image``: the vision tower's input, or uint8 pixels ``[B, 3, H, W]`` (an ``image_text`` stream
        with ``uint8_images``), normalised here with the tower's ``image_mean`` / ``image_std``, on
        their device, exactly as the stream's float transform would have.
        """
        if image.dtype == torch.uint8:
            if not hasattr(self, "pixel_gain"):
                raise ValueError("uint8 images need a vision tower with image_mean and image_std to normalise them")
            image = torch.addcmul(self.pixel_offset.float(), image.float(), self.pixel_gain.float())
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text features ``[B, embed_dim]`` from token ids ``[B, L]``, unit-length if ``normalize``."""
        features = self.text(text)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(
        self, image: torch.Tensor | None = None, text: torch.Tensor | None = None, sub_batch: int | None = None
    ) -> dict[str, Any]:
        """Embed a batch for a contrastive loss.

        Args:
            image: input of the vision tower (``[B, 3, H, W]`` images), or ``None``.
            text: token ids ``[B, L]``, or ``None``.
            sub_batch: when training, encode this many pairs at a time and rebuild their activations in
                backward (GradCache, see :func:`~mmptm.encoders.layers.grad_cached`): the towers'
                activation memory is that of ``sub_batch`` pairs whatever the batch size.

        Returns:
            ``image_features`` and ``text_features`` (unit-length, ``None`` for a missing input),
            ``logit_scale`` (the temperature's inverse, ``exp`` of the parameter, at most
            ``max_logit_scale``) and, when the model has one, ``logit_bias``.
        """
        def encode(tower: Callable[..., torch.Tensor], inputs: torch.Tensor | None) -> torch.Tensor | None:
            return None if inputs is None else grad_cached(partial(tower, normalize=True), inputs, sub_batch)

        out: dict[str, Any] = {
            "image_features": encode(self.encode_image, image),
            "text_features": encode(self.encode_text, text),
            "logit_scale": self.logit_scale.clamp(max=math.log(self.max_logit_scale)).exp(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out
