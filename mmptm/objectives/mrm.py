"""Masked region modelling for the fusion models: feature regression and region classification.

Lu et al. 2019 (ViLBERT), sec. 3.2 and Chen et al. 2020 (UNITER, "UNITER:
UNiversal Image-TExt Representation Learning"), sec. 3.1: about 15% of the visual
tokens have their features zeroed (their boxes stay), and the model, seeing the
caption and the other tokens, predicts for each masked token

(a) its input feature (regression, UNITER's MRFR: mean squared error), and
(b) a class target (UNITER's MRC): the detector's class distribution (KL, the
    ViLBERT/UNITER target) when the shards carry one (``region_classes``, see the
    ``region_features`` dataset); otherwise the code of the token's feature in a
    k-means codebook of the visual features, learnt online as training goes
    (spherical mini-batch k-means with EMA centroid updates, Sculley 2010,
    "Web-Scale K-Means Clustering"), so that patch features of an image tower
    get discrete targets without a detector. (The discrete tokens of a dVAE are
    the third option of the design; mmptm has no dVAE yet.)

With a trainable image tower the regression target moves with the tower; the
targets are detached, and the other objectives keep the features informative.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmptm.encoders.fusion import FusionModel, fusion_model, visual_batch
from mmptm.encoders.visual_inputs import REGION_CLASSES_KEY
from mmptm.registry import register_objective
from mmptm.training.distributed import all_reduce_mean


def choose_regions(valid: torch.Tensor, mask_prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Visual tokens to mask: each real token with probability ``mask_prob``, at least one per image.

    Args:
        valid: ``[B, N]`` bool, True for real tokens.
        mask_prob: masking probability.
        generator: the random source.

    Returns:
        ``[B, N]`` bool.
    """
    draw = torch.rand(valid.shape, generator=generator, device=valid.device).masked_fill(~valid, 2.0)
    chosen = draw < mask_prob
    # A row without a chosen token gets its lowest draw, so that every image has a target.
    lowest = F.one_hot(draw.argmin(dim=1), valid.shape[1]).bool() & valid
    return chosen | (lowest & ~chosen.any(dim=1, keepdim=True))


class OnlineKMeans(nn.Module):
    """A spherical k-means codebook of visual features, updated by EMA from every batch (Sculley 2010).

    Args:
        codes: number of centroids.
        momentum: EMA momentum of the centroid updates.
    """

    def __init__(self, codes: int, momentum: float = 0.99) -> None:
        super().__init__()
        self.codes = codes
        self.momentum = momentum
        self.register_buffer("centroids", torch.empty(0), persistent=False)

    @torch.no_grad()
    def assign_and_update(self, features: torch.Tensor, training: bool = True) -> torch.Tensor:
        """The nearest centroid of each feature (cosine); then move the centroids toward their members.

        Args:
            features: ``[M, D]`` features (the first call initialises the centroids from them).
            training: update the centroids (averaged over ranks).

        Returns:
            ``[M]`` code of each feature.
        """
        x = F.normalize(features.float(), dim=-1)
        if self.centroids.numel() == 0:
            picks = torch.randint(len(x), (self.codes,), device=x.device)
            self.centroids = F.normalize(x[picks] + 1e-3 * torch.randn_like(x[picks]), dim=-1)
        codes = (x @ self.centroids.T).argmax(dim=1)
        if training:
            one_hot = F.one_hot(codes, self.codes).float()
            sums, counts = all_reduce_mean(one_hot.T @ x), all_reduce_mean(one_hot.sum(dim=0))
            seen = counts > 0
            means = sums[seen] / counts[seen, None]
            updated = self.momentum * self.centroids[seen] + (1 - self.momentum) * means
            self.centroids[seen] = F.normalize(updated, dim=-1)
        return codes


@register_objective("mrm")
class MaskedRegionModelling(nn.Module):
    """Masked region modelling: regress and classify masked visual tokens (Lu et al. 2019; Chen et al. 2020).

    Reads ``"text"``, the model's visual input and, for the KL target, ``"region_classes"``
    (``[B, N, C]`` detector class probabilities, C = ``model.region_classes``).

    Args:
        mask_prob: probability of masking each visual token (at least one per image).
        regression_weight: weight of the feature regression loss.
        classification_weight: weight of the region classification loss.
        target: the classification target: ``detector`` (KL to the batch's class distribution),
            ``kmeans`` (codes of an online k-means codebook with ``model.region_classes`` codes), or
            ``auto`` (detector when the batch has one, else k-means).
        kmeans_momentum: EMA momentum of the k-means centroids.
    """

    def __init__(
        self,
        mask_prob: float = 0.15,
        regression_weight: float = 1.0,
        classification_weight: float = 1.0,
        target: Literal["auto", "detector", "kmeans"] = "auto",
        kmeans_momentum: float = 0.99,
    ) -> None:
        super().__init__()
        if not 0 < mask_prob <= 1:
            raise ValueError(f"mrm: mask_prob must be in (0, 1], got {mask_prob}")
        self.mask_prob = mask_prob
        self.regression_weight = regression_weight
        self.classification_weight = classification_weight
        self.target = target
        self.kmeans_momentum = kmeans_momentum
        self.kmeans: OnlineKMeans | None = None

    def _classification_loss(
        self, model: FusionModel, logits: torch.Tensor, features: torch.Tensor, batch: dict[str, Any],
        masked: torch.Tensor,
    ) -> torch.Tensor:
        """KL to the detector's distribution, or cross-entropy to the k-means code, at the masked tokens."""
        detector = batch.get(REGION_CLASSES_KEY)
        if self.target == "detector" and detector is None:
            raise KeyError(
                f"objective mrm has target: detector, but the batch has no '{REGION_CLASSES_KEY}': set the "
                "region_features dataset's class_key (the shards' per-region class distribution file), or use "
                "target: kmeans"
            )
        if detector is not None and self.target != "kmeans":
            if detector.shape[-1] != model.region_classes:
                raise ValueError(
                    f"the shards' region class distributions have {detector.shape[-1]} classes but "
                    f"model.region_classes is {model.region_classes}"
                )
            return F.kl_div(F.log_softmax(logits.float(), dim=-1), detector[masked].float(), reduction="batchmean")
        if self.kmeans is None:
            self.kmeans = OnlineKMeans(model.region_classes, self.kmeans_momentum)
        codes = self.kmeans.assign_and_update(features, training=self.training)
        return F.cross_entropy(logits.float(), codes)

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Mask visual tokens, encode with the caption, predict the masked tokens' features and classes.

        Returns:
            ``loss`` (the weighted sum), ``regression_loss`` and ``classification_loss``.
        """
        inner = fusion_model(model)
        inputs = inner.visual_inputs(**visual_batch(model, batch))
        masked = choose_regions(inputs.mask, self.mask_prob)
        out = model(batch["text"], visual_inputs=inputs, visual_mask=masked)
        states = out.visual[masked]
        targets = inputs.features[masked].detach().float()
        regression = F.mse_loss(inner.region_regression(states).float(), targets)
        classification = self._classification_loss(inner, inner.region_classifier(states), targets, batch, masked)
        loss = self.regression_weight * regression + self.classification_weight * classification
        return {"loss": loss, "regression_loss": regression.detach(), "classification_loss": classification.detach()}
