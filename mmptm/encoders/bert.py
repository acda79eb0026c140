"""BERT's post-norm transformer pieces, shared by the fusion models (VisualBERT, ViLBERT).

Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for
Language Understanding", sec. 3 (after Vaswani et al. 2017): each sub-layer is
``LayerNorm(x + Dropout(sublayer(x)))``. VisualBERT (Li et al. 2019, sec. 3.1)
and ViLBERT (Lu et al. 2019, sec. 3.1) are initialised from and shaped like
BERT, so their layers are these. :class:`BertAttention` also attends from one
sequence to another of a different width (ViLBERT's co-attention). Attention is
computed by ``torch.nn.functional.scaled_dot_product_attention``. The module
layout mirrors Hugging Face's BERT-family layers one to one (``query``, ``key``,
``value``, output ``dense`` + ``LayerNorm``; FFN ``intermediate`` + ``output``),
so their checkpoints map onto these parameters by renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmptm.encoders.layers import checkpoint_in_forward_modes

# BERT's LayerNorm epsilon (Hugging Face's ``layer_norm_eps`` default).
BERT_LAYER_NORM_EPS = 1e-12


class BertAttention(nn.Module):
    """Multi-head attention with a post-norm residual: ``norm(x + dropout(out(attend(x, context))))``.

    Args:
        width: width of the query sequence ``x`` (and of the output).
        heads: attention heads; must divide ``attention_width``.
        context_width: width of the key/value sequence (None: ``width``, self-attention).
        attention_width: width of queries, keys and values inside the attention (None: ``width``);
            ViLBERT's co-attention uses one width for both directions between streams of different widths.
        dropout: dropout on the attention weights and the output.
        eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        context_width: int | None = None,
        attention_width: int | None = None,
        dropout: float = 0.1,
        eps: float = BERT_LAYER_NORM_EPS,
    ) -> None:
        super().__init__()
        attention_width = attention_width or width
        context_width = context_width or width
        if heads < 1 or attention_width % heads:
            raise ValueError(f"the attention width ({attention_width}) must be divisible by 'heads' ({heads})")
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(width, attention_width)
        self.key = nn.Linear(context_width, attention_width)
        self.value = nn.Linear(context_width, attention_width)
        self.dense = nn.Linear(attention_width, width)
        self.norm = nn.LayerNorm(width, eps=eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, L, W] -> [B, heads, L, W / heads]

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attend from ``x`` to ``context`` (or to ``x`` itself).

        Args:
            x: ``[B, L, width]`` queries.
            mask: ``[B, M]`` bool over the keys, True where attention is allowed (padding False).
            context: ``[B, M, context_width]`` keys and values; None: ``x``.

        Returns:
            ``[B, L, width]``.
        """
        source = x if context is None else context
        q, k, v = self._heads(self.query(x)), self._heads(self.key(source)), self._heads(self.value(source))
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        out = self.dense(out.transpose(1, 2).flatten(2))
        return self.norm(x + F.dropout(out, self.dropout, self.training))


class BertFeedForward(nn.Module):
    """BERT's feed-forward sub-layer: ``norm(x + dropout(output(gelu(intermediate(x)))))``.

    Args:
        width: input and output width.
        hidden: hidden width (BERT: ``4 * width``).
        dropout: output dropout.
        eps: LayerNorm epsilon.
    """

    def __init__(self, width: int, hidden: int, dropout: float = 0.1, eps: float = BERT_LAYER_NORM_EPS) -> None:
        super().__init__()
        self.dropout = dropout
        self.intermediate = nn.Linear(width, hidden)
        self.output = nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, width] -> [B, L, width]``."""
        out = self.output(F.gelu(self.intermediate(x)))
        return self.norm(x + F.dropout(out, self.dropout, self.training))


