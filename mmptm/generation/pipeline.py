"""From captions to images: tokenise, sample, decode, rerank with CLIP, write PNGs.

Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", sec. 2.3: the token
decoder draws several candidate images per caption, and a contrastive model
(CLIP) reranks them by the similarity of each image to the caption. The CLIP
scores the images exactly as it would score them read from the PNG files
written here: rounded to 8 bits, then its own eval transform.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmptm.config import ConfigError
from mmptm.encoders.dalle import TokenDecoder
from mmptm.evaluation.common import encode_images, encode_texts, evaluating
from mmptm.generation.sampling import SamplingOptions, sample_image_tokens
from mmptm.models import Pretrained, load_pretrained


class GenerationError(ValueError):
    """Bad generation input (a prompt, a language, a checkpoint of the wrong kind); the message says what to fix."""


def load_token_decoder(path: str | Path, device: str = "cpu") -> Pretrained:
    """``load_pretrained`` of a token decoder checkpoint with an image tokenizer, or a clear error.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        GenerationError: not a token decoder, no image tokenizer, or weights that do not fit the
            model its config and tokenizer describe (e.g. a replaced ``tokenizer.model``).
    """
    try:
        pretrained = load_pretrained(path, device=device)
    except ConfigError:
        raise
    except ValueError as err:
        raise GenerationError(
            f"checkpoint {path} does not load: {err}. The tokenizer stored with it must be the one the model "
            "was trained with: its vocabulary sets the model's text embedding"
        ) from None
    model = pretrained.model
    if not isinstance(model, TokenDecoder):
        raise GenerationError(
            f"checkpoint {path} holds a {type(model).__name__} model; generating images needs a token decoder "
            "(model name 'dalle')"
        )
    if model.dvae is None:
        raise GenerationError(f"checkpoint {path}: the token decoder has no image tokenizer (model.dvae) to "
                              "turn tokens into images")
    return pretrained


def load_clip(path: str | Path, device: str = "cpu") -> Pretrained:
    """``load_pretrained`` of a dual encoder (``encode_image`` and ``encode_text``), or a clear error."""
    pretrained = load_pretrained(path, device=device)
    if not all(hasattr(pretrained.model, name) for name in ("encode_image", "encode_text")):
        raise GenerationError(
            f"checkpoint {path} holds a {type(pretrained.model).__name__} model; reranking needs a CLIP-style "
            "dual encoder (encode_image, encode_text)"
        )
    return pretrained


def tokenize_prompts(model: TokenDecoder, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Token rows ``[len(prompts), text_length]`` of the captions, refusing what the model cannot read.

    Raises:
        GenerationError: an empty prompt, a prompt longer than ``model.text_length`` tokens, or a
            tokenizer whose vocabulary or padding id is not the model's.
    """
    if tokenizer.vocab_size != model.vocab_size or tokenizer.pad_id != model.pad_id:
        raise GenerationError(
            f"the tokenizer ({tokenizer.vocab_size} ids, pad id {tokenizer.pad_id}) does not match the token "
            f"decoder's text vocabulary ({model.vocab_size} ids, pad id {model.pad_id})"
        )
    for prompt in prompts:
        if not prompt.strip():
            raise GenerationError("the prompt is empty: give the caption of the image to generate")
    # One position more than the model reads: a caption fits when that position is still padding
    # (by the model's own rule, as training reads captions).
    rows = tokenizer(list(prompts), context_length=model.text_length + 1)
    too_long = (~model.padding(rows)[:, -1]).nonzero().flatten().tolist()
    if too_long:
        raise GenerationError(
            f"the prompt '{prompts[too_long[0]]}' is longer than the {model.text_length} caption tokens "
            "(bos and eos included) the model reads"
        )
    return rows[:, :-1]


@torch.no_grad()
def generate_images(
    model: TokenDecoder,
    tokenizer: Any,
    prompts: Sequence[str],
    num_per_prompt: int,
    options: SamplingOptions | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Sample ``num_per_prompt`` images for each prompt.

    Args:
        model: the token decoder, with its image tokenizer.
        tokenizer: its text tokenizer.
        prompts: captions.
        num_per_prompt: images per caption.
        options: how tokens are drawn.
        generator: the source of every random draw (on the model's device).
        batch_size: images sampled together.

    Returns:
        ``[len(prompts) * num_per_prompt, 3, H, W]`` float images in [0, 1] on the CPU, prompt-major.
    """
    if num_per_prompt < 1 or batch_size < 1:
        raise GenerationError(f"num_per_prompt and batch_size must be >= 1, got {num_per_prompt}, {batch_size}")
    device = model.text_position_embedding.device
    rows = tokenize_prompts(model, tokenizer, prompts).repeat_interleave(num_per_prompt, dim=0)
    images = []
    with evaluating(model):
        for chunk in rows.split(batch_size):
            tokens = sample_image_tokens(model, chunk.to(device), options, generator)
            images.append(model.decode_images(tokens).float().cpu())
    return torch.cat(images)


def to_pil_images(images: torch.Tensor) -> list[Image.Image]:
    """``[N, 3, H, W]`` images in [0, 1] -> RGB PIL images, rounded to 8 bits as PNG files store them."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(image), mode="RGB") for image in pixels]


@torch.no_grad()
def clip_image_features(
    clip: Pretrained, images: torch.Tensor, device: torch.device | str = "cpu", batch_size: int = 256
) -> torch.Tensor:
    """L2-normalised CLIP embeddings ``[N, D]`` of generated ``[N, 3, H, W]`` images in [0, 1].

    Each image goes through what a PNG of it would: 8-bit rounding, then CLIP's eval transform.
    """
    features = []
    pil = to_pil_images(images)
    with evaluating(clip.model):
        for start in range(0, len(pil), batch_size):
            batch = torch.stack([clip.preprocess(image) for image in pil[start : start + batch_size]])
            features.append(encode_images(clip.model, batch, device))
    return torch.cat(features)


@torch.no_grad()
def clip_prompt_scores(
    clip: Pretrained, image_features: torch.Tensor, prompts: Sequence[str], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Cosine similarity ``[N]`` of each image's CLIP embedding with its own prompt's (one prompt per image)."""
    unique = list(dict.fromkeys(prompts))
    with evaluating(clip.model):
        texts = encode_texts(clip.model, clip.tokenizer, unique, device)
    index = torch.tensor([unique.index(prompt) for prompt in prompts], device=texts.device)
    return (image_features.to(texts.device) * texts[index]).sum(dim=-1)


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None) -> Path:
    """Write ``[N, 3, H, W]`` images in [0, 1] as one PNG grid (2-pixel white gutters), row by row.

    Args:
        images: the images, in the order to show them.
        path: the PNG to write (parent folders are created).
        columns: images per row (default: ``ceil(sqrt(N))``).
    """
    from torchvision.utils import make_grid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = columns or math.ceil(math.sqrt(len(images)))
    grid = make_grid(images.float().clamp(0, 1), nrow=columns, padding=2, pad_value=1.0)
    to_pil_images(grid[None])[0].save(path)
    return path


def save_images(images: torch.Tensor, directory: str | Path) -> list[Path]:
    """Write each image as ``DIRECTORY/000.png``, ``001.png``, ... in order; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(to_pil_images(images)):
        paths.append(directory / f"{i:03d}.png")
        image.save(paths[-1])
    return paths
