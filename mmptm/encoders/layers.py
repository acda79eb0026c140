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

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple, get_args

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
        dropout: dropout on the attention probabilities in training (``nn.MultiheadAttention``'s
            ``dropout``, Hugging Face's ``attention_dropout``).
    """

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"'width' ({width}) must be divisible by 'heads' ({heads})")
        check_probability("attention dropout", dropout)
        self.heads = heads
        self.dropout = dropout
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
        length = x.shape[1]
        q, k, v = self.split_heads(F.linear(x, self.in_proj_weight, self.in_proj_bias), 3)
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool:
                raise ValueError(f"attn_mask must be boolean (True = may attend), got {attn_mask.dtype}")
            attn_mask = attn_mask[:, None, None, :] if attn_mask.dim() == 2 else attn_mask[:, None]
            if is_causal:
                # SDPA refuses is_causal together with a mask, so fold the causal triangle into it.
                causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
                attn_mask, is_causal = attn_mask & causal, False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=self.dropout_p
        )
        return self.out_proj(self.merge_heads(out))

    @property
    def dropout_p(self) -> float:
        """The attention dropout SDPA applies now: ``dropout`` in training, 0 in evaluation."""
        return self.dropout if self.training else 0.0

    def split_heads(self, projected: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """Split packed projections ``[B, L, parts * D]`` into ``parts`` tensors ``[B, heads, L, D / heads]``.

        ``parts`` is 3 for the packed query/key/value projection of ``in_proj_weight``; an
        encoder-decoder's cross-attention projects queries (1) and keys/values (2) apart.
        """
        batch, length, size = projected.shape
        head_dim = size // (parts * self.heads)
        return tuple(projected.view(batch, length, parts, self.heads, head_dim).permute(2, 0, 3, 1, 4))

    @staticmethod
    def merge_heads(out: torch.Tensor) -> torch.Tensor:
        """``[B, heads, L, head_dim] -> [B, L, heads * head_dim]``, the input of ``out_proj``."""
        batch, heads, length, head_dim = out.shape
        return out.transpose(1, 2).reshape(batch, length, heads * head_dim)


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
        dropout: dropout on the activations in training (Hugging Face's ``activation_dropout``).
    """

    def __init__(self, width: int, hidden: int, act: Activation = "gelu", dropout: float = 0.0) -> None:
        super().__init__()
        check_probability("activation dropout", dropout)
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = activation(act)  # open_clip's module name, whichever activation it holds
        self.c_proj = nn.Linear(hidden, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(dropout(self.gelu(self.c_fc(x)), self.dropout, self.training))


class Dropouts(NamedTuple):
    """The dropout probabilities of a block, named as Hugging Face's BART/mBART configs name them.

    All are applied in training only (Vaswani et al. 2017, sec. 5.4: residual dropout on each
    sub-layer's output before the residual sum; BART/mBART add the other two).
    """

    dropout: float = 0.0  # each sub-layer's output, before it is added to the residual
    attention_dropout: float = 0.0  # the attention probabilities
    activation_dropout: float = 0.0  # the MLP's activations


NO_DROPOUT = Dropouts()


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``.

    Args:
        width: model width.
        heads: attention heads.
        mlp_ratio: MLP hidden size as a multiple of ``width``.
        act: the MLP activation, see :func:`activation`.
        dropouts: dropout probabilities (default: none, as CLIP).
    """

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        act: Activation = "gelu",
        dropouts: Dropouts = NO_DROPOUT,
    ) -> None:
        super().__init__()
        check_probability("dropout", dropouts.dropout)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropouts.attention_dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), act, dropouts.activation_dropout)
        self.dropout = dropouts.dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """``[B, L, D] -> [B, L, D]``; ``attn_mask`` and ``is_causal`` as in :class:`Attention`."""
        x = x + dropout(self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal), self.dropout, self.training)
        return x + dropout(self.mlp(self.ln_2(x)), self.dropout, self.training)


class Transformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock`, optionally gradient-checkpointed.

    Args:
        width: model width.
        layers: number of blocks (at least 1).
        heads: attention heads; must divide ``width``.
        mlp_ratio: MLP hidden size as a multiple of ``width``.
        act: the MLP activation, see :func:`activation`.
        dropouts: every block's dropout probabilities (default: none).
    """

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float = 4.0,
        act: Activation = "gelu",
        dropouts: Dropouts = NO_DROPOUT,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"'layers' must be at least 1, got {layers}")
        self.width = width
        self.layers = layers
        self.act = act
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, act, dropouts) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """``[B, L, D] -> [B, L, D]``; ``attn_mask`` and ``is_causal`` as in :class:`Attention`."""
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # Recompute each block's activations in backward: memory O(layers) -> O(1) blocks.
                x = checkpoint_in_forward_modes(block, x, attn_mask, is_causal)
            else:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        return x


