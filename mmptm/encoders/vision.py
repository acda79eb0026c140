"""Image towers: CLIP's Vision Transformer, and any timm model behind a projection.

Both map ``[B, 3, H, W]`` images to ``[B, embed_dim]`` features and carry the
image size and normalisation the model was built for, so data pipelines and
checkpoints take them from the model.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Literal

import torch
from torch import nn

from mmptm.encoders.layers import Activation, Transformer, check_image_size
from mmptm.encoders.visual_inputs import grid_boxes
from mmptm.registry import did_you_mean, register_encoder

# The normalisation CLIP was trained with (Radford et al. 2021); open_clip's defaults.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@register_encoder("vit")
class VisionTransformer(nn.Module):
    """CLIP's image tower: a ViT with class-token pooling and a linear projection.

    Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words: Transformers for Image
    Recognition at Scale", as used by Radford et al. 2021, "Learning Transferable
    Visual Models From Natural Language Supervision" (pre-norm ``ln_pre`` before the
    blocks, no bias on the patch embedding). Parameter names and init follow open_clip's
    ``VisionTransformer``, so its weights load one to one.

    Args:
        embed_dim: joint embedding size (filled in from the model).
        image_size: input height and width in pixels; a multiple of ``patch_size``.
        patch_size: side of the square patches.
        width: transformer width; a multiple of ``heads``.
        layers: transformer blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden size as a multiple of ``width``.
        act: MLP activation, ``"gelu"`` or ``"quick_gelu"`` (OpenAI's CLIP weights).
        image_mean: per-channel mean used to normalise input images.
        image_std: per-channel standard deviation used to normalise input images.
    """

    input_key = "image"

    def __init__(
        self,
        embed_dim: int,
        image_size: int = 224,
        patch_size: int = 16,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        act: Activation = "gelu",
        image_mean: tuple[float, float, float] = OPENAI_MEAN,
        image_std: tuple[float, float, float] = OPENAI_STD,
    ) -> None:
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(f"'image_size' ({image_size}) must be divisible by 'patch_size' ({patch_size})")
        self.image_size = image_size
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        num_patches = (image_size // patch_size) ** 2

        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(num_patches + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward to save memory."""
        self.transformer.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Every output token, normalised by ``ln_post``: ``[B, 3, S, S]`` -> ``[B, 1 + grid**2, width]``."""
        check_image_size(x, self.image_size)
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid**2, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_post(self.transformer(self.ln_pre(x)))

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The class token and the patch tokens, each projected, as visual tokens of a fusion model.

        Args:
            x: normalised images ``[B, 3, image_size, image_size]``.

        Returns:
            ``(features [B, 1 + grid**2, embed_dim], boxes [1 + grid**2, 4])``: the class token's box is
            the whole image, a patch's its cell (see :func:`~mmptm.encoders.visual_inputs.grid_boxes`).
        """
        tokens = self.forward_features(x) @ self.proj
        grid = self.image_size // self.conv1.kernel_size[0]
        return tokens, grid_boxes(grid, grid, prefix=1, device=tokens.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode images.

        Args:
            x: normalised images ``[B, 3, image_size, image_size]``.

        Returns:
            Unnormalised features ``[B, embed_dim]``.
        """
        return self.forward_features(x)[:, 0] @ self.proj


@register_encoder("timm")
class TimmVisionTower(nn.Module):
    """Any timm image model (randomly initialised), pooled by timm, then projected to ``embed_dim``.

    Parameter names follow open_clip's ``TimmModel`` (``trunk``, ``head.proj`` /
    ``head.mlp``), so its weights load one to one; the trunk keeps timm's own pooling
    (class token for ViTs, average for CNNs), where open_clip defaults to average pooling.

    Args:
        embed_dim: joint embedding size (filled in from the model).
        timm_model: a name from ``timm.list_models()``, e.g. ``"convnext_tiny"``.
        image_size: input height and width; default: the model's timm default input size.
        proj: ``"linear"`` (no bias, as CLIP) or ``"mlp"`` (hidden ``2 * embed_dim``, GELU).
        image_mean: normalisation mean; default: timm's for this model, else CLIP's.
        image_std: normalisation std; default: timm's for this model, else CLIP's.
    """

    input_key = "image"

    def __init__(
        self,
        embed_dim: int,
        timm_model: str,
        image_size: int | None = None,
        proj: Literal["linear", "mlp"] = "linear",
        image_mean: tuple[float, float, float] | None = None,
        image_std: tuple[float, float, float] | None = None,
    ) -> None:
        super().__init__()
        import timm  # deferred: importing timm is slow and only this tower needs it
        from timm.layers import Mlp

        if not timm.is_model(timm_model):
            raise ValueError(
                f"unknown 'timm_model' '{timm_model}';{did_you_mean(timm_model, timm.list_models())} "
                "timm.list_models() lists the choices"
            )
        if proj not in ("linear", "mlp"):
            raise ValueError(f"'proj' must be 'linear' or 'mlp', got '{proj}'")
        pretrained_cfg = timm.get_pretrained_cfg(timm_model)
        timm_size, timm_mean, timm_std = (
            (pretrained_cfg.input_size[-1], pretrained_cfg.mean, pretrained_cfg.std)
            if pretrained_cfg
            else (224, OPENAI_MEAN, OPENAI_STD)
        )
        self.image_size = timm_size if image_size is None else image_size
        self.image_mean = tuple(timm_mean if image_mean is None else image_mean)
        self.image_std = tuple(timm_std if image_std is None else image_std)

        # Models with a fixed input size (position embeddings, windows) are built for ours;
        # convolutional ones take any size and do not accept the argument.
        size_kwargs = {"img_size": self.image_size} if pretrained_cfg and pretrained_cfg.fixed_input_size else {}
        self.timm_model = timm_model
        self.trunk = timm.create_model(timm_model, num_classes=0, **size_kwargs)
        features = self.trunk.num_features
        if proj == "linear":
            head = OrderedDict(proj=nn.Linear(features, embed_dim, bias=False))
        else:
            head = OrderedDict(mlp=Mlp(features, 2 * embed_dim, embed_dim, bias=(True, False)))
        self.head = nn.Sequential(head)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Delegate to timm's per-model gradient checkpointing."""
        self.trunk.set_grad_checkpointing(enable)

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The trunk's unpooled features, each projected by the head, as visual tokens of a fusion model.

        Args:
            x: normalised images ``[B, 3, H, W]``.

        Returns:
            ``(features [B, N, embed_dim], boxes [N, 4])``: a CNN's ``H' × W'`` grid cells, or a
            transformer's prefix tokens (whole-image boxes) followed by its square patch grid.
        """
        features = self.trunk.forward_features(x)
        if features.dim() == 4:  # a CNN's [B, C, H', W'] map
            rows, cols, prefix = features.shape[2], features.shape[3], 0
            features = features.flatten(2).transpose(1, 2)
        else:  # a transformer's [B, prefix + grid**2, C] tokens
            prefix = getattr(self.trunk, "num_prefix_tokens", 0)
            rows = cols = math.isqrt(features.shape[1] - prefix)
            if rows * cols != features.shape[1] - prefix:
                raise ValueError(
                    f"timm model '{self.timm_model}': {features.shape[1]} tokens after {prefix} prefix tokens "
                    "do not form a square grid; its tokens cannot be given grid boxes"
                )
        return self.head(features), grid_boxes(rows, cols, prefix, device=features.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode images ``[B, 3, H, W]`` into unnormalised features ``[B, embed_dim]``."""
        return self.head(self.trunk(x))
