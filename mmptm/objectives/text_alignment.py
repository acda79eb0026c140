"""Cross-lingual alignment of a dual encoder's text tower: translations as contrastive pairs.

A CLIP text tower learns a language from image captions; a language without
captions stays unaligned. This objective reads parallel text and treats each
sentence and its translation as a positive pair among the batch's other
translations, through the very ``encode_text`` (tower and projection) that the
zero-shot classifier uses: the translation-ranking loss of Yang et al. 2019
("Improving Multilingual Sentence Embedding using Bi-directional Dual Encoder
with Additive Margin Softmax", sec. 3), here CLIP's symmetric InfoNCE (Radford
et al. 2021, sec. 2.3) with sentences on both sides. Mixed with the image-text
contrastive loss over a shared text tower, it carries zero-shot classification
to languages that never appear with an image (cf. M-CLIP, Carlsson et al. 2022;
AltCLIP, Chen et al. 2022, sec. 3).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmptm.objectives.contrastive import clip_contrastive_loss, contrastive_labels, retrieval_accuracy
from mmptm.objectives.mlm import check_pair_batch
from mmptm.registry import register_objective


def encode_pair_sides(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-length text embeddings ``[B, D]`` of both sides of a tokenised ``parallel_text`` batch.

    One forward pass over both sides (through a DDP-wrapped model's own ``forward``,
    so gradients are synchronised): ``model(text=...)["text_features"]``. Both sides are rows
    of the tokenizer's context length.
    """
    src, tgt = batch["src_tokens"], batch["tgt_tokens"]
    features = model(text=torch.cat([src, tgt]))["text_features"]
    return features[: len(src)], features[len(src):]


@register_objective("text_alignment")
class TextAlignment(nn.Module):
    """In-batch contrastive loss between translation pairs through a dual encoder's text tower.

    Reads ``parallel_text`` batches with ``tokenize: true``; the model is any dual encoder with
    open_clip's interface (``forward(text=...)`` returning unit-length ``text_features``), e.g.
    ``clip``. In a multi-process run the candidates are every rank's pairs.

    Args:
        scale: the fixed inverse temperature of the similarities (the paper's ``exp(t)``); a fixed
            value keeps this objective from moving the image-text temperature ``logit_scale``.
        detach_source: stop the gradient through the source side (English in the demo corpus), so
            that the sentences the images anchor stay put and only the translations move to them.
    """

    def __init__(self, scale: float = 20.0, detach_source: bool = False) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"text_alignment: scale must be > 0, got {scale}")
        self.scale = scale
        self.detach_source = detach_source

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Returns ``loss``, ``acc`` (source -> translation retrieval top-1 in the batch) and ``cosine``
        (mean similarity of the translation pairs)."""
        check_pair_batch(batch, "text_alignment")
        if len(batch["src_tokens"]) < 2:
            raise ValueError("text_alignment needs batches of at least 2 pairs (the other pairs are the negatives)")
        source, target = encode_pair_sides(model, batch)
        if self.detach_source:
            source = source.detach()
        scale = torch.tensor(self.scale, device=source.device)
        labels = contrastive_labels(len(source), source.device, local_loss=False)
        loss, logits, _ = clip_contrastive_loss(source.float(), target.float(), scale, labels=labels)
        return {
            "loss": loss,
            "acc": retrieval_accuracy(logits, labels),
            "cosine": (source * target).sum(dim=-1).mean().detach(),
        }
