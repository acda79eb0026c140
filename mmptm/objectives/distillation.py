"""Multilingual CLIP by distillation: a student text tower learns a frozen teacher's text embeddings.

Carlsson et al. 2022, "Cross-lingual and Multilingual CLIP" (M-CLIP), sec. 3:
the teacher is an (English) CLIP text tower; on parallel text, the teacher
encodes the English sentence and the student is trained to give the same
embedding for its translation (and for the English sentence itself), with a
mean squared error. The student then lives in the teacher's image-text space
without ever seeing an image, in every language of the parallel text.

Here the embeddings are compared at unit length: zero-shot classification and
retrieval read only their directions, and the student's are taken through the
(possibly DDP-wrapped) model's ``forward``, which returns them normalised.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmptm.objectives.mlm import check_pair_batch
from mmptm.objectives.text_alignment import encode_pair_sides
from mmptm.registry import register_objective


@register_objective("mclip_distillation")
class MultilingualDistillation(nn.Module):
    """MSE between a student's text embeddings of translations and a frozen teacher's of the source.

    Reads ``parallel_text`` (or ``number_pairs``) batches with ``tokenize: true``: ``src`` is the
    teacher's language (English in the demo corpus). The student is the trained model, any dual
    encoder with open_clip's interface; the teacher is a CLIP checkpoint, read with its own
    tokenizer from the batch's ``src`` strings, so teacher and student may tokenise differently.

    Args:
        teacher: checkpoint or run folder of the teacher model (``mmptm.load_pretrained``).
        match_source: also train the student's embedding of the source sentence toward the teacher's
            (M-CLIP trains on both the English and the translated sentences).

    Raises:
        ValueError: the teacher cannot be loaded or has no ``encode_text``.
    """

    def __init__(self, teacher: str, match_source: bool = True) -> None:
        super().__init__()
        from mmptm.models import load_pretrained  # models imports the objectives' registry users

        try:
            loaded = load_pretrained(teacher)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"mclip_distillation: teacher={teacher}: {err}") from None
        if not hasattr(loaded.model, "encode_text"):
            raise ValueError(f"mclip_distillation: teacher={teacher} is a {type(loaded.model).__name__}, "
                             "which has no encode_text (use a CLIP checkpoint)")
        loaded.model.requires_grad_(False)
        # Kept out of the module tree: the teacher is no trained parameter, no checkpointed weight and
        # nothing for DDP to synchronise.
        self._teacher = (loaded.model, loaded.tokenizer)
        self.match_source = match_source

    @torch.no_grad()
    def teacher_embeddings(self, texts: list[str], device: torch.device) -> torch.Tensor:
        """The teacher's unit-length text embeddings ``[B, D]`` of ``texts``."""
        model, tokenizer = self._teacher
        if next(model.parameters()).device != device:
            model.to(device)
        return model.encode_text(tokenizer(texts).to(device), normalize=True).float()

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Returns ``loss`` (the mean squared error per embedding, summed over dimensions, averaged over
        the sides trained) and ``cosine`` (mean student-teacher cosine on the translations)."""
        check_pair_batch(batch, "mclip_distillation")
        target = self.teacher_embeddings(batch["src"], batch["src_tokens"].device)
        source, translation = encode_pair_sides(model, batch)
        if target.shape[1] != translation.shape[1]:
            raise ValueError(
                f"mclip_distillation: the teacher embeds into {target.shape[1]} dimensions, the student into "
                f"{translation.shape[1]}: give the student the teacher's embed_dim"
            )
        sides = [translation, source] if self.match_source else [translation]
        loss = torch.stack([F.mse_loss(side.float(), target, reduction="sum") / len(target) for side in sides]).mean()
        return {"loss": loss, "cosine": (translation.detach().float() * target).sum(dim=-1).mean()}
