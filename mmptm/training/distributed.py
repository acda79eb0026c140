"""Cross-process exchange for contrastive objectives: rank info, feature gathering, metric averaging.

Contrastive losses compare every image with every text of the *global* batch
(CLIP, Radford et al. 2021, sec. 2.3 trains with a 32k batch spread over many
devices), so each process gathers the other processes' features. The helpers
work with any ``torch.distributed`` backend (gloo on CPU, NCCL on GPU) and
degrade to no-ops in a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel


def world_info() -> tuple[int, int]:
    """This process's place in the default process group.

    Returns:
        ``(rank, world_size)``; ``(0, 1)`` when ``torch.distributed`` is not initialised.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside (Distributed)DataParallel, so objectives can read its attributes.

    DDP does not forward attribute access to the module it wraps; FSDP and
    ``torch.compile`` wrappers do, so they are left in place. Call the wrapper,
    not the unwrapped module, for the forward pass: DDP's gradient hooks hang
    off the wrapper's ``forward``.

    Args:
        model: a model, possibly wrapped by the trainer.

    Returns:
        The innermost wrapped module.
    """
    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, keeping the autograd graph.

    The backward pass sums, over ranks, the gradients flowing into this rank's
    chunk (``torch.distributed.nn.functional.all_gather``: reduce-scatter on
    NCCL, all-to-all + sum elsewhere). Every rank then holds the gradient of the
    *sum* of the per-rank losses; DDP's gradient averaging divides by the world
    size, giving the gradient of the mean loss, as a single process on the
    whole batch would.

    Args:
        tensor: ``[B, ...]``, the same shape on every rank.

    Returns:
        ``[world_size * B, ...]`` in rank order; ``tensor`` itself in a single process.
    """
    _, world_size = world_info()
    if world_size == 1:
        return tensor
    # Imported here: torch.distributed.nn needs a torch built with distributed support,
    # which is only guaranteed once a process group exists.
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    local_loss: bool = False,
    gather_with_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather image and text features of the global batch, as open_clip's ``gather_features``.

    Args:
        image_features: ``[B, D]`` features of this rank's images.
        text_features: ``[B, D]`` features of this rank's texts.
        local_loss: the caller computes the loss only for this rank's rows
            (``[B, world_size * B]`` logits). Without ``gather_with_grad`` this
            rank's chunk then stays gradient-free, as in open_clip, because its
            rows already carry the local features.
        gather_with_grad: back-propagate through the gather, so each rank's
            features also receive the gradient of the other ranks' losses
            (the exact global-batch gradient). Otherwise only this rank's own
            chunk is differentiable (the other chunks are constants), which
            saves a collective in the backward pass but drops those terms.

    Returns:
        ``(all_image_features, all_text_features)``, each ``[world_size * B, D]``
        in rank order; the inputs unchanged in a single process.
    """
    rank, world_size = world_info()
    if world_size == 1:
        return image_features, text_features
    if gather_with_grad:
        return all_gather_with_grad(image_features), all_gather_with_grad(text_features)
    gathered_image = [torch.empty_like(image_features) for _ in range(world_size)]
    gathered_text = [torch.empty_like(text_features) for _ in range(world_size)]
    dist.all_gather(gathered_image, image_features.contiguous())
    dist.all_gather(gathered_text, text_features.contiguous())
    if not local_loss:
        # The gathered copies are detached; put back the local tensors so this
        # rank's own features still get the gradient of their global-batch logits.
        gathered_image[rank] = image_features
        gathered_text[rank] = text_features
    return torch.cat(gathered_image, dim=0), torch.cat(gathered_text, dim=0)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average a metric over ranks (for logging; no gradient).

    Args:
        tensor: any tensor, the same shape on every rank.

    Returns:
        A new detached tensor holding the mean over ranks; in a single process,
        ``tensor`` detached.
    """
    _, world_size = world_info()
    if world_size == 1:
        return tensor.detach()
    # Clone: all_reduce works in place and must not overwrite the caller's tensor.
    total = tensor.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / world_size
