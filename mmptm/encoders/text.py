"""CLIP's text tower: a causal transformer pooled at the end-of-text token."""

from __future__ import annotations

import torch
from torch import nn

from mmptm.encoders.layers import Activation, Transformer
from mmptm.registry import register_encoder


@register_encoder("text_transformer")
class TextTransformer(nn.Module):
    """Causal text transformer with end-of-text pooling and a linear projection.

    Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
    Supervision", Sec. 2.4: a GPT-style (masked self-attention) transformer whose
    activation at the end-of-text token, after a final LayerNorm, is projected into
    the joint space. Parameter names and init follow open_clip's ``TextTransformer``
    (``text_projection`` is a ``[width, embed_dim]`` matrix), so its weights load one
    to one.

    Args:
        embed_dim: joint embedding size (filled in from the model).
        vocab_size: tokenizer vocabulary size (filled in from the tokenizer).
        context_length: longest token sequence; the number of position embeddings.
        width: transformer width; a multiple of ``heads``.
        heads: attention heads.
        layers: transformer blocks.
        mlp_ratio: MLP hidden size as a multiple of ``width``.
        act: MLP activation, ``"gelu"`` or ``"quick_gelu"`` (OpenAI's CLIP weights).
        pad_id: padding id (filled in from the tokenizer).
        eot_id: end-of-text id (filled in from the tokenizer). ``None`` pools at the
            highest id of each sequence, which is the end-of-text token in CLIP's BPE
            vocabulary (open_clip's ``argmax`` pooling).
    """

    input_key = "text"

    def __init__(
        self,
        embed_dim: int,
        vocab_size: int,
        context_length: int = 77,
        width: int = 512,
        heads: int = 8,
        layers: int = 12,
        mlp_ratio: float = 4.0,
        act: Activation = "gelu",
        pad_id: int = 0,
        eot_id: int | None = None,
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.eot_id = eot_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.init_parameters()

    def init_parameters(self) -> None:
        """open_clip's (and OpenAI CLIP's) init: small embeddings, depth-scaled residual projections."""
        width, layers = self.transformer.width, self.transformer.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        # Residual outputs shrink with depth so the summed stream keeps unit scale (GPT-2).
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward to save memory."""
        self.transformer.grad_checkpointing = enable

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """Encode token ids.

        Args:
            text: ``[B, L]`` token ids, ``L <= context_length``, each sequence ending with its
                end-of-text token and right-padded.

        Returns:
            Unnormalised features ``[B, embed_dim]``.
        """
        length = text.shape[1]
        if length > self.context_length:
            raise ValueError(f"{length} tokens exceed 'context_length' ({self.context_length})")
        eot = self.eot_positions(text)
        if text.device.type == "cpu" and text.shape[0] > 0 and not torch.compiler.is_compiling():
            # Causal attention: no position up to a sequence's end-of-text token sees the ones after
            # it, so the columns after the batch's last end-of-text token change neither the pooled
            # features nor any gradient. Dropping them (captions are ~10-30 of the 77 tokens) is
            # exact and saves their compute. Only for tensors on the CPU, where reading the length
            # costs nothing; on an accelerator it would be a host synchronisation per step.
            kept = int(eot.max()) + 1
            if kept < length:
                text, length = text[:, :kept], kept
        x = self.token_embedding(text) + self.positional_embedding[:length]
        x = self.ln_final(self.transformer(x, is_causal=True))
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        return pooled @ self.text_projection

    def eot_positions(self, text: torch.Tensor) -> torch.Tensor:
        """Index of each sequence's end-of-text token, ``[B]``: the causal summary of the whole text."""
        if self.eot_id is None:
            return text.argmax(dim=-1)
        is_eot = text == self.eot_id
        # A sequence cut without its end-of-text token pools at its last real token instead.
        last_token = (text != self.pad_id).cumsum(dim=-1).argmax(dim=-1)
        return torch.where(is_eot.any(dim=-1), is_eot.int().argmax(dim=-1), last_token)
