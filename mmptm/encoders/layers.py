"""Transformer building blocks shared by the vision and text towers.

Pre-norm residual blocks as in CLIP (Radford et al. 2021, "Learning Transferable
Visual Models From Natural Language Supervision") and ViT (Dosovitskiy et al.
2021), with attention computed by ``torch.nn.functional.scaled_dot_product_attention``
(flash / memory-efficient kernels where available). Parameter names follow
``nn.MultiheadAttention`` and open_clip (``in_proj_weight``, ``out_proj``,
``mlp.c_fc``, ``resblocks.N``) so open_clip state dicts load one to one.
Tensors are batch-first, ``[B, L, D]``, everywhere.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mmptm.registry import did_you_mean

# The MLP activation: exact GELU, or the sigmoid approximation OpenAI trained CLIP with.
Activation = Literal["gelu", "quick_gelu"]


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameters, computed by SDPA.

    Args:
        width: model width ``D``.
        heads: number of attention heads; must divide ``width``.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"'width' ({width}) must be divisible by 'heads' ({heads})")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        # nn.MultiheadAttention's own init, so a fresh block starts where open_clip's does.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Attend over ``x``.

        Args:
            x: ``[B, L, D]``.
            attn_mask: boolean, ``True`` where attention is allowed (SDPA's convention, the
                opposite of ``nn.MultiheadAttention``'s ``key_padding_mask``): ``[B, L]`` marks the
                keys every query of a sequence may attend to (padding ``False``); ``[B, L, L]`` is a
                full query-by-key mask. The same mask applies to every head.
            is_causal: position ``i`` attends only to positions ``<= i``; combined with
                ``attn_mask`` when both are given.

        Returns:
            ``[B, L, D]``.
        """
        batch, length, width = x.shape
        q, k, v = (
            F.linear(x, self.in_proj_weight, self.in_proj_bias)
            .view(batch, length, 3, self.heads, width // self.heads)
            .permute(2, 0, 3, 1, 4)  # -> 3 x [B, heads, L, head_dim]
        )
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool:
                raise ValueError(f"attn_mask must be boolean (True = may attend), got {attn_mask.dtype}")
            attn_mask = attn_mask[:, None, None, :] if attn_mask.dim() == 2 else attn_mask[:, None]
            if is_causal:
                # SDPA refuses is_causal together with a mask, so fold the causal triangle into it.
                causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
                attn_mask, is_causal = attn_mask & causal, False
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 * x)``, the GELU approximation OpenAI's CLIP models were trained with.

    Hendrycks & Gimpel 2016, "Gaussian Error Linear Units (GELUs)", Sec. 2; the same function
    as open_clip's ``QuickGELU``. Models imported from OpenAI checkpoints need it to reproduce
    their features; exact GELU is faster for new models.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: Activation) -> nn.Module:
    """Build the activation named ``name``.

    Args:
        name: ``"gelu"`` (``nn.GELU``) or ``"quick_gelu"`` (:class:`QuickGELU`).

    Returns:
        A module without parameters, so the choice never changes a state dict.

    Raises:
        ValueError: ``name`` is not one of the choices.
    """
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    choices = get_args(Activation)
    raise ValueError(
        f"unknown 'act' {name!r};{did_you_mean(str(name), choices)} choices: {', '.join(map(repr, choices))}"
    )


class Mlp(nn.Module):
    """The transformer feed-forward block: ``c_proj(act(c_fc(x)))``, open_clip's names.

    Args:
        width: input and output size.
        hidden: hidden size (``mlp_ratio * width`` in the blocks).
        act: the activation, see :func:`activation`.
    """

    def __init__(self, width: int, hidden: int, act: Activation = "gelu") -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = activation(act)  # open_clip's module name, whichever activation it holds
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``.

    Args:
        width: model width.
        heads: attention heads.
        mlp_ratio: MLP hidden size as a multiple of ``width``.
        act: the MLP activation, see :func:`activation`.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act: Activation = "gelu") -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), act)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """``[B, L, D] -> [B, L, D]``; ``attn_mask`` and ``is_causal`` as in :class:`Attention`."""
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock`, optionally gradient-checkpointed.

    Args:
        width: model width.
        layers: number of blocks (at least 1).
        heads: attention heads; must divide ``width``.
        mlp_ratio: MLP hidden size as a multiple of ``width``.
        act: the MLP activation, see :func:`activation`.
    """

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, act: Activation = "gelu") -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"'layers' must be at least 1, got {layers}")
        self.width = width
        self.layers = layers
        self.act = act
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio, act) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """``[B, L, D] -> [B, L, D]``; ``attn_mask`` and ``is_causal`` as in :class:`Attention`."""
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Recompute each block's activations in backward: memory O(layers) -> O(1) blocks.
                x = checkpoint(block, x, attn_mask, is_causal, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        return x


def check_image_size(images: torch.Tensor, image_size: int) -> None:
    """Raise a ValueError unless ``images`` are ``[..., image_size, image_size]`` (a tower built for that size)."""
    if images.shape[-2:] != (image_size, image_size):
        raise ValueError(f"expected {image_size}x{image_size} images, got {tuple(images.shape)}")
