"""Train a contrastive model for a modality mmptm does not ship: 1-D pulse-train signals.

This module registers, from outside mmptm, an encoder for raw 1-D signals and a
dataset that synthesises them (a signal with k pulses, captioned "a signal with
k pulses."), then `mmptm train` trains the signal encoder contrastively against
mmptm's text transformer, without any edit to mmptm:

    mmptm train examples/custom_encoder.yaml --import examples/custom_encoder.py

The signal tower plugs into the ``vision`` slot of the ``clip`` dual encoder;
its ``input_key = "signal"`` tells the contrastive objective which batch entry
it reads.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from num2words import num2words
from torch import nn

import mmptm
from mmptm.data_pipelines.context import DataContext

TEMPLATES = ("a signal with {} pulses.", "{} pulses in a row.", "a recording of {} pulses.")


@mmptm.register_encoder("pulse_conv")
class PulseSignalEncoder(nn.Module):
    """A 1-D convolutional encoder: [B, signal_length] -> [B, embed_dim].

    Args:
        embed_dim: joint embedding size (filled in from the model).
        signal_length: samples per signal.
        channels: width of the convolutions.
        layers: number of stride-2 convolution blocks.
    """

    input_key = "signal"

    def __init__(self, embed_dim: int, signal_length: int = 256, channels: int = 32, layers: int = 4) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        in_channels = 1
        for _ in range(layers):
            blocks += [nn.Conv1d(in_channels, channels, kernel_size=9, stride=2, padding=4), nn.GELU()]
            in_channels = channels
        self.convs = nn.Sequential(*blocks)
        # Counting pulses needs where they are, not only whether they exist: keep a coarse position axis.
        self.pool = nn.AdaptiveAvgPool1d(8)
        self.proj = nn.Linear(channels * 8, embed_dim)
        self.signal_length = signal_length

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """The encoder is small; activations are cheap to keep, so checkpointing is a no-op by design."""

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.convs(signal.unsqueeze(1)))
        return self.proj(features.flatten(1))


class PulseTrainStream:
    """Endless synthetic batches ``{"signal", "text", "count"}``; each epoch is ``batches_per_epoch`` batches."""

    def __init__(
        self, context: DataContext, batch_size: int, signal_length: int, batches_per_epoch: int, noise: float
    ) -> None:
        self.context, self.batch_size, self.signal_length = context, batch_size, signal_length
        self.batches_per_epoch, self.noise = batches_per_epoch, noise
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def signal(self, count: int, generator: torch.Generator) -> torch.Tensor:
        signal = self.noise * torch.randn(self.signal_length, generator=generator)
        slots = torch.randperm(self.signal_length // 16, generator=generator)[:count].sort().values
        for slot in slots.tolist():
            signal[slot * 16 : slot * 16 + 6] += 1.0
        return signal

    def __iter__(self) -> Iterator[dict[str, object]]:
        seed = self.context.seed * 1_000_003 + self.epoch * 101 + self.context.rank
        generator = torch.Generator().manual_seed(seed)
        for _ in range(self.batches_per_epoch):
            counts = torch.randint(1, 10, (self.batch_size,), generator=generator)
            templates = torch.randint(len(TEMPLATES), (self.batch_size,), generator=generator)
            captions = [TEMPLATES[t].format(num2words(int(c))) for c, t in zip(counts, templates, strict=True)]
            yield {
                "signal": torch.stack([self.signal(int(c), generator) for c in counts]),
                "text": self.context.tokenizer(captions),
                "count": counts,
                "skipped": 0,
            }


@mmptm.register_dataset("pulse_trains")
def pulse_trains(
    context: DataContext,
    batch_size: int = 64,
    signal_length: int = 256,
    batches_per_epoch: int = 50,
    noise: float = 0.1,
) -> PulseTrainStream:
    """Synthetic 1-D signals with 1-9 pulses, captioned with the count in words."""
    return PulseTrainStream(context, batch_size, signal_length, batches_per_epoch, noise)
