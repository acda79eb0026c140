"""Encoders (modality towers) and the models assembled from them.

Importing this package registers the built-in components: the ``vit``,
``modified_resnet``, ``timm``, ``text_transformer`` and ``multilingual_text`` encoders and the ``clip``,
``multilingual_encoder``, ``mbart``, ``visualbert``, ``vilbert``, ``dvae``, ``vqvae`` and ``dalle`` models.
"""

from mmptm.encoders.clip import CLIP
from mmptm.encoders.dalle import TokenDecoder
from mmptm.encoders.dvae import VQVAE, DiscreteVAE
from mmptm.encoders.layers import Attention, Mlp, QuickGELU, ResidualAttentionBlock, Transformer
from mmptm.encoders.mbart import MBart
from mmptm.encoders.multilingual import MultilingualEncoder
from mmptm.encoders.multilingual_text import MultilingualTextTower
from mmptm.encoders.resnet import ModifiedResNet
from mmptm.encoders.text import TextTransformer
from mmptm.encoders.vilbert import ViLBert
from mmptm.encoders.vision import TimmVisionTower, VisionTransformer
from mmptm.encoders.visualbert import VisualBert

__all__ = [
    "CLIP",
    "VQVAE",
    "Attention",
    "DiscreteVAE",
    "MBart",
    "Mlp",
    "ModifiedResNet",
    "MultilingualEncoder",
    "MultilingualTextTower",
    "QuickGELU",
    "ResidualAttentionBlock",
    "TextTransformer",
    "TokenDecoder",
    "TimmVisionTower",
    "Transformer",
    "ViLBert",
    "VisionTransformer",
    "VisualBert",
]
