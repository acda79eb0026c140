"""Cross-lingual word recovery (CLWR), a Unicoder pre-training task.

Huang et al. 2019, "Unicoder: A Universal Language Encoder by Pre-training with
Multiple Cross-lingual Tasks", sec. 3.1: for a sentence pair (X, Y), every
source word embedding ``x_i`` is re-expressed as an attention-weighted sum of
the target word embeddings, ``x_i^t = sum_j softmax_j(A_ij) y_j`` with the
trilinear ``A_ij = W [x_i, y_j, x_i ⊙ y_j]``; the sequence ``x^t`` goes through
the encoder, which must recover the source words. The task pushes translated
words towards one another in embedding space.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmptm.objectives.masking import IGNORE_INDEX
from mmptm.objectives.mlm import check_pair_batch, masked_lm_loss, special_ids
from mmptm.registry import register_objective
from mmptm.training.distributed import unwrap_model


@register_objective("clwr")
class CrossLingualWordRecovery(nn.Module):
    """Recover the source words from their re-expression by target words (Unicoder, sec. 3.1).

    The trilinear attention is the model's ``word_recovery`` module (its size
    follows the model width). Reads ``parallel_text`` batches with ``tokenize: true``.
    """

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Returns ``loss`` and ``acc`` (source words recovered)."""
        check_pair_batch(batch, "clwr")
        inner = unwrap_model(model)
        src, tgt = batch["src_tokens"], batch["tgt_tokens"]
        words = ~torch.isin(src, torch.tensor(special_ids(inner), device=src.device))
        source = inner.token_embedding(src)
        recovered = inner.word_recovery(source, inner.token_embedding(tgt), tgt != inner.pad_id)
        inputs = torch.where(words[..., None], recovered, source)
        labels = torch.where(words, src, torch.full_like(src, IGNORE_INDEX))
        hidden = model(src, languages=inner.language_ids(batch["src_lang"], src.device), inputs_embeds=inputs)
        loss, accuracy = masked_lm_loss(inner, hidden, labels)
        return {"loss": loss, "acc": accuracy}
