"""CLIP's symmetric contrastive (InfoNCE) objective over the global batch.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", sec. 2.3 and Fig. 3: in a batch of N image-text pairs, the N
matching pairs are the positives among N x N candidates; the loss is the mean
of the image->text and text->image cross-entropies over scaled cosine
similarities. The numbers and gradients equal open_clip's ``ClipLoss``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmptm.registry import register_objective
from mmptm.training.distributed import gather_features, unwrap_model, world_info


def contrastive_labels(batch_size: int, device: torch.device, *, local_loss: bool) -> torch.Tensor:
    """The target column of each logits row: the index of its paired sample in the candidates.

    Args:
        batch_size: this rank's batch size B.
        device: where to put the labels.
        local_loss: the rows are only this rank's B samples (columns: all ranks'
            samples), so targets are offset by ``rank * B``.

    Returns:
        ``LongTensor[B]`` with ``local_loss``, else ``[world_size * B]``.
    """
    rank, world_size = world_info()
    if local_loss:
        return torch.arange(rank * batch_size, (rank + 1) * batch_size, device=device)
    return torch.arange(world_size * batch_size, device=device)


def retrieval_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of picking the paired sample among the candidates of each row.

    Args:
        logits: ``[rows, candidates]`` similarity logits.
        labels: ``[rows]`` index of each row's positive candidate.

    Returns:
        A scalar float tensor (no host synchronisation).
    """
    return (logits.detach().argmax(dim=-1) == labels).float().mean()


def clip_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = True,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CLIP's symmetric InfoNCE loss (Radford et al. 2021, sec. 2.3, Fig. 3), across all ranks.

    In a multi-process run, features are gathered from every rank (a collective:
    every rank must call this). With ``local_loss`` each rank scores only its own
    rows against all gathered candidates (``[B, world_size * B]`` logits, memory
    linear in the world size); otherwise each rank computes the full global
    ``[N, N]`` logits. Both give the global-batch loss and gradients once DDP
    averages over ranks (with ``gather_with_grad``).

    Args:
        image_features: ``[B, D]`` L2-normalised image embeddings of this rank.
        text_features: ``[B, D]`` L2-normalised text embeddings of this rank, paired by row.
        logit_scale: scalar temperature, already exponentiated (the paper's ``exp(t)``).
        local_loss: compute the loss over this rank's rows only.
        gather_with_grad: back-propagate through the feature gather (see
            :func:`mmptm.training.distributed.gather_features`).
        labels: target column of each row; default :func:`contrastive_labels`
            (pass a cached copy to skip rebuilding it every step).

    Returns:
        ``(loss, logits_per_image, logits_per_text)``: the scalar loss and the
        ``[rows, candidates]`` logits it was computed from.
    """
    _, world_size = world_info()
    if world_size > 1:
        all_image, all_text = gather_features(
            image_features, text_features, local_loss=local_loss, gather_with_grad=gather_with_grad
        )
        if local_loss:
            logits_per_image = logit_scale * image_features @ all_text.T
            logits_per_text = logit_scale * text_features @ all_image.T
        else:
            logits_per_image = logit_scale * all_image @ all_text.T
            logits_per_text = logits_per_image.T
    else:
        logits_per_image = logit_scale * image_features @ text_features.T
        logits_per_text = logits_per_image.T
    if labels is None:
        labels = contrastive_labels(image_features.shape[0], image_features.device, local_loss=local_loss)
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    return loss, logits_per_image, logits_per_text


def encode_pairs(model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Run a dual encoder on a batch of pairs; return open_clip's output dict.

    Args:
        model: a dual encoder (possibly DDP-wrapped) whose ``visual.input_key``
            names the batch entry its vision tower reads.
        batch: ``{<visual.input_key>: images (or another modality), "text": tokens, ...}``.
    """
    return model(image=batch[unwrap_model(model).visual.input_key], text=batch["text"])


@register_objective("contrastive")
class ContrastiveLoss(nn.Module):
    """CLIP contrastive image-text loss over the global batch (Radford et al. 2021, sec. 2.3).

    The model must return open_clip's output dict: normalised ``image_features``
    and ``text_features`` and the exponentiated ``logit_scale``.

    Args:
        local_loss: each rank computes the loss for its own rows against all
            gathered candidates (memory linear, not quadratic, in the world size).
        gather_with_grad: back-propagate through the feature all-gather, giving
            exact global-batch gradients (recommended; open_clip's
            ``--gather-with-grad``).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        # Labels depend only on (device, batch size): cache them as open_clip does, keyed
        # also on inference mode, since an inference tensor cannot be saved for backward.
        self._labels: dict[tuple[torch.device, int, bool], torch.Tensor] = {}

    def ground_truth(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Cached :func:`contrastive_labels` for this rank's batch size and device."""
        key = (device, batch_size, torch.is_inference_mode_enabled())
        if key not in self._labels:
            self._labels[key] = contrastive_labels(batch_size, device, local_loss=self.local_loss)
        return self._labels[key]

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Encode a batch of pairs (see :func:`encode_pairs`) and score it.

        Returns:
            ``loss`` and the metrics ``logit_scale``, ``i2t_acc`` and ``t2i_acc``
            (top-1 over the logits the loss used), all scalar tensors.
        """
        out = encode_pairs(model, batch)
        image_features = out["image_features"]
        labels = self.ground_truth(image_features.shape[0], image_features.device)
        loss, logits_per_image, logits_per_text = clip_contrastive_loss(
            image_features,
            out["text_features"],
            out["logit_scale"],
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            labels=labels,
        )
        return {
            "loss": loss,
            "logit_scale": out["logit_scale"].detach(),
            "i2t_acc": retrieval_accuracy(logits_per_image, labels),
            "t2i_acc": retrieval_accuracy(logits_per_text, labels),
        }
