"""A multilingual masked-LM encoder as a dual encoder's text tower: mean-pooled states, projected.

M-CLIP (Carlsson et al. 2022, "Cross-lingual and Multilingual CLIP", sec. 3)
puts a pretrained multilingual encoder (XLM-R) with a new linear projection
in place of CLIP's text tower. Here the encoder is mmptm's
``multilingual_encoder`` (XLM-R style: no language embeddings, since a dual
encoder's ``encode_text`` gets token ids only), so ``model.text.init_from`` can
start it from a run of ``mmlm_tiny.yaml`` / ``xlm_tiny.yaml`` with
``model.language_embeddings=false``, or from a Hugging Face XLM-R checkpoint
imported with ``mmptm convert hf-xlmr`` (with that checkpoint's ``norm_first``,
``layer_norm_eps``, ``position_offset`` and ``dropout``), as M-CLIP does.
"""

from __future__ import annotations

import torch
from torch import nn

from mmptm.encoders.layers import Activation
from mmptm.encoders.multilingual import MultilingualEncoder
from mmptm.registry import register_encoder


@register_encoder("multilingual_text")
class MultilingualTextTower(nn.Module):
    """``multilingual_encoder`` -> mean of the non-padding states -> linear projection to ``embed_dim``.

    Args:
        embed_dim: joint embedding size (filled in from the model).
        vocab_size / pad_id / eot_id: from the tokenizer (filled in at run time).
        width / layers / heads / mlp_ratio / max_positions / act / norm_first / layer_norm_eps /
            position_offset / dropout: the encoder's, as ``multilingual_encoder``'s.
    """

    input_key = "text"

    def __init__(
        self,
        embed_dim: int,
        vocab_size: int,
        width: int = 256,
        layers: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        max_positions: int = 256,
        act: Activation = "gelu",
        norm_first: bool = True,
        layer_norm_eps: float | None = None,
        position_offset: int = 0,
        dropout: float = 0.0,
        pad_id: int = 0,
        eot_id: int = 3,
    ) -> None:
        super().__init__()
        self.encoder = MultilingualEncoder(
            width, layers, heads, mlp_ratio, max_positions, language_embeddings=False, act=act,
            norm_first=norm_first, layer_norm_eps=layer_norm_eps, position_offset=position_offset,
            dropout=dropout, vocab_size=vocab_size, pad_id=pad_id, eot_id=eot_id,
        )
        self.text_projection = nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)

    @property
    def pretrained_encoder(self) -> nn.Module:
        """What a ``multilingual_encoder`` checkpoint loads into (the projection is new, as in M-CLIP)."""
        return self.encoder

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """Unnormalised features ``[B, embed_dim]`` of token ids ``[B, L]``."""
        return self.encoder.encode_text(text) @ self.text_projection
