"""Run-time values a dataset factory needs and that do not come from its config section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DataContext:
    """What the trainer knows when it builds a data stream.

    Attributes:
        tokenizer: callable mapping a list of strings to a LongTensor of token ids.
        image_size: side of the square images the vision tower takes.
        image_mean / image_std: per-channel normalisation stored with the model.
        training: train-time augmentation and shuffling (False: deterministic).
        seed: base seed; streams derive per-epoch, per-rank, per-worker seeds from it.
        rank / world_size: this process's place among the data-parallel processes.
        region_dim / region_classes: the feature size and class count of the region features the model
            reads (a fusion model without an image tower), so that a sample of another size is skipped
            and counted instead of breaking its batch; None: not checked.
        image_token_grid / image_codebook_size: the side of the token grids and the codebook size of the
            image tokens the model reads (a DALL-E token decoder), so that a precomputed grid of another
            size or with ids outside the codebook is skipped and counted; None: not checked.
    """

    tokenizer: Any = None
    image_size: int = 224
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    training: bool = True
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    region_dim: int | None = None
    region_classes: int | None = None
    image_token_grid: int | None = None
    image_codebook_size: int | None = None


def image_tower(model: Any) -> Any:
    """The module whose ``image_size``, ``image_mean`` and ``image_std`` define a model's image preprocessing.

    That is the vision tower ``model.visual`` (None for a model without one), or, for a model without
    a ``visual`` attribute, the model itself (an image tokenizer such as the ``dvae``).
    """
    return getattr(model, "visual", model)


def model_data_context(model: Any, **fields: Any) -> DataContext:
    """A :class:`DataContext` with the image size and normalisation that the model's :func:`image_tower` stores.

    Args:
        model: a model whose vision tower (``model.visual``, or the model itself without one) may have
            ``image_size``, ``image_mean`` and ``image_std`` (the defaults stand in for what it lacks);
            a model that reads region features (``reads_regions``) gives their ``visual_dim`` and
            ``region_classes``; a model that reads image tokens (``reads_image_tokens``) gives their
            ``grid_size`` and ``codebook_size``.
        fields: the other fields (``tokenizer``, ``training``, ``seed``, ...).
    """
    visual = image_tower(model)
    defaults = DataContext()
    regions = bool(getattr(model, "reads_regions", False))
    image_tokens = bool(getattr(model, "reads_image_tokens", False))
    return DataContext(
        image_size=getattr(visual, "image_size", defaults.image_size),
        image_mean=tuple(getattr(visual, "image_mean", defaults.image_mean)),
        image_std=tuple(getattr(visual, "image_std", defaults.image_std)),
        region_dim=getattr(model, "visual_dim", None) if regions else None,
        region_classes=getattr(model, "region_classes", None) if regions else None,
        image_token_grid=model.grid_size if image_tokens else None,
        image_codebook_size=model.codebook_size if image_tokens else None,
        **fields,
    )


def data_worker_init(worker_id: int) -> None:  # noqa: ARG001 (DataLoader's worker_init_fn signature)
    """``worker_init_fn`` for every mmptm DataLoader: leave stop signals to the training process.

    Schedulers (SLURM, Kubernetes, ``kill -TERM -<pgid>``) send SIGTERM to every
    process of a job. A DataLoader worker that died of it would make the loader
    raise in the trainer before it could write its checkpoint; ignoring the
    signal here lets the trainer finish its step, checkpoint and shut the
    workers down itself (a worker also exits on its own when its parent is gone).
    Python's exit stops daemonic children with SIGTERM too, so the streams stop
    theirs before that (:class:`~mmptm.data_pipelines.streams.EpochStream`).
    """
    import signal

    for name in ("SIGTERM", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
