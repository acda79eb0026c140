"""Masked language modelling with the image as context, for the fusion models (VisualBERT, ViLBERT).

Li et al. 2019 (VisualBERT), sec. 3.2 task 1 and Lu et al. 2019 (ViLBERT),
sec. 3.2: words of the caption are masked with BERT's 80/10/10 scheme
(:func:`mmptm.objectives.masking.bert_mask`) while the visual tokens stay
intact, and the model predicts the masked words from the rest of the caption
and the image.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmptm.encoders.fusion import FusionModel, fusion_model, visual_batch
from mmptm.objectives.masking import IGNORE_INDEX, bert_mask
from mmptm.registry import register_objective


def mask_caption_tokens(
    model: FusionModel, tokens: torch.Tensor, mask_prob: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-mask caption tokens with the ids the model was built with (its tokenizer's).

    Args:
        model: the fusion model (its ``mask_id``, ``vocab_size`` and special ids).
        tokens: ``[B, L]`` caption ids.
        mask_prob: share of each caption's tokens to predict.
        generator: the random source (None: torch's global one).

    Returns:
        ``(inputs, labels)`` as :func:`~mmptm.objectives.masking.bert_mask`.

    Raises:
        ValueError: the tokenizer has no mask token.
    """
    if model.mask_id is None:
        raise ValueError(
            "masked language modelling needs a tokenizer with a <mask> piece (mask_id); tokenizer.path names one "
            "without it: retrain it with `mmptm tokenizer train` (which adds <mask>)"
        )
    special = [i for i in (model.pad_id, model.bos_id, model.eot_id) if i is not None]
    return bert_mask(
        tokens, mask_id=model.mask_id, vocab_size=model.vocab_size, special_ids=special, mask_prob=mask_prob,
        generator=generator,
    )


def masked_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and top-1 accuracy over the predicted positions (labels other than -100).

    Args:
        logits: ``[..., vocab_size]``.
        labels: ``[...]`` targets, ``IGNORE_INDEX`` where nothing is predicted.

    Returns:
        ``(loss, accuracy)`` scalars (0 for a batch without predicted positions).
    """
    chosen = labels != IGNORE_INDEX
    if not chosen.any():
        zero = logits.sum() * 0.0  # keeps the graph, so that every rank back-propagates
        return zero, zero.detach()
    selected, targets = logits[chosen].float(), labels[chosen]
    loss = F.cross_entropy(selected, targets)
    accuracy = (selected.detach().argmax(dim=-1) == targets).float().mean()
    return loss, accuracy


@register_objective("vl_mlm")
class VisionLanguageMLM(nn.Module):
    """Masked language modelling conditioned on the image (Li et al. 2019, sec. 3.2; Lu et al. 2019, sec. 3.2).

    Reads batches with ``"text"`` and the model's visual input (``"image"``, or region features).

    Args:
        mask_prob: share of each caption's tokens predicted (BERT: 0.15).
    """

    def __init__(self, mask_prob: float = 0.15) -> None:
        super().__init__()
        if not 0 < mask_prob <= 1:
            raise ValueError(f"vl_mlm: mask_prob must be in (0, 1], got {mask_prob}")
        self.mask_prob = mask_prob

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Mask the captions, predict them with the image as context.

        Returns:
            ``loss`` and ``accuracy`` (top-1 over the masked tokens).
        """
        inputs, labels = mask_caption_tokens(fusion_model(model), batch["text"], self.mask_prob)
        out = model(inputs, **visual_batch(model, batch), mlm=True)
        loss, accuracy = masked_token_loss(out.mlm_logits, labels)
        return {"loss": loss, "accuracy": accuracy}
