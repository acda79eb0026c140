"""Training objectives; importing this package registers them (``contrastive``, ``siglip``)."""

from mmptm.objectives.contrastive import ContrastiveLoss, clip_contrastive_loss
from mmptm.objectives.siglip import SigLipLoss, siglip_loss

__all__ = ["ContrastiveLoss", "SigLipLoss", "clip_contrastive_loss", "siglip_loss"]
