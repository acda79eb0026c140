"""SigLIP's pairwise sigmoid image-text loss.

Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", sec. 3.2:
every image-text pair of the batch is an independent binary classification
(positive for the matching pair, negative otherwise) on
``logit_scale * <image, text> + logit_bias``; no normalisation over the batch
is needed. The numbers and gradients equal open_clip's ``SigLipLoss``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmptm.objectives.contrastive import contrastive_labels, encode_pairs, retrieval_accuracy
from mmptm.registry import register_objective
from mmptm.training.distributed import all_gather_with_grad, world_info


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid loss of this rank's images against the texts of all ranks (Zhai et al. 2023, sec. 3.2).

    The paper's chunked implementation (sec. 3.3, open_clip's neighbour
    exchange) passes text blocks between neighbouring devices and sums the
    per-block losses; all-gathering the texts with gradient and scoring one
    ``[B, world_size * B]`` block gives the same sum and the same gradients
    (the gather's backward returns each block's gradient to its owner, as the
    reverse exchange does), with one collective instead of ``world_size - 1``.
    The loss is summed over pairs and divided by the local batch size B, so
    the mean over ranks (DDP's averaging) is the single-process loss on the
    global batch. A collective: every rank must call it.

    Args:
        image_features: ``[B, D]`` L2-normalised image embeddings of this rank.
        text_features: ``[B, D]`` L2-normalised text embeddings of this rank, paired by row.
        logit_scale: scalar temperature, already exponentiated (the paper's ``exp(t')``).
        logit_bias: scalar learnable bias ``b``.

    Returns:
        ``(loss, logits)``: the scalar loss and the ``[B, world_size * B]``
        logits, positives at column ``rank * B + i`` of row ``i``.
    """
    rank, _ = world_info()
    batch_size = image_features.shape[0]
    logits = logit_scale * image_features @ all_gather_with_grad(text_features).T + logit_bias
    # Label z_ij = +1 for the pair of image i (text rank*B + i of the gathered texts), -1 otherwise.
    signs = torch.full_like(logits, -1.0)
    signs.diagonal(rank * batch_size).fill_(1.0)
    loss = -F.logsigmoid(signs * logits).sum() / batch_size
    return loss, logits


@register_objective("siglip")
class SigLipLoss(nn.Module):
    """SigLIP sigmoid image-text loss over the global batch (Zhai et al. 2023, sec. 3).

    The model must return open_clip's output dict with a learnable
    ``logit_bias`` (set ``model.init_logit_bias: -10`` and
    ``model.init_logit_scale: 2.302585``, i.e. log 10, as the paper's sec. 3.2
    initialises them; without the bias the loss starts dominated by the many
    negatives).
    """

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Encode a batch of pairs (see :func:`~mmptm.objectives.contrastive.encode_pairs`) and score it.

        Returns:
            ``loss`` and the metrics ``logit_scale``, ``logit_bias`` and
            ``i2t_acc`` (top-1 text of each local image among all gathered texts;
            text-to-image would need the images of other ranks, which the
            sigmoid loss does not exchange), all scalar tensors.

        Raises:
            ValueError: the model has no ``logit_bias``.
        """
        out = encode_pairs(model, batch)
        if out.get("logit_bias") is None:
            raise ValueError(
                "the 'siglip' objective needs a model with a learnable logit bias, but the model's output has "
                "no 'logit_bias'; set 'model.init_logit_bias: -10' (and 'model.init_logit_scale: 2.302585', "
                "i.e. log 10), the initialisation of Zhai et al. 2023, sec. 3.2"
            )
        image_features = out["image_features"]
        loss, logits = siglip_loss(image_features, out["text_features"], out["logit_scale"], out["logit_bias"])
        labels = contrastive_labels(image_features.shape[0], image_features.device, local_loss=True)
        return {
            "loss": loss,
            "logit_scale": out["logit_scale"].detach(),
            "logit_bias": out["logit_bias"].detach(),
            "i2t_acc": retrieval_accuracy(logits, labels),
        }