class BertLayer(nn.Module):
    """A BERT encoder layer: self-attention then feed-forward, both post-norm.

    Args:
        width: model width.
        heads: attention heads.
        mlp_ratio: feed-forward hidden width as a multiple of ``width``.
        dropout: dropout probability.
        eps: LayerNorm epsilon.
    """

    def __init__(
        self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.1, eps: float = BERT_LAYER_NORM_EPS
    ) -> None:
        super().__init__()
        self.attention = BertAttention(width, heads, dropout=dropout, eps=eps)
        self.ffn = BertFeedForward(width, int(width * mlp_ratio), dropout, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, L, width] -> [B, L, width]``; ``mask`` as in :class:`BertAttention`."""
        return self.ffn(self.attention(x, mask))


def run_layer(layer: nn.Module, grad_checkpointing: bool, *args: torch.Tensor | None) -> torch.Tensor:
    """``layer(*args)``, recomputed in backward when ``grad_checkpointing`` and gradients are on."""
    if grad_checkpointing and torch.is_grad_enabled():
        return checkpoint_in_forward_modes(layer, *args)
    return layer(*args)


class BertEmbeddings(nn.Module):
    """BERT's input embeddings of token ids: word + position + segment, then LayerNorm and dropout.

    Args:
        vocab_size: number of token ids.
        width: embedding width.
        max_positions: longest sequence.
        segments: number of segment (token type) ids.
        pad_id: the padding id (its embedding starts at zero and gets no gradient, as Hugging Face's
            ``padding_idx``); None: no such id (a tokenizer whose pad id is also a symbol).
        dropout: dropout probability.
        eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        vocab_size: int,
        width: int,
        max_positions: int = 512,
        segments: int = 2,
        pad_id: int | None = 0,
        dropout: float = 0.1,
        eps: float = BERT_LAYER_NORM_EPS,
    ) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.position_embeddings = nn.Embedding(max_positions, width)
        self.token_type_embeddings = nn.Embedding(segments, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def sum(self, tokens: torch.Tensor, segment: int = 0) -> torch.Tensor:
        """Word + position + segment embeddings of ``[B, L]`` ids, before the LayerNorm: ``[B, L, width]``."""
        length = tokens.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"text of {length} tokens is longer than the model's {self.position_embeddings.num_embeddings} "
                "positions (max_text_length)"
            )
        positions = torch.arange(length, device=tokens.device)
        return (
            self.word_embeddings(tokens)
            + self.position_embeddings(positions)
            + self.token_type_embeddings.weight[segment]
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` ids -> normalised embeddings ``[B, L, width]``."""
        return self.dropout(self.norm(self.sum(tokens)))


class BertPooler(nn.Module):
    """BERT's pooler: ``act(dense(x[:, 0]))`` of the first token (tanh in BERT, ReLU in ViLBERT's image stream).

    Args:
        width: input width.
        out_width: output width (None: ``width``).
        act: ``"tanh"`` or ``"relu"``.
    """

    def __init__(self, width: int, out_width: int | None = None, act: str = "tanh") -> None:
        super().__init__()
        if act not in ("tanh", "relu"):
            raise ValueError(f"pooler act must be 'tanh' or 'relu', got {act!r}")
        self.dense = nn.Linear(width, out_width or width)
        self.act = torch.tanh if act == "tanh" else F.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, L, width] -> [B, out_width]``."""
        return self.act(self.dense(x[:, 0]))


class MaskedLMHead(nn.Module):
    """BERT's MLM head: ``norm(gelu(dense(x)))`` projected onto the word embeddings (tied weights) plus a bias.

    Devlin et al. 2019, sec. 3.1 and appendix A.2 (Hugging Face's ``BertLMPredictionHead``). The
    tied weight is passed at call time rather than held, so that checkpoints store it once.

    Args:
        width: hidden width.
        vocab_size: number of token ids.
        eps: LayerNorm epsilon.
    """

    def __init__(self, width: int, vocab_size: int, eps: float = BERT_LAYER_NORM_EPS) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """``[..., width]`` -> vocabulary logits ``[..., vocab_size]``; ``word_embeddings``: ``[vocab_size, width]``."""
        return F.linear(self.norm(F.gelu(self.dense(x))), word_embeddings, self.bias)


class RegionHead(nn.Module):
    """The masked-region-modelling head: a BERT transform then a linear output per visual token.

    Lu et al. 2019, sec. 3.2 (ViLBERT's image prediction head); one instance regresses
    features, another classifies region targets.

    Args:
        width: hidden width of the visual stream.
        out_features: output size (the feature dimension, or the number of classes).
        eps: LayerNorm epsilon.
    """

    def __init__(self, width: int, out_features: int, eps: float = BERT_LAYER_NORM_EPS) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.out = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., width] -> [..., out_features]``."""
        return self.out(self.norm(F.gelu(self.dense(x))))
