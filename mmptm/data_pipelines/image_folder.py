"""Labelled images from a folder with one subfolder per class (the ImageNet / torchvision ``ImageFolder`` layout).

``root/<class>/**/<image>.(jpg|jpeg|png|webp)`` in any letter case; the label
of an image is the index of its class folder among the sorted subfolders of
``root``, as torchvision's ``ImageFolder`` numbers them. An unreadable image is
skipped, counted and logged like a bad shard sample (its id:
``"<root>#<class>/<file>"``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import IterableDataset

from mmptm.data_pipelines.context import DataContext
from mmptm.data_pipelines.shards import IMAGE_EXTENSIONS
from mmptm.data_pipelines.streams import (
    BadSample,
    Batch,
    EpochStream,
    Skip,
    batch_samples,
    check_stream_options,
    collate_samples,
    decode_image,
    derive_seed,
    worker_slot,
)
from mmptm.data_pipelines.transforms import image_transform
from mmptm.registry import register_dataset


def folder_classes(root: str | Path) -> list[str]:
    """The class names of an image folder: its subfolders, sorted.

    Raises:
        FileNotFoundError: ``root`` is not a folder, or it has no subfolder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder '{root}' does not exist")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"image folder '{root}' has no class subfolders (expected {root}/<class>/<image>)")
    return classes


def folder_images(root: str | Path) -> list[tuple[str, int]]:
    """Every image of an image folder as ``(path relative to root, label)``, by class then path.

    Raises:
        FileNotFoundError: no class subfolder, or no image in any of them.
    """
    root = Path(root)
    images = []
    for label, name in enumerate(folder_classes(root)):
        files = sorted(path for path in (root / name).rglob("*") if path.suffix.lower()[1:] in IMAGE_EXTENSIONS)
        images += [(path.relative_to(root).as_posix(), label) for path in files if path.is_file()]
    if not images:
        raise FileNotFoundError(f"image folder '{root}' has no images ({'|'.join(IMAGE_EXTENSIONS)}) in its subfolders")
    return images


class _ImageFolderPipeline(IterableDataset):
    """One worker's share of the folder's images, decoded and batched, for the epoch set in ``epoch``."""

    def __init__(
        self,
        root: Path,
        images: list[tuple[str, int]],
        transform: Callable[[Image.Image], torch.Tensor],
        context: DataContext,
        batch_size: int,
        drop_last: bool,
    ) -> None:
        super().__init__()
        self.root = root
        self.images = images
        self.transform = transform
        self.context = context
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.epoch = 0

    def _load(self, relative: str, label: int) -> dict[str, object] | Skip:
        try:
            data = (self.root / relative).read_bytes()
        except OSError as err:
            return Skip(str(self.root), relative, f"unreadable file: {err!r}")
        try:
            image = decode_image(data, Path(relative).suffix.lower()[1:])
        except BadSample as err:
            return Skip(str(self.root), relative, str(err))
        return {"image": self.transform(image), "label": label, "key": relative}

    def __iter__(self) -> Iterator[Batch]:
        images = list(self.images)
        if self.context.training:
            random.Random(derive_seed("images", self.context.seed, self.epoch)).shuffle(images)
        slot = worker_slot(self.context)
        items = (self._load(relative, label) for relative, label in images[slot.slot :: slot.num_slots])
        return batch_samples(items, self.batch_size, self.drop_last, collate_samples)


@register_dataset("image_folder")
def image_folder(
    context: DataContext,
    root: str,
    batch_size: int = 256,
    num_workers: int = 2,
    augment_scale: tuple[float, float] = (0.9, 1.0),
    drop_last: bool | None = None,
) -> EpochStream:
    """Labelled image batches from a folder with one subfolder per class (ImageNet layout).

    Batches are ``{"image": [B,3,H,W], "label": [B], "key": [str] (paths
    relative to root), "skipped": int, "skipped_keys": [str]}``, and possibly a
    last ``{"empty": True, "skipped": n, "skipped_keys": [...]}`` per worker.
    The images are split between the workers of all ranks; training shuffles
    them anew each epoch.

    Args:
        context: image size and normalisation, training flag, seed, rank, world size.
        root: the folder; its sorted subfolder names are the classes (see :func:`folder_classes`).
        batch_size: images per batch.
        num_workers: DataLoader worker processes (0: in this process).
        augment_scale: area range of the training random crop.
        drop_last: drop each worker's final partial batch (default: ``context.training``).

    Returns:
        An :class:`~mmptm.data_pipelines.streams.EpochStream`.

    Raises:
        FileNotFoundError: a missing folder, or one without class subfolders or images.
        ValueError: invalid options.
    """
    check_stream_options("image_folder", batch_size, num_workers)
    pipeline = _ImageFolderPipeline(
        Path(root),
        folder_images(root),
        image_transform(context.image_size, context.image_mean, context.image_std, context.training, augment_scale),
        context,
        batch_size,
        context.training if drop_last is None else drop_last,
    )
    return EpochStream(pipeline, num_workers)
