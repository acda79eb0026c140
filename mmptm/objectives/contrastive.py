"""CLIP's symmetric contrastive (InfoNCE) objective over the global batch.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", sec. 2.3 and Fig. 3: in a batch of N image-text pairs, the N
matching pairs are the positives among N x N candidates; the loss is the mean
of the image->text and text->image cross-entropies over scaled cosine
similarities. The numbers and gradients equal open_clip's ``ClipLoss``.
"""

from __future__ import annotations

import inspect
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


class _ChunkedContrastive(torch.autograd.Function):
    """The global ``[N, N]`` symmetric InfoNCE computed in row chunks, forward and backward.

    Forward keeps, per row, the log-sum-exp of the image->text logits and, per
    column, a running log-sum-exp of the text->image logits; backward
    recomputes each chunk of logits and uses ``dL/dlogits = (softmax_rows +
    softmax_columns) / 2N - I / N``. Memory is ``O(chunk_size x N)`` instead of
    the ``O(N^2)`` of materialised logits and their softmax gradients: the
    trick of GradCache (Gao et al. 2021) applied inside the loss, so the
    contrastive batch is bounded by compute, not memory.
    """

    @staticmethod
    def forward(ctx: Any, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, chunk_size: int) -> Any:
        n = image.shape[0]
        row_lse = image.new_empty(n)
        col_lse = image.new_full((n,), float("-inf"))
        row_hits = image.new_zeros(())
        col_best = image.new_full((n,), float("-inf"))
        col_arg = torch.zeros(n, dtype=torch.long, device=image.device)
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            logits = scale * image[rows] @ text.T
            row_lse[rows] = torch.logsumexp(logits, dim=1)
            col_lse = torch.logaddexp(col_lse, torch.logsumexp(logits, dim=0))
            row_hits += (logits.argmax(dim=1) == torch.arange(start, rows.stop, device=image.device)).sum()
            best, arg = logits.max(dim=0)
            better = best > col_best
            col_best = torch.where(better, best, col_best)
            col_arg = torch.where(better, arg + start, col_arg)
        diagonal = scale * (image * text).sum(dim=-1)
        loss = ((row_lse - diagonal).mean() + (col_lse - diagonal).mean()) / 2
        ctx.save_for_backward(image, text, scale, row_lse, col_lse)
        ctx.chunk_size = chunk_size
        i2t_acc = row_hits / n
        t2i_acc = (col_arg == torch.arange(n, device=image.device)).float().mean()
        ctx.mark_non_differentiable(i2t_acc, t2i_acc)
        return loss, i2t_acc, t2i_acc

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> Any:
        image, text, scale, row_lse, col_lse = ctx.saved_tensors
        n = image.shape[0]
        grad_image, grad_text = torch.zeros_like(image), torch.zeros_like(text)
        grad_scale = torch.zeros((), dtype=image.dtype, device=image.device)
        for start in range(0, n, ctx.chunk_size):
            rows = slice(start, min(start + ctx.chunk_size, n))
            similarity = image[rows] @ text.T
            logits = scale * similarity
            grad = (torch.exp(logits - row_lse[rows, None]) + torch.exp(logits - col_lse[None, :])) / (2 * n)
            local = torch.arange(rows.stop - start, device=image.device)
            grad[local, local + start] -= 1 / n
            grad_image[rows] = scale * grad @ text
            grad_text += scale * grad.T @ image[rows]
            grad_scale += (grad * similarity).sum()
        return grad_loss * grad_image, grad_loss * grad_text, (grad_loss * grad_scale).reshape(scale.shape), None


def chunked_contrastive_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CLIP's symmetric InfoNCE over ``N`` pairs without materialising the ``[N, N]`` logits.

    The same loss and gradients as :func:`clip_contrastive_loss` on one
    process (or on gathered features), in ``O(chunk_size x N)`` memory; see
    :class:`_ChunkedContrastive`.

    Returns:
        ``(loss, i2t_acc, t2i_acc)``: the loss and the top-1 retrieval accuracies (no gradient).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedContrastive.apply(image_features, text_features, logit_scale, chunk_size)


def encode_pairs(model: nn.Module, batch: dict[str, Any], sub_batch: int | None = None) -> dict[str, torch.Tensor]:
    """Run a dual encoder on a batch of pairs; return open_clip's output dict.

    Args:
        model: a dual encoder (possibly DDP-wrapped) whose ``visual.input_key``
            names the batch entry its vision tower reads.
        batch: ``{<visual.input_key>: images (or another modality), "text": tokens, ...}``.
        sub_batch: GradCache's sub-batch size, passed to the model's ``forward`` (mmptm's
            :class:`~mmptm.encoders.clip.CLIP` takes it); None: the model's plain forward.

    Raises:
        TypeError: ``sub_batch`` for a model whose forward does not take it.
    """
    inputs = {"image": batch[unwrap_model(model).visual.input_key], "text": batch["text"]}
    if sub_batch is None:
        return model(**inputs)
    if "sub_batch" not in inspect.signature(unwrap_model(model).forward).parameters:
        raise TypeError(
            f"grad_cache_chunk needs a model whose forward takes sub_batch (mmptm's clip); "
            f"{type(unwrap_model(model)).__name__}.forward does not"
        )
    return model(**inputs, sub_batch=sub_batch)


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
        chunk_size: compute the global ``[N, N]`` logits in chunks of this many
            rows, forward and backward, so that memory grows linearly in the
            global batch (see :func:`chunked_contrastive_loss`); the same loss
            and gradients. Not with ``local_loss`` (whose logits are already ``[B, N]``).
        grad_cache_chunk: encode the batch this many pairs at a time and rebuild each sub-batch's
            activations in backward (GradCache, Gao et al. 2021, sec. 3.2; see
            :func:`~mmptm.encoders.layers.grad_cached`): a batch larger than the towers' activations
            fit in memory at once trains with the same gradients, for a second forward pass.
            Combine with ``chunk_size`` for global batches of tens of thousands.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = True,
        chunk_size: int | None = None,
        grad_cache_chunk: int | None = None,
    ) -> None:
        super().__init__()
        if chunk_size is not None and (local_loss or chunk_size < 1):
            raise ValueError(
                f"contrastive: chunk_size ({chunk_size}) must be >= 1 and cannot be combined with local_loss"
            )
        if grad_cache_chunk is not None and grad_cache_chunk < 1:
            raise ValueError(f"contrastive: grad_cache_chunk must be >= 1, got {grad_cache_chunk}")
        self.grad_cache_chunk = grad_cache_chunk
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.chunk_size = chunk_size
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
        out = encode_pairs(model, batch, self.grad_cache_chunk)
        image_features = out["image_features"]
        if self.chunk_size is not None:
            all_image, all_text = image_features, out["text_features"]
            if world_info()[1] > 1:
                all_image, all_text = gather_features(
                    all_image, all_text, local_loss=False, gather_with_grad=self.gather_with_grad
                )
            loss, i2t_acc, t2i_acc = chunked_contrastive_loss(all_image, all_text, out["logit_scale"], self.chunk_size)
            return {"loss": loss, "logit_scale": out["logit_scale"].detach(), "i2t_acc": i2t_acc, "t2i_acc": t2i_acc}
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
