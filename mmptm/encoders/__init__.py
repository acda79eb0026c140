"""Encoders (modality towers) and the models assembled from them.

Importing this package registers the built-in components: the ``vit``,
``modified_resnet``, ``timm`` and ``text_transformer`` encoders and the ``clip``,
``multilingual_encoder``, ``visualbert`` and ``vilbert`` models.
"""

from mmptm.encoders.clip import CLIP
from mmptm.encoders.layers import Attention, Mlp, QuickGELU, ResidualAttentionBlock, Transformer
from mmptm.encoders.multilingual import MultilingualEncoder
from mmptm.encoders.resnet import ModifiedResNet
from mmptm.encoders.text import TextTransformer
from mmptm.encoders.vilbert import ViLBert
from mmptm.encoders.vision import TimmVisionTower, VisionTransformer
from mmptm.encoders.visualbert import VisualBert

__all__ = [
    "CLIP",
    "Attention",
    "Mlp",
    "ModifiedResNet",
    "MultilingualEncoder",
    "QuickGELU",
    "ResidualAttentionBlock",
    "TextTransformer",
    "TimmVisionTower",
    "Transformer",
    "ViLBert",
    "VisionTransformer",
    "VisualBert",
]
