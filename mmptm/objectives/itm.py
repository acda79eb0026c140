"""Image-text matching with random and in-batch hard negatives, for the fusion models.

VisualBERT's sentence-image prediction (Li et al. 2019, sec. 3.2 task 2) and
ViLBERT's multimodal alignment prediction (Lu et al. 2019, sec. 3.2): the model
tells whether a caption describes the image. Every image of the batch is scored
with its own caption (a positive) and with one caption of another sample of the
global batch (a negative): a random one, or, with probability
``hard_fraction``, the one among ``hard_candidates`` random candidates that the
model currently finds the most plausible (in-batch hard negatives as in ALBEF,
Li et al. 2021, sec. 3.2, which ranks candidates by a contrastive similarity; a
fusion model has none, so its own matching score ranks them). A candidate is never
a caption equal to the positive, nor, when the batch carries labels, one of a
sample with the image's label: such captions may well describe the image too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmptm.encoders.fusion import MATCH, MISMATCH, fusion_model, visual_batch
from mmptm.encoders.visual_inputs import VisualInputs
from mmptm.registry import register_objective
from mmptm.training.distributed import gather_features, world_info


def negative_candidates(
    text: torch.Tensor,
    labels: torch.Tensor,
    all_text: torch.Tensor,
    all_labels: torch.Tensor,
    count: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw up to ``count`` distinct negative captions per image, uniformly among the allowed ones.

    Args:
        text: ``[B, L]`` this rank's captions (row i belongs to image i).
        labels: ``[B]`` this rank's sample labels (unique ids when the batch has none).
        all_text: ``[G, L]`` the captions of the global batch.
        all_labels: ``[G]`` their labels.
        count: candidates per image.
        generator: the random source.

    Returns:
        ``(indices [B, k], valid [B, k])``, ``k = min(count, G)``: rows of ``all_text``, in random order,
        and whether each is allowed (an image with fewer allowed captions gets invalid trailing slots).
    """
    same_text = (text[:, None, :] == all_text[None]).all(dim=-1)
    allowed = ~same_text & (labels[:, None] != all_labels[None])
    scores = torch.rand(allowed.shape, generator=generator, device=text.device).masked_fill(~allowed, -1.0)
    top = scores.topk(min(count, all_text.shape[0]), dim=1)
    return top.indices, top.values >= 0


@register_objective("itm")
class ImageTextMatching(nn.Module):
    """Image-text matching: one positive and one (random or hard) negative caption per image.

    Reads ``"text"``, the model's visual input and, if present, ``negative_label_key``.

    Args:
        hard_fraction: share of negatives that are in-batch hard negatives (the rest are random).
        hard_candidates: random candidates the model scores to pick a hard negative.
        negative_label_key: batch entry of per-sample labels; captions of samples with the image's
            label are never its negatives (None, or a batch without it: only equal captions are excluded).
    """

    def __init__(
        self, hard_fraction: float = 0.5, hard_candidates: int = 8, negative_label_key: str | None = "label"
    ) -> None:
        super().__init__()
        if not 0 <= hard_fraction <= 1:
            raise ValueError(f"itm: hard_fraction must be in [0, 1], got {hard_fraction}")
        if hard_candidates < 1:
            raise ValueError(f"itm: hard_candidates must be >= 1, got {hard_candidates}")
        self.hard_fraction = hard_fraction
        self.hard_candidates = hard_candidates
        self.negative_label_key = negative_label_key

    def _labels(self, batch: dict[str, Any], size: int, device: torch.device) -> torch.Tensor:
        """This rank's labels, or ids unique over the global batch."""
        labels = batch.get(self.negative_label_key) if self.negative_label_key else None
        if torch.is_tensor(labels):
            return labels.to(device)
        rank, _ = world_info()
        return -1 - torch.arange(rank * size, (rank + 1) * size, device=device)  # negative: never a real label

    def choose_negatives(
        self, model: nn.Module, batch: dict[str, Any], visual: VisualInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One negative caption per image from the global batch (see the module docstring).

        Returns:
            ``(captions [M, L], images [M])``: the negatives and the index of the image each goes with
            (M < B when some image has no allowed caption in the batch).
        """
        text = batch["text"]
        labels = self._labels(batch, text.shape[0], text.device)
        # Captions (ints, no gradient) of every rank: the negatives come from the global batch.
        all_text, all_labels = gather_features(text, labels, gather_with_grad=False)
        count = self.hard_candidates if self.hard_fraction > 0 else 1
        candidates, valid = negative_candidates(text, labels, all_text, all_labels, count)
        rows = torch.arange(text.shape[0], device=text.device)
        negatives = candidates[:, 0]  # a uniformly drawn allowed caption
        if self.hard_fraction > 0 and candidates.shape[1] > 1:
            with torch.no_grad():
                pair_rows = rows[:, None].expand_as(candidates)[valid]
                logits = fusion_model(model)(
                    all_text[candidates[valid]], visual_inputs=visual, pair_index=pair_rows
                ).itm_logits
                scores = torch.full(candidates.shape, -torch.inf, device=text.device)
                scores[valid] = F.log_softmax(logits.float(), dim=-1)[:, MATCH]
            hardest = candidates.gather(1, scores.argmax(dim=1, keepdim=True))[:, 0]
            use_hard = torch.rand(text.shape[0], device=text.device) < self.hard_fraction
            negatives = torch.where(use_hard, hardest, negatives)
        has_negative = valid[:, 0]
        return all_text[negatives[has_negative]], rows[has_negative]

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Score every image with its caption and with a negative; cross-entropy over match/mismatch.

        Returns:
            ``loss``, ``accuracy`` (of the match decision over positives and negatives) and
            ``negatives_per_image``.
        """
        visual = fusion_model(model).visual_inputs(**visual_batch(model, batch))  # encoded once, used twice
        text = batch["text"]
        negative_text, negative_images = self.choose_negatives(model, batch, visual)
        batch_size = text.shape[0]
        pair_index = torch.cat([torch.arange(batch_size, device=text.device), negative_images])
        targets = torch.cat([
            torch.full((batch_size,), MATCH, device=text.device),
            torch.full((len(negative_images),), MISMATCH, device=text.device),
        ])
        logits = model(torch.cat([text, negative_text]), visual_inputs=visual, pair_index=pair_index).itm_logits
        logits = logits.float()
        return {
            "loss": F.cross_entropy(logits, targets),
            "accuracy": (logits.detach().argmax(dim=-1) == targets).float().mean(),
            "negatives_per_image": torch.tensor(len(negative_images) / batch_size, device=text.device),
        }
