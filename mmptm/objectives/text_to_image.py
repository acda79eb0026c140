"""The token decoder's objective: next-token cross-entropy over caption and image tokens.

Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation", sec. 2.2: the
transformer is trained to maximise the likelihood of the caption tokens and
then the image tokens, with the cross-entropy of the text weighted 1/8 and of
the image 7/8 ("we are primarily interested in image modeling"). Image tokens
come precomputed (``image_tokens`` batches, ``mmptm tokenizer images``) or from
the model's frozen image tokenizer applied to the batch's images.

For classifier-free guidance at sampling time (Ho & Salimans 2021) a share
``text_dropout`` of the captions is replaced by the empty, all-padding caption,
so the same network also learns the unconditional image distribution; the text
loss leaves those rows out (they hold no caption to model).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmptm.registry import register_objective
from mmptm.training.distributed import unwrap_model


def drop_captions(model: nn.Module, text: torch.Tensor, probability: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each caption row by the model's empty caption with ``probability``.

    Args:
        model: the unwrapped token decoder (``null_text``).
        text: ``[B, L]`` tokenizer rows.
        probability: the share of rows to drop.

    Returns:
        ``(text, dropped)``: the rows, as long as the model's ``text_length``, and a ``[B]`` bool
        mask of the dropped ones.

    Raises:
        ValueError: rows longer than the model's ``text_length`` (as the model itself refuses them).
    """
    model.check_text_shape(text)
    dropped = torch.rand(len(text), device=text.device) < probability
    text = F.pad(text, (0, model.text_length - text.shape[1]), value=model.pad_id)
    return torch.where(dropped[:, None], model.null_text(len(text), text.device), text), dropped


@register_objective("dalle")
class TextToImageLM(nn.Module):
    """Weighted next-token cross-entropy of caption then image tokens (Ramesh et al. 2021, sec. 2.2).

    Args:
        text_weight: weight of the caption tokens' mean cross-entropy (the paper: 1/8).
        image_weight: weight of the image tokens' mean cross-entropy (the paper: 7/8).
        text_dropout: probability of training on the empty caption instead of a sample's own
            (classifier-free guidance; 0: never).
    """

    def __init__(self, text_weight: float = 0.125, image_weight: float = 0.875, text_dropout: float = 0.0) -> None:
        super().__init__()
        if text_weight < 0 or image_weight < 0 or text_weight + image_weight == 0:
            raise ValueError(f"text_weight and image_weight must be >= 0 and not both 0, got {text_weight}, "
                             f"{image_weight}")
        if not 0 <= text_dropout < 1:
            raise ValueError(f"text_dropout must be in [0, 1), got {text_dropout}")
        self.text_weight = text_weight
        self.image_weight = image_weight
        self.text_dropout = text_dropout

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The loss of one batch.

        Args:
            model: the token decoder (possibly wrapped by the trainer).
            batch: ``{"text": [B, L]}`` with ``"image_tokens": [B, N]`` or ``"image": [B, 3, H, W]``.

        Returns:
            ``loss``, ``text_loss``, ``image_loss`` and ``image_acc`` (top-1 of the image tokens).
        """
        decoder = unwrap_model(model)
        if "image_tokens" in batch:
            image_tokens = batch["image_tokens"].long()
        elif "image" in batch:
            image_tokens = decoder.encode_images(batch["image"])
        else:
            raise KeyError(f"the dalle objective needs 'image_tokens' or 'image' in its batches, got {sorted(batch)}")
        text = batch["text"]
        dropped = torch.zeros(len(text), dtype=torch.bool, device=text.device)
        if self.training and self.text_dropout > 0:
            text, dropped = drop_captions(decoder, text, self.text_dropout)
        out = model(text, image_tokens)
        image_logits = out.image_logits.float()
        image_loss = F.cross_entropy(image_logits.flatten(0, 1), image_tokens.flatten())
        per_token = F.cross_entropy(
            out.text_logits.float().flatten(0, 1), out.text_ids[:, 1:].flatten(), reduction="none"
        ).view(len(text), -1)
        kept = (~dropped).float()
        text_loss = (per_token.mean(dim=1) * kept).sum() / kept.sum().clamp_min(1)
        loss = self.text_weight * text_loss + self.image_weight * image_loss
        image_acc = (image_logits.argmax(dim=-1) == image_tokens).float().mean()
        return {
            "loss": loss,
            "text_loss": text_loss.detach(),
            "image_loss": image_loss.detach(),
            "image_acc": image_acc.detach(),
        }
