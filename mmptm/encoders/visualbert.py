"""VisualBERT: one BERT encoder over ``[CLS] text [SEP]`` followed by the visual tokens.

Li et al. 2019, "VisualBERT: A Simple and Performant Baseline for Vision and
Language", sec. 3.1-3.2: text and visual tokens are embedded into one sequence
(visual tokens: a projection of their features plus a segment embedding and a
position embedding) and encoded jointly by a BERT; heads predict masked words
(MLM with the image as context) and whether a caption matches the image
(sentence-image prediction, here the ``itm`` objective). The embedding layout is
Hugging Face's ``VisualBertModel`` (visual tokens take segment 1 and position 0);
``box_positions`` adds ViLBERT's box-location embedding (Lu et al. 2019, sec. 3.2)
so that patch, grid and region tokens know where they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmptm.encoders.bert import BertLayer, BertPooler, run_layer
from mmptm.encoders.fusion import FusionModel
from mmptm.encoders.visual_inputs import BoxEmbedding, VisualInputs
from mmptm.registry import register_model

# Segment ids: text is sentence A, the visual tokens are segment 1 (Li et al. 2019, sec. 3.1).
TEXT_SEGMENT, VISUAL_SEGMENT = 0, 1


@register_model("visualbert")
class VisualBert(FusionModel):
    """The single-stream VisualBERT (Li et al. 2019), with visual tokens from pixels or region features.

    Args:
        width: hidden width of the BERT encoder.
        layers: encoder layers.
        heads: attention heads.
        mlp_ratio: feed-forward width as a multiple of ``width``.
        dropout: dropout probability (BERT: 0.1).
        init_std: standard deviation of the initial weights (BERT: 0.02), see :meth:`FusionModel.init_weights`.
        max_text_length: text positions (BERT: 512).
        box_positions: add the box-location embedding to the visual tokens.
        options: the options every fusion model takes (``vision``, ``freeze_vision``, ``visual_dim``,
            ``region_classes`` and the tokenizer's ids), see :class:`~mmptm.encoders.fusion.FusionModel`.
    """

    def __init__(
        self,
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        max_text_length: int = 512,
        box_positions: bool = True,
        init_std: float = 0.02,
        **options: Any,
    ) -> None:
        super().__init__(width, width, max_text_length, dropout, **options)
        if layers < 1:
            raise ValueError(f"'layers' must be at least 1, got {layers}")
        self.visual_projection = nn.Linear(self.visual_dim, width)
        self.visual_token_type_embeddings = nn.Embedding(2, width)
        self.visual_position_embeddings = nn.Embedding(max_text_length, width)
        self.box_embedding = BoxEmbedding(width) if box_positions else None
        self.layers = nn.ModuleList(BertLayer(width, heads, mlp_ratio, dropout) for _ in range(layers))
        self.pooler = BertPooler(width)
        self.itm_head = nn.Linear(width, 2)
        self.init_weights(init_std)

    def embed(self, text: torch.Tensor, visual: VisualInputs) -> torch.Tensor:
        """The joint input sequence ``[P, L + N, width]`` (Li et al. 2019, sec. 3.1)."""
        text_embeddings = self.embeddings.sum(text, TEXT_SEGMENT)
        visual_embeddings = (
            self.visual_projection(visual.features)
            + self.visual_token_type_embeddings.weight[VISUAL_SEGMENT]
            + self.visual_position_embeddings.weight[0]
        )
        if self.box_embedding is not None:
            visual_embeddings = visual_embeddings + self.box_embedding(visual.boxes)
        joint = torch.cat([text_embeddings, visual_embeddings.to(text_embeddings.dtype)], dim=1)
        return self.embeddings.dropout(self.embeddings.norm(joint))

    def fuse(
        self, text: torch.Tensor, visual: VisualInputs, text_layers: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """Encode the joint sequence; split it back into text and visual states; pool ``[CLS]`` for ITM."""
        length = text.shape[1]
        mask = torch.cat([self.text_keep(text), visual.mask], dim=1)
        x = self.embed(text, visual)
        history = [x[:, :length]] if text_layers else []
        for layer in self.layers:
            x = run_layer(layer, self.grad_checkpointing, x, mask)
            if text_layers:
                history.append(x[:, :length])
        return x[:, :length], x[:, length:], self.itm_head(self.pooler(x)), tuple(history)
