"""Training the discrete image tokenizers: the dVAE's annealed evidence lower bound and the VQ-VAE loss.

DALL-E's dVAE (Ramesh et al. 2021, sec. 2.1, appendix A.2) maximises the
evidence lower bound with a KL weight beta raised from 0 to 6.6 over the first
updates, while the Gumbel-softmax temperature is annealed from 1 to 1/16 (both
on a cosine schedule in the paper). The VQ-VAE (van den Oord et al. 2017, eq. 3)
minimises reconstruction plus ``commitment_weight * ||z_e - sg(e)||^2``; its EMA
codebook needs no loss term.

The schedules read the model's ``step`` buffer (training batches seen), which
this objective advances and which checkpoints keep, so a resumed run continues
them where it stopped. With ``train.grad_accum_steps > 1`` a step of the
schedules is one accumulated batch, not one optimizer step.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from mmptm.encoders.dvae import DiscreteVAE, ImageTokenizer, codebook_statistics
from mmptm.registry import register_objective
from mmptm.training.distributed import unwrap_model

Schedule = Literal["cosine", "linear", "exponential"]


def anneal(step: int, start: float, end: float, steps: int, schedule: Schedule) -> float:
    """A value moved from ``start`` (step 0) to ``end`` (step ``steps`` and after).

    Args:
        step: the training step.
        start / end: the values at step 0 and at ``steps``.
        steps: length of the schedule (0: ``end`` at once).
        schedule: ``cosine`` (half a cosine, flat at both ends), ``linear``, or ``exponential``
            (geometric interpolation; both values must be positive).

    Returns:
        The value at ``step``.
    """
    progress = 1.0 if steps <= 0 else min(max(step, 0) / steps, 1.0)
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "exponential":
        if start <= 0 or end <= 0:
            raise ValueError(f"an exponential schedule needs positive values, got {start} -> {end}")
        return start * (end / start) ** progress
    raise ValueError(f"unknown schedule '{schedule}'; choices: cosine, linear, exponential")


@register_objective("image_tokenizer")
class ImageTokenizerLoss(nn.Module):
    """Reconstruction loss of a ``dvae`` (with the annealed KL to the uniform prior) or a ``vqvae``.

    Both terms are means per pixel value (the KL summed over the grid, divided by
    the number of pixel values), so for the logit-Laplace likelihood the loss is
    the negative ELB of the paper up to a constant factor and ``kl_weight`` is its beta.

    Args:
        temperature_start / temperature_end: the Gumbel-softmax temperature at step 0 and after
            ``temperature_steps`` (DALL-E: 1 -> 1/16 over 150,000 updates).
        temperature_steps: length of the temperature schedule.
        temperature_schedule: ``cosine`` (DALL-E), ``linear`` or ``exponential``.
        kl_weight: the final KL weight beta (DALL-E: 6.6).
        kl_warmup_steps: steps over which beta rises from 0 (DALL-E: 5000).
        kl_schedule: ``cosine`` (DALL-E) or ``linear``.
        straight_through: train the dVAE with hard one-hot codes and the relaxed gradient.
        commitment_weight: the VQ-VAE's commitment weight (the paper's beta: 0.25).
    """

    def __init__(
        self,
        temperature_start: float = 1.0,
        temperature_end: float = 1.0 / 16,
        temperature_steps: int = 150_000,
        temperature_schedule: Schedule = "cosine",
        kl_weight: float = 6.6,
        kl_warmup_steps: int = 5000,
        kl_schedule: Literal["cosine", "linear"] = "cosine",
        straight_through: bool = False,
        commitment_weight: float = 0.25,
    ) -> None:
        super().__init__()
        if temperature_start <= 0 or temperature_end <= 0:
            raise ValueError(f"image_tokenizer: temperatures must be > 0, got {temperature_start} -> {temperature_end}")
        if kl_weight < 0 or commitment_weight < 0:
            raise ValueError("image_tokenizer: kl_weight and commitment_weight must be >= 0")
        if temperature_steps < 0 or kl_warmup_steps < 0:
            raise ValueError("image_tokenizer: temperature_steps and kl_warmup_steps must be >= 0")
        self.temperature_start, self.temperature_end = temperature_start, temperature_end
        self.temperature_steps, self.temperature_schedule = temperature_steps, temperature_schedule
        self.kl_weight, self.kl_warmup_steps, self.kl_schedule = kl_weight, kl_warmup_steps, kl_schedule
        self.straight_through = straight_through
        self.commitment_weight = commitment_weight

    def temperature(self, step: int) -> float:
        """The Gumbel-softmax temperature at ``step``."""
        return anneal(step, self.temperature_start, self.temperature_end, self.temperature_steps,
                      self.temperature_schedule)

    def kl_weight_at(self, step: int) -> float:
        """The KL weight beta at ``step``."""
        return anneal(step, 0.0, self.kl_weight, self.kl_warmup_steps, self.kl_schedule)

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One batch of ``{"image": [B, 3, H, W] in [0, 1]}`` (the ``image_text`` stream with the model's context).

        Returns:
            ``loss``, ``recon_loss``, ``perplexity`` and ``codebook_usage`` (of the batch's argmax tokens),
            and for a dvae ``kl`` (nats per token), ``kl_weight``, ``temperature``; for a vqvae
            ``commitment`` and ``restarted_codes``.

        Raises:
            KeyError: a batch without images (such as an ``image_tokens`` stream's), naming its keys.
        """
        tokenizer = unwrap_model(model)
        tokenizer = getattr(tokenizer, "_orig_mod", tokenizer)  # inside torch.compile's wrapper
        if not isinstance(tokenizer, ImageTokenizer):
            raise TypeError(f"image_tokenizer trains a dvae or vqvae model, not {type(tokenizer).__name__}")
        if "image" not in batch:
            raise KeyError(
                f"the image_tokenizer objective needs 'image' in its batches (an image_text stream, whose images "
                f"the model's context leaves in [0, 1]), got {sorted(batch)}"
            )
        images = batch["image"]
        step = int(tokenizer.step)
        metrics: dict[str, torch.Tensor] = {}
        if isinstance(tokenizer, DiscreteVAE):
            temperature = self.temperature(step)
            out = model(images, temperature=temperature, straight_through=self.straight_through)
            recon = tokenizer.reconstruction_loss(images, out.decoded)
            kl = tokenizer.kl_to_uniform(out.logits)  # [B, h, w]
            kl_weight = self.kl_weight_at(step)
            loss = recon + kl_weight * kl.sum((1, 2)).mean() / images[0].numel()
            metrics.update(kl=kl.mean().detach(), kl_weight=torch.tensor(kl_weight, device=images.device),
                           temperature=torch.tensor(temperature, device=images.device))
        else:
            out = model(images)
            recon = tokenizer.reconstruction_loss(images, out.decoded)
            loss = recon + self.commitment_weight * out.commitment
            restarted = torch.tensor(float(out.restarted), device=images.device)
            metrics.update(commitment=out.commitment.detach(), restarted_codes=restarted)
        if tokenizer.training:
            tokenizer.step.add_(1)
        perplexity, usage = codebook_statistics(out.tokens, tokenizer.codebook_size)
        return {"loss": loss, "recon_loss": recon.detach(), "perplexity": perplexity, "codebook_usage": usage,
                **metrics}
