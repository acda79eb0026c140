"""Masked region modelling for the fusion models: feature regression and region classification.

Lu et al. 2019 (ViLBERT), sec. 3.2 and Chen et al. 2020 (UNITER, "UNITER:
UNiversal Image-TExt Representation Learning"), sec. 3.1: about 15% of the visual
tokens have their features zeroed (their boxes stay), and the model, seeing the
caption and the other tokens, predicts for each masked token

(a) its input feature (regression, UNITER's MRFR: mean squared error), and
(b) a class target (UNITER's MRC): the detector's class distribution (KL, the
    ViLBERT/UNITER target) when the shards carry one (``region_classes``, see the
    ``region_features`` dataset); otherwise, when a dVAE checkpoint is configured,
    the discrete visual tokens a frozen dVAE (Ramesh et al. 2021, sec. 2.1) gives
    the token's image cell, as BEiT (Bao et al. 2022, "BEiT: BERT Pre-Training of
    Image Transformers", sec. 2.2) predicts them for masked patches; otherwise
    the code of the token's feature in a k-means codebook of the visual features,
    learnt online as training goes (spherical mini-batch k-means with EMA
    centroid updates, Sculley 2010, "Web-Scale K-Means Clustering"), so that
    patch features of an image tower get discrete targets without a detector.

With a trainable image tower the regression target moves with the tower; the
targets are detached, and the other objectives keep the features informative.

A masked token's feature is zeroed at the fusion layers' input. With an image
tower that alone would leak the target: the tower's self-attention has already
mixed the masked patch into the other patch tokens (and the class token), which
the fusion layers still see. With mmptm's ViT tower the masked patches' pixels
are therefore zeroed before the tower too (as BEiT, Bao et al. 2022, sec. 2.2,
masks at the tower's input), and the targets come from a pass over the
unmasked images; a timm tower is masked after the tower only, so its
convolutions or attention still leak the masked cells into their neighbours.
Region features (``model.vision: null``) come from the detector one region at
a time and do not leak.

The k-means codebook is a persistent buffer of the objective: the trainer saves
it with the training state and ``--resume`` restores it, and with several
processes every rank starts from rank 0's codebook.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmptm.data_pipelines.context import model_data_context
from mmptm.encoders.fusion import FusionModel, fusion_model, visual_batch
from mmptm.encoders.vision import VisionTransformer
from mmptm.encoders.visual_inputs import REGION_CLASSES_KEY, VisualInputs, grid_boxes
from mmptm.registry import register_objective
from mmptm.training.distributed import all_reduce_mean, world_info


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


def zero_token_pixels(images: torch.Tensor, boxes: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """``images`` with the pixels inside the boxes of the chosen visual tokens set to 0 (the normalised mean).

    Tokens whose box is the whole image (a ViT's class token) leave the pixels as they are.

    Args:
        images: ``[B, 3, H, W]`` normalised images.
        boxes: ``[B, N, 4]`` normalised ``x1, y1, x2, y2`` of the visual tokens.
        chosen: ``[B, N]`` bool, the tokens to mask.

    Returns:
        ``[B, 3, H, W]``.
    """
    height, width = images.shape[-2:]
    boxes = boxes.float()
    patch = chosen & ((boxes[..., 2:] - boxes[..., :2]) < 1).any(dim=-1)
    ys = (torch.arange(height, device=images.device) + 0.5) / height  # pixel centres
    xs = (torch.arange(width, device=images.device) + 0.5) / width
    rows = (ys >= boxes[..., 1:2]) & (ys < boxes[..., 3:4]) & patch[..., None]  # [B, N, H]
    cols = (xs >= boxes[..., 0:1]) & (xs < boxes[..., 2:3])  # [B, N, W]
    # A pixel is masked when some chosen token's rows and columns both hold it: [B, H, N] @ [B, N, W].
    hidden = torch.bmm(rows.transpose(1, 2).float(), cols.float()) > 0
    return images.masked_fill(hidden[:, None], 0.0)


def masked_visual_inputs(
    model: FusionModel, visual: dict[str, torch.Tensor], mask_prob: float
) -> tuple[VisualInputs, VisualInputs, torch.Tensor]:
    """The visual tokens the fusion layers see, those the targets come from, and the tokens to mask.

    With mmptm's ViT tower the chosen patches' pixels are zeroed before the tower (the targets come
    from a pass over the unmasked images, without gradients), so that its self-attention cannot carry
    a masked patch into the tokens the fusion layers see; otherwise both are the same tokens.

    Args:
        model: the fusion model.
        visual: its visual inputs (``visual_batch``).
        mask_prob: probability of masking each visual token.

    Returns:
        ``(seen, targets, masked [B, N] bool)``.
    """
    if not isinstance(model.visual, VisionTransformer):
        inputs = model.visual_inputs(**visual)
        return inputs, inputs, choose_regions(inputs.mask, mask_prob)
    with torch.no_grad():
        targets = model.visual_inputs(**visual)
    masked = choose_regions(targets.mask, mask_prob)
    seen = model.visual_inputs(image=zero_token_pixels(visual["image"], targets.boxes, masked))
    return seen, targets, masked


class OnlineKMeans(nn.Module):
    """A spherical k-means codebook of visual features, updated by EMA from every batch (Sculley 2010).

    The centroids are a persistent buffer, saved with the objective's state (the trainer checkpoints it)
    so that a resumed run keeps the codes its region classifier learnt; a state dict of an initialised
    codebook sets the code count. With several processes the first batch's centroids are taken from
    rank 0 and every update averages the ranks' statistics, so all ranks hold the same codebook.

    Args:
        codes: number of centroids (None: set before the first call, or by a loaded state dict).
        momentum: EMA momentum of the centroid updates.
    """

    def __init__(self, codes: int | None = None, momentum: float = 0.99) -> None:
        super().__init__()
        self.codes = codes
        self.momentum = momentum
        self.register_buffer("centroids", torch.empty(0))

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        """Adopt the saved codebook's shape (this one may not be initialised yet), then load it."""
        saved = state_dict.get(prefix + "centroids")
        if saved is not None:
            self.centroids = torch.empty_like(saved, device=self.centroids.device)
            self.codes = len(saved) if saved.numel() else self.codes
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @torch.no_grad()
    def assign_and_update(self, features: torch.Tensor, training: bool = True) -> torch.Tensor:
        """The nearest centroid of each feature (cosine); then move the centroids toward their members.

        Every process must make the same calls (the first one broadcasts, updates all-reduce).

        Args:
            features: ``[M, D]`` features (the first call initialises the centroids from them, or from
                rank 0's with several processes).
            training: update the centroids (averaged over ranks).

        Returns:
            ``[M]`` code of each feature.
        """
        x = F.normalize(features.float(), dim=-1)
        if self.centroids.numel() == 0:
            if self.codes is None:
                raise ValueError("OnlineKMeans: set codes (the number of centroids) before the first batch")
            picks = torch.randint(len(x), (self.codes,), device=x.device)
            centroids = F.normalize(x[picks] + 1e-3 * torch.randn_like(x[picks]), dim=-1)
            if world_info()[1] > 1:  # each rank drew from its own batch: all take rank 0's codebook
                dist.broadcast(centroids, src=0)
            self.centroids = centroids
        codes = (x @ self.centroids.T).argmax(dim=1)
        if training:
            one_hot = F.one_hot(codes, self.codes).float()
            sums, counts = all_reduce_mean(one_hot.T @ x), all_reduce_mean(one_hot.sum(dim=0))
            seen = counts > 0
            means = sums[seen] / counts[seen, None]
            updated = self.momentum * self.centroids[seen] + (1 - self.momentum) * means
            self.centroids[seen] = F.normalize(updated, dim=-1)
        return codes


class DVAETargets:
    """The tokens of a frozen dVAE as class targets of visual tokens, one distribution per token's cell.

    The dVAE (any model with ``encode_tokens(images in [0, 1]) -> [B, grid**2]``, ``grid_size``,
    ``codebook_size`` and ``image_size``, e.g. ``dvae`` or ``vqvae``) tokenises the batch's images,
    un-normalised with the fusion tower's mean and std and resized to the dVAE's input size. A visual
    token's target is the distribution of the dVAE tokens over its box (area-weighted): the token of
    its cell when the two grids match, the histogram of the dVAE cells it covers when the dVAE grid is
    finer (pooled to the patch grid), the token of the cell containing it when the patch grid is finer.
    Tokens covering the whole image (a ViT's class token) get no target.

    The dVAE is held outside the objective's modules: it is frozen, and neither trained nor saved
    with the run (the objective keeps its path).

    Args:
        checkpoint: the dVAE's mmptm checkpoint (or run) folder.
    """

    def __init__(self, checkpoint: str) -> None:
        self.checkpoint = checkpoint
        self._dvae: nn.Module | None = None

    def dvae(self, device: torch.device) -> nn.Module:
        """The frozen dVAE on ``device`` (loaded on first use)."""
        if self._dvae is None:
            from mmptm.models import load_pretrained

            dvae = load_pretrained(self.checkpoint).model
            missing = [a for a in ("encode_tokens", "grid_size", "codebook_size", "image_size") if not hasattr(dvae, a)]
            if missing:
                raise ValueError(
                    f"objective mrm: dvae checkpoint '{self.checkpoint}' holds a {type(dvae).__name__}, which has no "
                    f"{missing}: name a dvae or vqvae checkpoint"
                )
            self._dvae = dvae.requires_grad_(False).eval()
        return self._dvae.to(device)

    @torch.no_grad()
    def __call__(
        self, model: FusionModel, images: torch.Tensor, inputs: VisualInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(targets [B, N, codebook_size], has_target [N])`` for the visual tokens of ``images``.

        Raises:
            ValueError: the codebook size is not ``model.region_classes``, or the tower's patch grid and
                the dVAE's grid are not multiples of one another.
        """
        dvae = self.dvae(images.device)
        if dvae.codebook_size != model.region_classes:
            raise ValueError(
                f"objective mrm: the dVAE has {dvae.codebook_size} tokens but model.region_classes is "
                f"{model.region_classes}: set model.region_classes={dvae.codebook_size}"
            )
        boxes = inputs.boxes[0].float()  # a tower gives every image the same boxes
        sides = boxes[:, 2:] - boxes[:, :2]
        has_target = (sides < 1).any(dim=-1)
        patch_grid = round(1 / sides[has_target].max().item()) if has_target.any() else 0
        grid = dvae.grid_size
        if patch_grid == 0 or (patch_grid % grid and grid % patch_grid):
            raise ValueError(
                f"objective mrm: the image tower's {patch_grid}x{patch_grid} patch grid and the dVAE's {grid}x{grid} "
                "token grid must match or one be a multiple of the other (to pool one onto the other): change "
                "model.vision's image_size/patch_size or the dVAE"
            )
        normalisation = model_data_context(model)  # the mean and std the stream normalised the images with
        mean = torch.tensor(normalisation.image_mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(normalisation.image_std, device=images.device).view(1, 3, 1, 1)
        pixels = (images.float() * std + mean).clamp(0, 1)
        if pixels.shape[-1] != dvae.image_size or pixels.shape[-2] != dvae.image_size:
            pixels = F.interpolate(pixels, size=(dvae.image_size, dvae.image_size), mode="bilinear",
                                   align_corners=False).clamp(0, 1)
        tokens = dvae.encode_tokens(pixels)
        cells = grid_boxes(grid, grid, device=boxes.device)
        corner_min = torch.maximum(boxes[:, None, :2], cells[None, :, :2])
        corner_max = torch.minimum(boxes[:, None, 2:], cells[None, :, 2:])
        overlap = (corner_max - corner_min).clamp(min=0).prod(dim=-1)  # [N, grid**2] areas
        weights = overlap / overlap.sum(dim=1, keepdim=True).clamp(min=1e-12)
        return weights @ F.one_hot(tokens, dvae.codebook_size).float(), has_target


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
            ``dvae`` (cross-entropy to the tokens of the ``dvae`` checkpoint, see :class:`DVAETargets`),
            ``kmeans`` (codes of an online k-means codebook with ``model.region_classes`` codes), or
            ``auto`` (detector when the batch has one, else dvae when ``dvae`` is set, else k-means).
        kmeans_momentum: EMA momentum of the k-means centroids.
        dvae: a frozen dVAE's checkpoint folder for the ``dvae`` target (a model that encodes pixels;
            ``model.region_classes`` = its codebook size).
    """

    def __init__(
        self,
        mask_prob: float = 0.15,
        regression_weight: float = 1.0,
        classification_weight: float = 1.0,
        target: Literal["auto", "detector", "dvae", "kmeans"] = "auto",
        kmeans_momentum: float = 0.99,
        dvae: str | None = None,
    ) -> None:
        super().__init__()
        if not 0 < mask_prob <= 1:
            raise ValueError(f"mrm: mask_prob must be in (0, 1], got {mask_prob}")
        self.mask_prob = mask_prob
        self.regression_weight = regression_weight
        self.classification_weight = classification_weight
        self.target = target
        # Always present (its code count is the model's, known at the first batch), so that the trainer's
        # checkpoint of the objectives holds the codebook and a resumed run restores it.
        self.kmeans = OnlineKMeans(momentum=kmeans_momentum)
        if target == "dvae" and dvae is None:
            raise ValueError("mrm: target dvae needs the dvae option (a dVAE checkpoint folder)")
        self.dvae_targets = DVAETargets(dvae) if dvae is not None else None

    def _classification_loss(
        self, model: FusionModel, logits: torch.Tensor, inputs: VisualInputs, batch: dict[str, Any],
        masked: torch.Tensor,
    ) -> torch.Tensor:
        """KL to the detector's distribution, or cross-entropy to the dVAE tokens or k-means code, at masked tokens."""
        detector = batch.get(REGION_CLASSES_KEY)
        if self.target == "detector" and detector is None:
            raise KeyError(
                f"objective mrm has target: detector, but the batch has no '{REGION_CLASSES_KEY}': set the "
                "region_features dataset's class_key (the shards' per-region class distribution file), or use "
                "target: kmeans"
            )
        if detector is not None and self.target in ("auto", "detector"):
            if detector.shape[-1] != model.region_classes:
                raise ValueError(
                    f"the shards' region class distributions have {detector.shape[-1]} classes but "
                    f"model.region_classes is {model.region_classes}"
                )
            return F.kl_div(F.log_softmax(logits.float(), dim=-1), detector[masked].float(), reduction="batchmean")
        if self.dvae_targets is not None and self.target in ("auto", "dvae"):
            if model.reads_regions:
                raise ValueError(
                    "objective mrm: the dvae target tokenises the images, but the model reads region features "
                    "(model.vision is null): set model.vision, or use target: kmeans"
                )
            targets, has_target = self.dvae_targets(model, batch["image"], inputs)
            scored = has_target.expand_as(masked)[masked]
            log_probs = F.log_softmax(logits[scored].float(), dim=-1)
            # Masked whole-image tokens have no target; the sum keeps the head in the graph even then.
            return -(targets[masked][scored] * log_probs).sum(dim=-1).mean() if scored.any() else logits.sum() * 0.0
        if self.kmeans.codes is None:
            self.kmeans.codes = model.region_classes
        elif self.kmeans.codes != model.region_classes:
            raise ValueError(
                f"objective mrm: the k-means codebook (restored from a checkpoint) has {self.kmeans.codes} codes "
                f"but model.region_classes is {model.region_classes}: resume with the run's model.region_classes"
            )
        codes = self.kmeans.assign_and_update(inputs.features[masked].detach(), training=self.training)
        return F.cross_entropy(logits.float(), codes)

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Mask visual tokens, encode with the caption, predict the masked tokens' features and classes.

        Returns:
            ``loss`` (the weighted sum), ``regression_loss`` and ``classification_loss``.
        """
        inner = fusion_model(model)
        seen, target_inputs, masked = masked_visual_inputs(inner, visual_batch(model, batch), self.mask_prob)
        out = model(batch["text"], visual_inputs=seen, visual_mask=masked)
        states = out.visual[masked]
        targets = target_inputs.features[masked].detach().float()
        regression = F.mse_loss(inner.region_regression(states).float(), targets)
        classification = self._classification_loss(
            inner, inner.region_classifier(states), target_inputs, batch, masked
        )
        loss = self.regression_weight * regression + self.classification_weight * classification
        return {"loss": loss, "regression_loss": regression.detach(), "classification_loss": classification.detach()}
