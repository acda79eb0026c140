"""Hugging Face ``VisualBertModel`` weights in mmptm's ``visualbert`` layout.

The two layouts hold the same tensors (Li et al. 2019's model as Hugging Face
implements it: post-norm BERT layers, visual tokens with segment 1 and position 0);
only the module names differ, so the import is a renaming. A ``visualbert`` built
with ``box_positions: false``, ``vision: null`` and ``visual_dim`` = the checkpoint's
``visual_embedding_dim`` then gives the Hugging Face model's hidden states.
"""

from __future__ import annotations

import re

import torch

# Hugging Face name pattern -> mmptm name (applied to names without the ``visual_bert.`` prefix).
_RENAMES = [
    (r"^embeddings\.LayerNorm\.", "embeddings.norm."),
    (r"^embeddings\.(word|position|token_type)_embeddings\.", r"embeddings.\1_embeddings."),
    (r"^embeddings\.(visual_token_type_embeddings|visual_position_embeddings|visual_projection)\.", r"\1."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.", r"layers.\1.attention.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.dense."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attention.norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.ffn.intermediate."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.ffn.output."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.ffn.norm."),
    (r"^pooler\.dense\.", "pooler.dense."),
]


def visualbert_state_dict_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face ``VisualBertModel`` state dict to mmptm's ``visualbert`` names.

    Args:
        hf_state: the model's ``state_dict()`` (a ``visual_bert.`` prefix, as in the pretraining
            model's checkpoints, is stripped; buffers such as ``position_ids`` are dropped).

    Returns:
        The encoder's tensors under mmptm names (load with ``strict=False``: the heads and the
        box embedding are mmptm's own).

    Raises:
        ValueError: a tensor whose name has no mmptm counterpart (named in the message).
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state.items():
        name = name.removeprefix("visual_bert.")
        if name.endswith("position_ids"):
            continue
        for pattern, replacement in _RENAMES:
            renamed, count = re.subn(pattern, replacement, name)
            if count:
                out[renamed] = tensor
                break
        else:
            raise ValueError(f"VisualBertModel tensor '{name}' has no counterpart in mmptm's visualbert")
    return out
