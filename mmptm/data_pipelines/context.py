"""Run-time values a dataset factory needs and that do not come from its config section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DataContext:
    """What the trainer knows when it builds a data stream.

    Attributes:
        tokenizer: callable mapping a list of strings to a LongTensor of token ids.
        image_size: side of the square images the vision tower takes.
        image_mean / image_std: per-channel normalisation stored with the model.
        training: train-time augmentation and shuffling (False: deterministic).
        seed: base seed; streams derive per-epoch, per-rank, per-worker seeds from it.
        rank / world_size: this process's place among the data-parallel processes.
    """

    tokenizer: Any = None
    image_size: int = 224
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    training: bool = True
    seed: int = 0
    rank: int = 0
    world_size: int = 1
