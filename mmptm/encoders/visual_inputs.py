"""Visual inputs of the fusion models (VisualBERT, ViLBERT): token features with their boxes.

Both papers feed a BERT-style encoder with a set of visual tokens, each a
feature vector and the box it covers: Lu et al. 2019 ("ViLBERT: Pretraining
Task-Agnostic Visiolinguistic Representations for Vision-and-Language Tasks"),
sec. 3.2, encode a region's location as a 5-d vector (normalised top-left and
bottom-right corners and the fraction of the image it covers) projected to the
feature width and summed with the feature. The tokens come either from an
image tower (patch or grid cells, whose boxes are the grid's cells, so that the
same box embedding gives them their 2-D position) or from precomputed detector
regions read from shards (``npy`` features N×D + ``boxes.npy`` N×4).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

# Batch keys of precomputed region features (see the ``region_features`` dataset).
REGIONS_KEY, BOXES_KEY, REGION_MASK_KEY = "regions", "boxes", "region_mask"
# Optional per-region detector class distribution, the target of MRM's KL variant (Lu et al. 2019, sec. 3.2).
REGION_CLASSES_KEY = "region_classes"


class VisualInputs(NamedTuple):
    """The visual tokens of a batch.

    Attributes:
        features: ``[B, N, D]`` token features.
        boxes: ``[B, N, 4]`` boxes ``(x1, y1, x2, y2)`` normalised to ``[0, 1]``.
        mask: ``[B, N]`` bool, True for real tokens (False: padding of images with fewer regions).
    """

    features: torch.Tensor
    boxes: torch.Tensor
    mask: torch.Tensor


def grid_boxes(rows: int, cols: int, prefix: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """Boxes of ``prefix`` whole-image tokens (a class token) followed by a ``rows × cols`` grid in row-major order.

    Args:
        rows: grid height in cells.
        cols: grid width in cells.
        prefix: tokens before the grid that summarise the whole image (box ``(0, 0, 1, 1)``).
        device: where to put the boxes.

    Returns:
        ``[prefix + rows * cols, 4]`` normalised ``(x1, y1, x2, y2)`` boxes.
    """
    y, x = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    x, y = x.flatten().float(), y.flatten().float()
    cells = torch.stack([x / cols, y / rows, (x + 1) / cols, (y + 1) / rows], dim=-1)
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device).expand(prefix, 4)
    return torch.cat([whole, cells], dim=0)


def box_location(boxes: torch.Tensor) -> torch.Tensor:
    """ViLBERT's 5-d location of normalised boxes: corners and covered area (Lu et al. 2019, sec. 3.2).

    Args:
        boxes: ``[..., 4]`` normalised ``(x1, y1, x2, y2)``.

    Returns:
        ``[..., 5]``: ``(x1, y1, x2, y2, (x2 - x1) * (y2 - y1))``.
    """
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return torch.cat([boxes, area[..., None]], dim=-1)


class BoxEmbedding(nn.Module):
    """A linear map of :func:`box_location` to the visual width, added to the token's feature.

    Args:
        width: output width.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(5, width)

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        """``[B, N, 4]`` normalised boxes -> ``[B, N, width]``."""
        return self.proj(box_location(boxes.to(self.proj.weight.dtype)))
