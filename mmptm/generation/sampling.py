"""Sampling image tokens from a token decoder: KV cache, temperature, top-k, top-p, classifier-free guidance.

Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", sec. 2.3: the
transformer samples the image tokens one at a time given the caption; many
candidates are drawn per caption and reranked (:mod:`mmptm.generation.pipeline`).
Filtering follows Holtzman et al. 2020 ("The Curious Case of Neural Text
Degeneration": top-k and nucleus / top-p sampling); guidance follows Ho &
Salimans 2021 ("Classifier-Free Diffusion Guidance"), as autoregressive
image token models use it (Gafni et al. 2022, "Make-A-Scene"): the logits
are ``uncond + scale * (cond - uncond)``, the unconditional ones given the
empty (all-padding) caption the decoder was trained to see with the
objective's ``text_dropout``.

Every random draw goes through a caller's ``torch.Generator``, so a seed fixes
the samples; with and without the KV cache the model computes the same logits
(to float rounding), so a seed gives the same tokens either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmptm.encoders.dalle import KVCache, TokenDecoder


@dataclass(frozen=True)
class SamplingOptions:
    """How each image token is drawn from the decoder's logits.

    Attributes:
        temperature: logits are divided by it (0: greedy, the most likely token).
        top_k: keep the k most likely tokens (None: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches p (None or 1: all).
        guidance_scale: classifier-free guidance, ``uncond + scale * (cond - uncond)`` (None: off;
            the decoder must have been trained with ``text_dropout`` for it to mean anything).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    guidance_scale: float | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Logits with all but the ``k`` largest of each row set to ``-inf`` (ties with the k-th are kept).

    Args:
        logits: ``[..., V]``.
        k: tokens kept per row (None or >= V: all).
    """
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filtering: keep each row's smallest set of most likely tokens whose probability reaches ``p``.

    A token is kept when the probability of the tokens ranked above it is below
    ``p``, so the most likely token is always kept.

    Args:
        logits: ``[..., V]``.
        p: the probability mass to keep (None or 1: all).
    """
    if p is None or p >= 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs
    remove = (mass_above >= p).scatter(-1, order, mass_above >= p)
    return logits.masked_fill(remove, float("-inf"))


def sample_from_logits(
    logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token per row of ``logits [B, V]``: temperature, top-k, top-p, then a multinomial draw.

    Returns:
        ``LongTensor[B]``.
    """
    if options.temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits.float() / options.temperature, options.top_k), options.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def next_image_logits(
    model: TokenDecoder, text_ids: torch.Tensor, tokens: torch.Tensor, cache: KVCache | None
) -> torch.Tensor:
    """Logits ``[B, codebook_size]`` of the image token after ``tokens`` given the caption ``text_ids``.

    With a cache, only the positions not yet in it go through the transformer:
    the whole caption at the first call, then the one token sampled last. Without
    one the whole sequence is recomputed (the reference the cache must equal).
    """
    decoded = tokens.shape[1]
    if cache is None:
        x = torch.cat([model.embed_text(text_ids), model.embed_image(tokens)], dim=1)
        states = model.hidden(x)
    elif decoded == 0:
        states = model.hidden(model.embed_text(text_ids), cache, start=0)
    else:
        last = model.embed_image(tokens[:, -1:], start=decoded - 1)
        states = model.hidden(last, cache, start=model.text_length + decoded - 1)
    return model.image_head(states[:, -1]).float()


@torch.no_grad()
def sample_image_tokens(
    model: TokenDecoder,
    text: torch.Tensor,
    options: SamplingOptions | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Sample a whole image's tokens for each caption of a batch.

    Args:
        model: the token decoder (eval mode).
        text: ``[B, L <= text_length]`` tokenizer rows, one caption per image to sample
            (repeat a caption to draw several images of it).
        options: temperature, top-k, top-p, guidance (default: plain sampling at temperature 1).
        generator: the source of every random draw (None: torch's global one).
        use_cache: reuse keys and values of decoded positions (False: recompute the sequence for
            every token, only useful as the reference).

    Returns:
        ``LongTensor[B, grid_size ** 2]``, row-major.
    """
    options = options or SamplingOptions()
    text_ids = model.text_ids(text)
    batch = text_ids.shape[0]
    guided = options.guidance_scale is not None
    if guided:  # the unconditional rows follow the conditional ones and receive the same tokens
        text_ids = torch.cat([text_ids, model.text_ids(model.null_text(batch, text_ids.device))])
    cache = model.new_cache(len(text_ids)) if use_cache else None
    tokens = text_ids.new_empty(len(text_ids), 0)
    for _ in range(model.num_image_tokens):
        logits = next_image_logits(model, text_ids, tokens, cache)
        if guided:
            conditional, unconditional = logits.chunk(2)
            logits = unconditional + options.guidance_scale * (conditional - unconditional)
        token = sample_from_logits(logits, options, generator)
        tokens = torch.cat([tokens, token.repeat(2 if guided else 1)[:, None]], dim=1)
    return tokens[:batch]
