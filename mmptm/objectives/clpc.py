"""Cross-lingual paraphrase classification (CLPC), a Unicoder pre-training task.

Huang et al. 2019, "Unicoder: A Universal Language Encoder by Pre-training with
Multiple Cross-lingual Tasks", sec. 3.3: the encoder reads two sentences in
different languages as one sequence and classifies from the first token's state
whether they are translations of each other. Positives are the parallel pairs
of a batch; negatives pair a source with another target of the same batch (at
random, or the most similar one by the model's current sentence embeddings:
hard negatives, as Unicoder samples them).

``mode="dual"`` scores a pair instead by the scaled cosine similarity of the two
sentences' mean-pooled embeddings, encoded separately, and classifies each
source's translation among all the batch's targets (every other target a
negative; both directions), as the translation-ranking task of Yang et al. 2019
("Improving Multilingual Sentence Embedding using Bi-directional Dual Encoder
with Additive Margin Softmax"). It trains the very representation cross-lingual
retrieval reads, at half the sequence length of the paper's cross-encoder.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmptm.encoders.multilingual import mean_pool
from mmptm.objectives.contrastive import retrieval_accuracy
from mmptm.objectives.mlm import check_pair_batch, concat_pair, pair_languages
from mmptm.registry import register_objective
from mmptm.training.distributed import unwrap_model


def in_batch_negatives(
    batch_size: int, negatives: int, device: torch.device, similarity: torch.Tensor | None = None
) -> torch.Tensor:
    """For each row, ``negatives`` indices of other rows.

    Args:
        batch_size: B (at least 2).
        negatives: k, at most ``B - 1``.
        device: where to put the indices.
        similarity: ``[B, B]`` source-target similarities: take the k most similar other rows (hard
            negatives); None: k distinct other rows at random.

    Returns:
        ``LongTensor[B, k]``, never a row's own index.
    """
    if similarity is not None:
        eye = torch.eye(batch_size, dtype=torch.bool, device=device)
        return similarity.masked_fill(eye, float("-inf")).topk(negatives, dim=1).indices
    offsets = torch.rand(batch_size, batch_size - 1, device=device).argsort(dim=1)[:, :negatives] + 1
    return (torch.arange(batch_size, device=device)[:, None] + offsets) % batch_size


@register_objective("clpc")
class CrossLingualParaphraseClassification(nn.Module):
    """Binary translation-or-not classification of concatenated pairs (Unicoder, sec. 3.3).

    The classifier is the model's ``pair_classifier`` over the first token's final
    state. Reads ``parallel_text`` batches with ``tokenize: true``.

    Args:
        negatives: negative pairs per positive, drawn from the batch (``cross`` mode).
        hard_negatives: pick the most similar other targets (mean-pooled embeddings) instead of random
            ones (``cross`` mode).
        mode: ``cross`` (the paper: one sequence per pair, classified from its first token) or ``dual``
            (separately encoded sentences, in-batch softmax over cosine similarities).
        scale: the similarity scale of ``dual`` mode (a fixed inverse temperature).
    """

    def __init__(
        self, negatives: int = 1, hard_negatives: bool = False, mode: Literal["cross", "dual"] = "cross",
        scale: float = 20.0,
    ) -> None:
        super().__init__()
        if negatives < 1:
            raise ValueError(f"clpc: negatives must be >= 1, got {negatives}")
        if mode not in ("cross", "dual"):
            raise ValueError(f"clpc: mode must be 'cross' or 'dual', got {mode!r}")
        self.negatives = negatives
        self.hard_negatives = hard_negatives
        self.mode = mode
        self.scale = scale

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Returns ``loss``, ``acc`` and, in ``cross`` mode, ``pos_acc`` (accuracy on the translations)."""
        check_pair_batch(batch, "clpc")
        inner = unwrap_model(model)
        src, tgt = batch["src_tokens"], batch["tgt_tokens"]
        size = src.shape[0]
        if size < 2:
            raise ValueError("clpc needs batches of at least 2 pairs to draw in-batch negatives")
        k = min(self.negatives, size - 1)
        src_langs, tgt_langs = pair_languages(inner, batch, src.device)
        if self.mode == "dual":
            return self._dual(model, src, tgt, src_langs, tgt_langs)
        similarity = None
        if self.hard_negatives:
            with torch.no_grad():
                similarity = inner.encode_text(src, True, src_langs) @ inner.encode_text(tgt, True, tgt_langs).T
        negative = in_batch_negatives(size, k, src.device, similarity).reshape(-1)
        rows = torch.arange(size, device=src.device).repeat_interleave(k)
        pair = concat_pair(
            torch.cat([src, src[rows]]), torch.cat([tgt, tgt[negative]]),
            torch.cat([src_langs, src_langs[rows]]), torch.cat([tgt_langs, tgt_langs[negative]]),
        )
        hidden = model(pair.tokens, languages=pair.languages, positions=pair.positions)
        logits = inner.pair_classifier(hidden[:, 0]).squeeze(-1).float()
        labels = torch.cat([torch.ones(size), torch.zeros(size * k)]).to(logits.device)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        correct = ((logits.detach() > 0).float() == labels).float()
        return {"loss": loss, "acc": correct.mean(), "pos_acc": correct[:size].mean()}

    def _dual(
        self, model: nn.Module, src: torch.Tensor, tgt: torch.Tensor, src_langs: torch.Tensor, tgt_langs: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """In-batch translation classification over the cosine similarities of mean-pooled embeddings."""
        inner = unwrap_model(model)
        embeddings = []
        for tokens, langs in ((src, src_langs), (tgt, tgt_langs)):
            # Through the (possibly DDP-wrapped) model's forward, pooled as encode_text pools.
            embeddings.append(F.normalize(mean_pool(model(tokens, languages=langs), tokens != inner.pad_id), dim=-1))
        logits = self.scale * embeddings[0].float() @ embeddings[1].float().T
        labels = torch.arange(len(src), device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        return {"loss": loss, "acc": retrieval_accuracy(logits, labels)}
