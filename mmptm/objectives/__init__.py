"""Training objectives; importing this package registers them (``contrastive``, ``siglip``, and for the
fusion models ``itm``, ``vl_mlm``, ``mrm``, and for multilingual encoders ``mmlm``, ``tlm``, ``clwr``, ``clpc``)."""

from mmptm.objectives.clpc import CrossLingualParaphraseClassification
from mmptm.objectives.clwr import CrossLingualWordRecovery
from mmptm.objectives.contrastive import ContrastiveLoss, clip_contrastive_loss
from mmptm.objectives.itm import ImageTextMatching
from mmptm.objectives.mlm import MultilingualMaskedLM, TranslationLM
from mmptm.objectives.mrm import MaskedRegionModelling
from mmptm.objectives.siglip import SigLipLoss, siglip_loss
from mmptm.objectives.vl_mlm import VisionLanguageMLM

__all__ = [
    "ContrastiveLoss",
    "CrossLingualParaphraseClassification",
    "CrossLingualWordRecovery",
    "ImageTextMatching",
    "MaskedRegionModelling",
    "MultilingualMaskedLM",
    "SigLipLoss",
    "TranslationLM",
    "VisionLanguageMLM",
    "clip_contrastive_loss",
    "siglip_loss",
]
