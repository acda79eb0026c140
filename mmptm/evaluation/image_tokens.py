"""Reconstruction quality and codebook use of a discrete image tokenizer (``dvae``, ``vqvae``)."""

from __future__ import annotations

from typing import Any

import torch

from mmptm.encoders.dvae import ImageTokenizer, codebook_statistics
from mmptm.evaluation.common import CountingStream, EvalContext, EvaluationError, autocast_context
from mmptm.registry import DATASETS, build, register_evaluator
from mmptm.training.distributed import unwrap_model


@register_evaluator("dvae_reconstruction")
def dvae_reconstruction(
    model: Any,
    context: EvalContext,
    data: str = "demo:val",
    batch_size: int = 256,
    num_workers: int = 0,
) -> dict[str, float]:
    """Pixel MSE of ``decode_tokens(encode_tokens(images))`` and the codebook's perplexity and usage.

    The tokens are the hard (argmax / nearest-entry) tokens that ``mmptm tokenizer images`` writes,
    so the error is that of the images a token decoder's samples can become.

    Args:
        model: a ``dvae`` or ``vqvae``.
        context: the trainer's evaluation context (its data context yields [0, 1] images for these models).
        data: image shards (the ``image_text`` layout).
        batch_size: images per batch.
        num_workers: DataLoader workers.

    Returns:
        ``dvae_recon_mse`` (mean squared error per pixel value, pixels in [0, 1]),
        ``dvae_perplexity`` (exp of the entropy of the token histogram over all images),
        ``dvae_codebook_usage`` (fraction of entries used), ``dvae_num_images``, ``dvae_skipped_samples``.
    """
    tokenizer = unwrap_model(model)
    if not isinstance(tokenizer, ImageTokenizer):
        raise EvaluationError(f"dvae_reconstruction evaluates a dvae or vqvae model, not {type(tokenizer).__name__}")
    stream = CountingStream(
        build(DATASETS, {"name": "image_text", "shards": data, "batch_size": batch_size, "num_workers": num_workers},
              context=context.data)
    )
    squared_error, pixel_values, tokens = 0.0, 0, []
    with torch.no_grad(), autocast_context(context.autocast):
        for batch in context.batches(stream, "dvae reconstruction"):
            images = batch["image"].to(context.device)
            batch_tokens = tokenizer.encode_tokens(images)
            reconstructed = tokenizer.decode_tokens(batch_tokens)
            squared_error += float((reconstructed.float() - images.float()).pow(2).sum())
            pixel_values += images.numel()
            tokens.append(batch_tokens.cpu())
    if not tokens:
        raise stream.no_samples_error("images")
    perplexity, usage = codebook_statistics(torch.cat(tokens), tokenizer.codebook_size)
    return {
        "dvae_recon_mse": squared_error / pixel_values,
        "dvae_perplexity": float(perplexity),
        "dvae_codebook_usage": float(usage),
        "dvae_num_images": float(sum(len(t) for t in tokens)),
        "dvae_skipped_samples": float(stream.skipped),
    }
