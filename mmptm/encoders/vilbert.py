"""ViLBERT: a text stream and a visual stream joined by co-attentional transformer layers.

Lu et al. 2019, "ViLBERT: Pretraining Task-Agnostic Visiolinguistic
Representations for Vision-and-Language Tasks", sec. 3.1-3.2. Each stream is a
BERT of its own width and depth; a co-attention layer lets each stream attend to
the other (queries from one stream, keys and values from the other, Fig. 2b),
followed by each stream's feed-forward sub-layer. As in the paper's code, the
co-attention layers are placed by ``text_coattention_ids`` /
``visual_coattention_ids``: co-attention layer k runs once the text stream has
run its first ``text_coattention_ids[k]`` layers and the visual stream its first
``visual_coattention_ids[k]``. The visual sequence starts with an ``[IMG]`` token,
the mean of the visual features with a whole-image box (sec. 3.2); a visual
token's box location (5-d) is embedded and added to its feature. Matching is
predicted from the element-wise product of the pooled ``[CLS]`` and ``[IMG]``
outputs (sec. 3.2, "multimodal alignment prediction").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmptm.encoders.bert import BertAttention, BertFeedForward, BertLayer, BertPooler, run_layer
from mmptm.encoders.fusion import FusionModel
from mmptm.encoders.visual_inputs import BoxEmbedding, VisualInputs, grid_boxes
from mmptm.registry import register_model


class CoAttentionLayer(nn.Module):
    """A co-attentional transformer layer (Lu et al. 2019, sec. 3.1, Fig. 2b).

    Both streams attend to the other's input of this layer (queries from their own
    stream, keys and values from the other, in an attention of width ``width``), then
    go through their own feed-forward sub-layer; all sub-layers are post-norm residual.

    Args:
        text_width: width of the text stream.
        visual_width: width of the visual stream.
        width: width of the co-attention (queries, keys, values).
        heads: co-attention heads.
        text_hidden: feed-forward width of the text stream.
        visual_hidden: feed-forward width of the visual stream.
        dropout: dropout probability.
    """

    def __init__(
        self, text_width: int, visual_width: int, width: int, heads: int, text_hidden: int, visual_hidden: int,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.text_attention = BertAttention(text_width, heads, visual_width, width, dropout)
        self.visual_attention = BertAttention(visual_width, heads, text_width, width, dropout)
        self.text_ffn = BertFeedForward(text_width, text_hidden, dropout)
        self.visual_ffn = BertFeedForward(visual_width, visual_hidden, dropout)

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor, visual: torch.Tensor, visual_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, L, text_width], [B, N, visual_width])`` -> the same shapes; masks True on real tokens."""
        attended_text = self.text_attention(text, visual_mask, context=visual)
        attended_visual = self.visual_attention(visual, text_mask, context=text)
        return self.text_ffn(attended_text), self.visual_ffn(attended_visual)


def check_coattention_ids(ids: list[int], layers: int, field: str) -> None:
    """Raise a ValueError naming ``field`` unless ``ids`` are non-decreasing layer counts in ``[0, layers]``."""
    if any(not 0 <= i <= layers for i in ids) or any(a > b for a, b in zip(ids, ids[1:], strict=False)):
        raise ValueError(f"model.{field} must be non-decreasing layer counts between 0 and {layers}, got {ids}")


