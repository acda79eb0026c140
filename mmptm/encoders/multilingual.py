"""A bidirectional transformer encoder for multilingual masked language modelling (mBERT / XLM / Unicoder).

Lample & Conneau 2019, "Cross-lingual Language Model Pretraining", sec. 3 and
Fig. 1: token + learned position embeddings, plus (optionally) a learned
embedding of each token's language; a bidirectional transformer; an MLM head
tied to the token embeddings. XLM-R (Conneau et al. 2020) drops the language
embeddings (``language_embeddings=False``). The blocks are the pre-norm
SDPA blocks of :mod:`mmptm.encoders.layers` with a final LayerNorm; padding is
masked out of attention. ``norm_first=False`` builds RoBERTa's layout instead,
that of XLM-R (Conneau et al. 2020, sec. 2, after Liu et al. 2019 and Devlin et
al. 2019, sec. 3): a LayerNorm over the summed embeddings, post-norm BERT
layers (:mod:`mmptm.encoders.bert`), no final norm; with ``position_offset=2``
(fairseq's first position id) and ``layer_norm_eps=1e-5`` it computes a Hugging
Face ``XLMRobertaModel``'s states, so imported XLM-R checkpoints
(:mod:`mmptm.interop.xlmr`) continue pretraining with every objective here.
``encode_text`` mean-pools the states of the non-padding tokens, the sentence
representation of cross-lingual retrieval (Hu et al. 2020, XTREME, sec. 3.3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmptm.encoders.bert import BERT_LAYER_NORM_EPS, BertLayer, MaskedLMHead, run_layer
from mmptm.encoders.layers import Activation, Dropouts, Transformer, check_probability, dropout
from mmptm.registry import register_model


@register_model("multilingual_encoder")
class MultilingualEncoder(nn.Module):
    """Token, position and language embeddings -> bidirectional transformer -> states and MLM logits.

    Args:
        width: model width.
        layers: transformer blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden size as a multiple of ``width``.
        max_positions: learned positions (TLM pairs need two sentences' worth).
        languages: the language codes, in embedding order; a batch naming another is an error.
        language_embeddings: add a learned language embedding to every token (XLM); False: XLM-R.
        act: the MLP activation (post-norm layers: ``gelu`` only, BERT's exact GELU).
        norm_first: pre-norm blocks and a final LayerNorm (True); False: RoBERTa's / XLM-R's
            LayerNorm over the embeddings and post-norm BERT layers, without a final norm.
        layer_norm_eps: epsilon of every LayerNorm (XLM-R: 1e-5); None: PyTorch's 1e-5, except
            BERT's 1e-12 in the MLM head.
        position_offset: position id of the first token, so ``max_positions - position_offset`` tokens
            fit (fairseq's RoBERTa / XLM-R: 2, its padding id + 1). Positions passed to
            :meth:`forward` count from 0 and are shifted by it, so TLM's restart at the translation
            restarts at the offset too.
        dropout: in training, dropout on the embeddings (normalised, in post-norm models) and on every
            sub-layer's output before its residual sum (XLM-R trained with 0.1); post-norm layers also
            drop attention probabilities with it, as BERT. Default 0: none.
        vocab_size / pad_id / eot_id / bos_id / mask_id: from the tokenizer (filled at run time).
    """

    def __init__(
        self,
        width: int = 256,
        layers: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        max_positions: int = 256,
        languages: list[str] | None = None,
        language_embeddings: bool = True,
        act: Activation = "gelu",
        norm_first: bool = True,
        layer_norm_eps: float | None = None,
        position_offset: int = 0,
        dropout: float = 0.0,
        vocab_size: int = 8000,
        pad_id: int = 0,
        eot_id: int = 3,
        bos_id: int = 2,
        mask_id: int | None = None,
    ) -> None:
        super().__init__()
        self.languages = list(languages or [])
        if language_embeddings and not self.languages:
            raise ValueError("multilingual_encoder: language_embeddings=True needs the model's 'languages'")
        check_probability("multilingual_encoder: dropout", dropout)
        if not 0 <= position_offset < max_positions:
            raise ValueError(
                f"multilingual_encoder: position_offset {position_offset} must be in 0..{max_positions - 1}"
            )
        if not norm_first and act != "gelu":
            raise ValueError(f"multilingual_encoder: act {act!r} needs norm_first=true (BERT layers use 'gelu')")
        self.width = width
        self.dropout = dropout
        self.norm_first = norm_first
        self.position_offset = position_offset
        self.vocab_size = vocab_size
        self.pad_id, self.eos_id, self.bos_id, self.mask_id = pad_id, eot_id, bos_id, mask_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_positions, width)
        self.language_embedding = nn.Embedding(len(self.languages), width) if language_embeddings else None
        eps = 1e-5 if layer_norm_eps is None else layer_norm_eps
        if norm_first:
            self.transformer = Transformer(width, layers, heads, mlp_ratio, act, Dropouts(dropout))
            if layer_norm_eps is not None:  # layers.py builds its norms with PyTorch's default eps
                for module in self.transformer.modules():
                    if isinstance(module, nn.LayerNorm):
                        module.eps = eps
            self.ln_final = nn.LayerNorm(width, eps=eps)
        else:
            self.embedding_norm = nn.LayerNorm(width, eps=eps)
            self.layers = nn.ModuleList(BertLayer(width, heads, mlp_ratio, dropout, eps) for _ in range(layers))
            self.grad_checkpointing = False
        self.mlm_head = MaskedLMHead(width, vocab_size, BERT_LAYER_NORM_EPS if layer_norm_eps is None else eps)
        # The Unicoder heads (Huang et al. 2019, sec. 3): sized by the width, so they live with the model.
        self.word_recovery = TrilinearAttention(width)
        self.pair_classifier = nn.Linear(width, 1)
        for embedding in (self.token_embedding, self.position_embedding, self.language_embedding):
            if embedding is not None:
                nn.init.normal_(embedding.weight, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if self.norm_first:
            self.transformer.grad_checkpointing = enable
        else:
            self.grad_checkpointing = enable

    def language_ids(self, languages: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """``LongTensor[len(languages)]``: the embedding index of each language code.

        Without language embeddings every language maps to 0 (the ids are then unused).

        Raises:
            ValueError: a code the model has no embedding for.
        """
        if self.language_embedding is None:
            return torch.zeros(len(languages), dtype=torch.long, device=device)
        try:
            return torch.tensor([self.languages.index(lang) for lang in languages], dtype=torch.long, device=device)
        except ValueError:
            unknown = sorted(set(languages) - set(self.languages))
            raise ValueError(f"languages {unknown} are not among the model's languages {self.languages}") from None

    def forward(
        self,
        tokens: torch.Tensor,
        languages: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        layer: int | None = None,
    ) -> torch.Tensor:
        """Hidden states of a batch.

        Args:
            tokens: ``LongTensor[B, L]``; ``pad_id`` positions are masked out of attention.
            languages: language index per sequence ``[B]`` or per token ``[B, L]`` (ignored without
                language embeddings; required with them).
            positions: position ids ``[B, L]`` counted from 0 (default ``0..L-1``; TLM restarts them at the
                second sentence); the model adds ``position_offset``.
            inputs_embeds: token embeddings ``[B, L, width]`` to use instead of looking ``tokens`` up
                (CLWR's re-expressed sentences); ``tokens`` still gives the padding mask.
            layer: return the states after this many blocks (None: all, with the final norm of pre-norm blocks).

        Returns:
            ``[B, L, width]``.
        """
        batch, length = tokens.shape
        if positions is None:
            positions = torch.arange(length, device=tokens.device).expand(batch, length)
        x = self.token_embedding(tokens) if inputs_embeds is None else inputs_embeds
        x = x + self.position_embedding(positions + self.position_offset)
        if self.language_embedding is not None:
            if languages is None:
                raise ValueError("this model has language embeddings: pass the languages of the batch")
            x = x + self.language_embedding(languages if languages.dim() == 2 else languages[:, None])
        keep = tokens != self.pad_id
        if not self.norm_first:
            x = dropout(self.embedding_norm(x), self.dropout, self.training)
            for block in self.layers[:layer]:
                x = run_layer(block, self.grad_checkpointing, x, keep)
            return x
        x = dropout(x, self.dropout, self.training)
        if layer is None:
            return self.ln_final(self.transformer(x, attn_mask=keep))
        for block in self.transformer.resblocks[:layer]:
            x = block(x, attn_mask=keep)
        return x

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits ``[..., vocab_size]`` of hidden states, by the head tied to the token embeddings."""
        return self.mlm_head(hidden, self.token_embedding.weight)

    def encode_text(
        self,
        tokens: torch.Tensor,
        normalize: bool = False,
        languages: torch.Tensor | None = None,
        layer: int | None = None,
    ) -> torch.Tensor:
        """Mean of the non-padding token states: a sentence embedding ``[B, width]``.

        Args:
            tokens: ``LongTensor[B, L]``.
            normalize: L2-normalise the embeddings.
            languages: ``[B]`` language indices (needed with language embeddings).
            layer: pool the states after this many blocks (None: the final states).
        """
        hidden = self(tokens, languages=languages, layer=layer)
        embedding = mean_pool(hidden, tokens != self.pad_id)
        return F.normalize(embedding, dim=-1) if normalize else embedding


class TrilinearAttention(nn.Module):
    """CLWR's attention of source words over target words (Huang et al. 2019, Unicoder, sec. 3.1).

    ``A_ij = W [x_i, y_j, x_i ⊙ y_j]`` (a trilinear function, as in Seo et al. 2017, BiDAF);
    each source word is re-expressed as ``sum_j softmax_j(A_ij) y_j``.

    Args:
        width: embedding width.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3, width))

    def forward(self, source: torch.Tensor, target: torch.Tensor, target_keep: torch.Tensor) -> torch.Tensor:
        """Re-express ``source [B, M, D]`` with ``target [B, N, D]`` (``target_keep [B, N]``: the real words).

        Returns:
            ``[B, M, D]``.
        """
        scores = (
            (source @ self.weight[0])[:, :, None]
            + (target @ self.weight[1])[:, None, :]
            + (source * self.weight[2]) @ target.transpose(1, 2)
        )
        scores = scores.masked_fill(~target_keep[:, None, :], float("-inf"))
        return scores.softmax(dim=-1) @ target


def mean_pool(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden [B, L, D]`` over the positions where ``keep [B, L]`` is True -> ``[B, D]``."""
    weights = keep.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