def padding_by_place(text: torch.Tensor, pad_id: int, eot_id: int | None) -> torch.Tensor:
    """``[B, L]`` bool, True at the padding of tokenizer rows ``text``.

    A ``pad_id`` is padding unless it comes before the row's first ``eot_id``: with CLIP's BPE,
    pad id 0 is also the symbol ``"!"``, a word of the caption there. Rows without an end-of-text
    token (or ``eot_id`` None) have every ``pad_id`` as padding.
    """
    is_pad = text == pad_id
    if eot_id is None:
        return is_pad
    is_eot = (text == eot_id).int()
    inside_caption = (is_eot.cumsum(dim=1) == 0) & is_eot.any(dim=1, keepdim=True)
    return is_pad & ~inside_caption


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(x, p, training)``, skipped (no kernel, no random numbers) when it would do nothing."""
    return F.dropout(x, p, training) if p and training else x


def check_probability(name: str, p: float) -> None:
    """Raise a ValueError naming ``name`` unless ``0 <= p <= 1`` (a dropout probability, as ``nn.Dropout``'s)."""
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")


def check_image_size(images: torch.Tensor, image_size: int) -> None:
    """Raise a ValueError unless ``images`` are ``[..., image_size, image_size]`` (a tower built for that size)."""
    if images.shape[-2:] != (image_size, image_size):
        raise ValueError(f"expected {image_size}x{image_size} images, got {tuple(images.shape)}")


def grad_cached(
    encode: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, sub_batch: int | None
) -> torch.Tensor:
    """``encode(inputs)`` in sub-batches whose activations are rebuilt in backward: GradCache's representation cache.

    Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup",
    sec. 3.2: the representations of the whole batch are computed without keeping the encoder's
    graph; backward first computes the loss's gradient with respect to all of them (the cached
    gradients), then re-runs each sub-batch's forward with its graph and back-propagates its
    slice. Non-reentrant activation checkpointing per sub-batch does exactly that inside one
    ``backward()``, so accumulation, autocast and DDP's gradient hooks work unchanged. The
    encoder's activation memory is that of one sub-batch; the loss still sees the whole batch.
    Gradients equal the uncached ones; the forward runs twice.

    Args:
        encode: the encoder, ``[N, ...] -> [N, D]``, each row depending only on its input row.
        inputs: the whole batch.
        sub_batch: rows encoded at once (None: all, with the graph kept as usual).

    Returns:
        ``encode(inputs)``, ``[N, D]``.
    """
    if sub_batch is not None and sub_batch < 1:
        raise ValueError(f"sub_batch must be >= 1, got {sub_batch}")
    if sub_batch is None or not torch.is_grad_enabled() or inputs.shape[0] <= sub_batch:
        return encode(inputs)
    return torch.cat([checkpoint_in_forward_modes(encode, part) for part in inputs.split(sub_batch)])


def checkpoint_in_forward_modes(function: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """Non-reentrant activation checkpointing whose recomputation runs under the forward's torch function modes.

    Autograd carries autocast into the recomputation in backward but not Python
    ``TorchFunctionMode`` s, such as the CPU bf16 GEMM mode of
    :mod:`mmptm.training.precision`; without them the recomputed activations would
    differ from the saved ones (and checkpoint would refuse them).
    """
    modes = torch.overrides._get_current_function_mode_stack()

    @contextlib.contextmanager
    def forward_modes() -> Iterator[None]:  # entered only when backward recomputes
        with contextlib.ExitStack() as stack:
            for mode in modes:
                stack.enter_context(mode)
            yield

    return checkpoint(function, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), forward_modes()))