@register_model("vilbert")
class ViLBert(FusionModel):
    """The two-stream ViLBERT (Lu et al. 2019) with visual tokens from pixels or region features.

    Args:
        text_width / text_layers / text_heads: the text stream's BERT (BERT-base: 768, 12, 12).
        visual_width / visual_layers / visual_heads: the visual stream (the paper: 1024, 6, 8).
        coattention_width / coattention_heads: the co-attention layers' attention (the paper: 1024, 8).
        text_coattention_ids: co-attention layer k follows the first ``text_coattention_ids[k]`` text
            layers (the paper: 6, 7, ..., 11).
        visual_coattention_ids: co-attention layer k follows the first ``visual_coattention_ids[k]``
            visual layers (the paper: 0, 1, ..., 5); as many as ``text_coattention_ids``.
        mlp_ratio: feed-forward width of the text stream as a multiple of ``text_width``.
        visual_mlp_ratio: feed-forward width of the visual stream as a multiple of ``visual_width``
            (the paper: 1).
        dropout: dropout probability.
        init_std: standard deviation of the initial weights (BERT: 0.02), see :meth:`FusionModel.init_weights`.
        max_text_length: text positions.
        visual_dim: feature size of a visual token (the tower's output, or the regions' D; the paper: 2048).
        options: the options every fusion model takes (``vision``, ``freeze_vision``, ``region_classes``
            and the tokenizer's ids), see :class:`~mmptm.encoders.fusion.FusionModel`.
    """

    def __init__(
        self,
        text_width: int = 768,
        text_layers: int = 12,
        text_heads: int = 12,
        visual_width: int = 1024,
        visual_layers: int = 6,
        visual_heads: int = 8,
        coattention_width: int = 1024,
        coattention_heads: int = 8,
        text_coattention_ids: list[int] = [6, 7, 8, 9, 10, 11],  # noqa: B006 (read-only)
        visual_coattention_ids: list[int] = [0, 1, 2, 3, 4, 5],  # noqa: B006 (read-only)
        mlp_ratio: float = 4.0,
        visual_mlp_ratio: float = 1.0,
        dropout: float = 0.1,
        max_text_length: int = 512,
        init_std: float = 0.02,
        visual_dim: int = 2048,
        **options: Any,
    ) -> None:
        super().__init__(text_width, visual_width, max_text_length, dropout, visual_dim=visual_dim, **options)
        if len(text_coattention_ids) != len(visual_coattention_ids) or not text_coattention_ids:
            raise ValueError(
                "model.text_coattention_ids and model.visual_coattention_ids must be non-empty and of the same "
                f"length (one entry per co-attention layer), got {text_coattention_ids} and {visual_coattention_ids}"
            )
        check_coattention_ids(text_coattention_ids, text_layers, "text_coattention_ids")
        check_coattention_ids(visual_coattention_ids, visual_layers, "visual_coattention_ids")
        self.text_coattention_ids = list(text_coattention_ids)
        self.visual_coattention_ids = list(visual_coattention_ids)
        text_hidden, visual_hidden = int(text_width * mlp_ratio), int(visual_width * visual_mlp_ratio)
        self.image_embeddings = nn.Linear(self.visual_dim, visual_width)
        self.box_embedding = BoxEmbedding(visual_width)
        self.visual_norm = nn.LayerNorm(visual_width, eps=self.embeddings.norm.eps)
        self.text_layers = nn.ModuleList(
            BertLayer(text_width, text_heads, mlp_ratio, dropout) for _ in range(text_layers)
        )
        self.visual_layers = nn.ModuleList(
            BertLayer(visual_width, visual_heads, visual_mlp_ratio, dropout) for _ in range(visual_layers)
        )
        self.coattention_layers = nn.ModuleList(
            CoAttentionLayer(text_width, visual_width, coattention_width, coattention_heads, text_hidden,
                             visual_hidden, dropout)
            for _ in text_coattention_ids
        )
        self.text_pooler = BertPooler(text_width, coattention_width, act="relu")
        self.visual_pooler = BertPooler(visual_width, coattention_width, act="relu")
        self.itm_head = nn.Linear(coattention_width, 2)
        self.init_weights(init_std)

    def embed_visual(self, visual: VisualInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """``[IMG]`` + the visual tokens, embedded: ``([P, 1 + N, visual_width], mask [P, 1 + N])``."""
        weights = visual.mask[..., None].to(visual.features.dtype)
        mean = (visual.features * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp(min=1)
        features = torch.cat([mean, visual.features], dim=1)
        whole = grid_boxes(1, 1, device=visual.boxes.device).to(visual.boxes.dtype).expand(len(features), 1, 4)
        boxes = torch.cat([whole, visual.boxes], dim=1)
        mask = torch.cat([torch.ones_like(visual.mask[:, :1]), visual.mask], dim=1)
        embedded = self.visual_norm(self.image_embeddings(features) + self.box_embedding(boxes))
        return self.embeddings.dropout(embedded), mask

    def fuse(
        self, text: torch.Tensor, visual: VisualInputs, text_layers: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """Run both streams with their co-attention layers interleaved; drop ``[IMG]`` from the visual states."""
        text_mask = self.text_keep(text)
        t = self.embeddings(text)
        v, visual_mask = self.embed_visual(visual)
        history = [t] if text_layers else []
        done_t = done_v = 0
        checkpointed = self.grad_checkpointing
        for coattention, until_t, until_v in zip(
            self.coattention_layers, self.text_coattention_ids, self.visual_coattention_ids, strict=True
        ):
            for layer in self.text_layers[done_t:until_t]:
                t = run_layer(layer, checkpointed, t, text_mask)
                history += [t] if text_layers else []
            for layer in self.visual_layers[done_v:until_v]:
                v = run_layer(layer, checkpointed, v, visual_mask)
            t, v = run_layer(coattention, checkpointed, t, text_mask, v, visual_mask)
            history += [t] if text_layers else []
            done_t, done_v = until_t, until_v
        for layer in self.text_layers[done_t:]:
            t = run_layer(layer, checkpointed, t, text_mask)
            history += [t] if text_layers else []
        for layer in self.visual_layers[done_v:]:
            v = run_layer(layer, checkpointed, v, visual_mask)
        itm_logits = self.itm_head(self.text_pooler(t) * self.visual_pooler(v))
        return t, v[:, 1:], itm_logits, tuple(history)
