"""Image preprocessing for the vision towers, as open_clip's ``image_transform``."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def _to_rgb(image: Image.Image) -> Image.Image:
    # Training converts before its uint8 crop/resize; evaluation after the geometry, as open_clip.
    return image if image.mode == "RGB" else image.convert("RGB")


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """The box ``(left, top, right, bottom)`` of a random crop, drawn as torchvision's ``RandomResizedCrop``.

    Szegedy et al. 2015, "Going Deeper with Convolutions", sec. 6 (the "Inception" crop):
    an area fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``;
    up to 10 tries for a crop that fits, else the largest centred crop within
    ``ratio``. The same distribution as torchvision's, drawn from ``rng`` with
    plain Python arithmetic (torchvision's tiny torch ops cost more than the resize).
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class ImageTransform:
    """PIL image (any mode) -> normalised float tensor ``[3, S, S]``: the train or eval transform of a tower.

    Training takes a random crop of ``scale`` of the area and aspect ``ratio``
    (:func:`random_resized_crop_box`), resized to ``S`` by torch's antialiased
    bicubic kernel on the uint8 pixels (PIL's filter; results within 2 of 255
    levels of PIL's resize, 2-3x faster); evaluation resizes the shorter side to ``S`` and takes the centre crop
    (torchvision's ``Resize`` + ``CenterCrop``, then conversion to RGB: bit for bit open_clip's, for
    images of any mode). There
    is no horizontal flip: text and digits in images are not flip-invariant.
    The uint8 pixels become normalised floats in one fused pass (what
    ``ToTensor`` + ``Normalize`` do in five), or with ``uint8`` stay uint8 for
    the model to normalise on its device (:func:`normalize_pixels` is that step):
    a quarter of the bytes to collate, pin and copy, and no float work in the
    data workers.

    Args:
        image_size: side ``S`` of the square output.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by.
        training: random crops (True) or the deterministic resize + centre crop (False).
        scale: area range of the random crop, as a fraction of the image.
        ratio: aspect ratio range of the random crop.
        uint8: return the uint8 pixels ``[3, S, S]``, not normalised.
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        training: bool,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        uint8: bool = False,
    ) -> None:
        self.image_size = image_size
        self.training = training
        self.uint8 = uint8
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.gain, self.offset = normalization_affine(mean, std)
        self._eval_geometry = None
        if not training:
            # Imported here: torchvision takes seconds to import, and configs are validated without it.
            from torchvision import transforms as T
            from torchvision.transforms import InterpolationMode

            self._eval_geometry = T.Compose(
                [T.Resize(image_size, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(image_size)]
            )

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """Transform ``image``, drawing a training crop from ``rng``.

        Args:
            image: a PIL image of any mode.
            rng: the stream's generator, so that augmentation is a function of the run's seed,
                epoch, worker and position (default: Python's global one, which DataLoader seeds per worker).
        """
        if self._eval_geometry is not None:
            # Resize + crop first, then RGB, in open_clip's order: a palette (P) image is then resampled
            # by PIL's nearest filter and an RGBA one keeps its alpha until the crop, as in open_clip.
            image = _to_rgb(self._eval_geometry(image))
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # writable HWC copy
        else:
            image = _to_rgb(image)
            left, top, right, bottom = random_resized_crop_box(*image.size, self.scale, self.ratio, rng or random)
            # The crop as a view of the HWC uint8 pixels, resampled by torch's uint8 antialiased bicubic
            # kernel (PIL's filter, a = -0.5; vectorised, 2-3x faster than PIL's resize; within 2 levels
            # of it), which reads channels-last input as is.
            crop = torch.from_numpy(np.array(image))[top:bottom, left:right].permute(2, 0, 1)
            size = (self.image_size, self.image_size)
            pixels = F.interpolate(crop[None], size=size, mode="bicubic", antialias=True)[0]
        return pixels if self.uint8 else torch.addcmul(self.offset, pixels.float(), self.gain)


def normalization_affine(
    mean: Sequence[float], std: Sequence[float], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gain, offset)``, each ``[3, 1, 1]``, with ``(x / 255 - mean) / std = x * gain + offset``."""
    gain = torch.tensor([1 / (255 * s) for s in std], device=device).view(3, 1, 1)
    offset = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], device=device).view(3, 1, 1)
    return gain, offset


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 pixels ``[..., 3, H, W]`` -> what :class:`ImageTransform` returns without ``uint8``, bit for bit."""
    gain, offset = normalization_affine(mean, std, pixels.device)
    return torch.addcmul(offset, pixels.float(), gain)


def image_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    training: bool,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    uint8: bool = False,
) -> ImageTransform:
    """Build the train or eval transform of a vision tower (see :class:`ImageTransform` for the arguments).

    Returns:
        A callable mapping a PIL image (any mode), and optionally a ``random.Random``
        for the training crop, to a float tensor ``[3, image_size, image_size]`` (``uint8``: uint8 pixels).
    """
    return ImageTransform(image_size, mean, std, training, scale, ratio, uint8)
