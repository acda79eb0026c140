"""Training objectives; importing this package registers them (``contrastive``, ``siglip``, and for the
fusion models ``itm``, ``vl_mlm``, ``mrm``, and for multilingual encoders ``mmlm``, ``tlm``, ``clwr``, ``clpc``,
for mBART ``denoising``,
and for dual encoders on parallel text ``text_alignment`` and ``mclip_distillation``,
for the image tokenizers ``image_tokenizer``, and for the token decoder ``dalle``)."""

from mmptm.objectives.clpc import CrossLingualParaphraseClassification
from mmptm.objectives.clwr import CrossLingualWordRecovery
from mmptm.objectives.contrastive import ContrastiveLoss, clip_contrastive_loss
from mmptm.objectives.denoising import MultilingualDenoising
from mmptm.objectives.distillation import MultilingualDistillation
from mmptm.objectives.image_tokens import ImageTokenizerLoss
from mmptm.objectives.itm import ImageTextMatching
from mmptm.objectives.mlm import MultilingualMaskedLM, TranslationLM
from mmptm.objectives.mrm import MaskedRegionModelling
from mmptm.objectives.siglip import SigLipLoss, siglip_loss
from mmptm.objectives.text_alignment import TextAlignment
from mmptm.objectives.text_to_image import TextToImageLM
from mmptm.objectives.vl_mlm import VisionLanguageMLM

__all__ = [
    "ContrastiveLoss",
    "CrossLingualParaphraseClassification",
    "CrossLingualWordRecovery",
    "ImageTextMatching",
    "ImageTokenizerLoss",
    "MaskedRegionModelling",
    "MultilingualDenoising",
    "MultilingualDistillation",
    "MultilingualMaskedLM",
    "SigLipLoss",
    "TextAlignment",
    "TextToImageLM",
    "TranslationLM",
    "VisionLanguageMLM",
    "clip_contrastive_loss",
    "siglip_loss",
]
