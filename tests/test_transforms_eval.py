"""The eval image transform is open_clip's preprocess for images of any mode (palette, RGBA, greyscale)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmptm.data_pipelines.transforms import image_transform
from mmptm.encoders.vision import OPENAI_MEAN, OPENAI_STD

open_clip = pytest.importorskip("open_clip")


def images_of_every_mode() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (61, 93, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (61, 93, 1), dtype=np.uint8)
    base = Image.fromarray(rgb)
    return {
        "RGB": base,
        "L": base.convert("L"),
        "P": base.convert("P"),
        "RGBA": Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA"),
        "LA": Image.fromarray(np.concatenate([rgb[..., :1], alpha], -1).squeeze(), "LA"),
        "tall P": base.convert("P").transpose(Image.Transpose.ROTATE_90),
    }


@pytest.mark.parametrize("size", [32, 48])
@pytest.mark.parametrize("mode", list(images_of_every_mode()))
def test_eval_transform_is_open_clips_preprocess(size, mode):
    image = images_of_every_mode()[mode]
    # open_clip's preprocess with mean 0 / std 1 gives the pixels / 255: ours as uint8 must be them exactly.
    reference_pixels = open_clip.image_transform(size, is_train=False, mean=(0.0,) * 3, std=(1.0,) * 3)(image)
    pixels = image_transform(size, OPENAI_MEAN, OPENAI_STD, training=False, uint8=True)(image)
    assert torch.equal(pixels, (reference_pixels * 255).round().to(torch.uint8))
    # Normalised: the same up to float rounding (one fused multiply-add instead of ToTensor + Normalize).
    preprocess = open_clip.image_transform(size, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    ours = image_transform(size, OPENAI_MEAN, OPENAI_STD, training=False)(image)
    torch.testing.assert_close(ours, preprocess(image), atol=1e-6, rtol=0)
