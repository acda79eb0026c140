"""Image preprocessing for the vision towers, as open_clip's ``image_transform``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image


def _to_rgb(image: Image.Image) -> Image.Image:
    # Before resizing: palette and 16-bit images resample poorly (or not at all) with bicubic.
    return image if image.mode == "RGB" else image.convert("RGB")


def image_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    training: bool,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Callable[[Image.Image], torch.Tensor]:
    """Build the train or eval transform of a vision tower.

    Training takes a random crop of ``scale`` of the area and aspect ``ratio``,
    resized bicubically to ``image_size``; evaluation resizes the shorter side
    to ``image_size`` and takes the centre crop. There is no horizontal flip:
    text and digits in images are not flip-invariant.

    Args:
        image_size: side of the square output.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by.
        training: random crops (True) or the deterministic resize + centre crop (False).
        scale: area range of the random crop, as a fraction of the image.
        ratio: aspect ratio range of the random crop.

    Returns:
        A callable mapping a PIL image (any mode) to a float tensor ``[3, image_size, image_size]``.
    """
    # Imported here: torchvision takes seconds to import, and configs are validated without it.
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    if training:
        geometry = [T.RandomResizedCrop(image_size, scale=scale, ratio=ratio, interpolation=InterpolationMode.BICUBIC)]
    else:
        geometry = [T.Resize(image_size, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
    return T.Compose([_to_rgb, *geometry, T.ToTensor(), T.Normalize(mean=tuple(mean), std=tuple(std))])


def transform_seeded(transform: Callable[[Image.Image], torch.Tensor], image: Image.Image, seed: int) -> torch.Tensor:
    """``transform(image)`` with torch's random number generator seeded by ``seed`` for the call only.

    torchvision's random augmentations draw from the global generator, whose
    state depends on the process (DataLoader worker seeds, a restored
    checkpoint, whatever else ran). Seeding each sample from the stream's own
    seeded generator makes the augmentation a function of (run seed, epoch,
    worker, position), so a resumed run replays its epoch bit for bit.
    """
    generator = torch.default_generator  # the CPU generator torchvision draws from
    saved = generator.get_state()
    generator.manual_seed(seed)  # not torch.manual_seed: that one also seeds every accelerator, slowly
    try:
        return transform(image)
    finally:
        generator.set_state(saved)
