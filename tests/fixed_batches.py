"""A dataset for multi-process tests, loaded with ``--import``: the same global batches however many ranks.

Step ``s`` draws one global batch of ``global_batch`` image-caption pairs from
seed ``s``; rank ``r`` of ``w`` yields rows ``[r * B, (r + 1) * B)`` with
``B = global_batch // w``. One process therefore sees exactly what all ranks of
a multi-process run see together, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

import mmptm
from mmptm.data_pipelines.context import DataContext

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@mmptm.register_dataset("fixed_global_batches")
class FixedGlobalBatches:
    def __init__(self, context: DataContext, global_batch: int = 16, steps_per_epoch: int = 1000) -> None:
        if global_batch % context.world_size:
            raise ValueError(f"global_batch {global_batch} is not divisible by {context.world_size} ranks")
        self.context = context
        self.global_batch = global_batch
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ctx = self.context
        local = self.global_batch // ctx.world_size
        for step in range(self.steps_per_epoch):
            generator = torch.Generator().manual_seed(self.epoch * self.steps_per_epoch + step)
            images = torch.randn(self.global_batch, 3, ctx.image_size, ctx.image_size, generator=generator)
            labels = torch.randint(len(WORDS), (self.global_batch,), generator=generator)
            captions = [f"a handwritten {WORDS[i]}." for i in labels.tolist()]
            rows = slice(ctx.rank * local, (ctx.rank + 1) * local)
            yield {"image": images[rows], "text": ctx.tokenizer(captions[rows]), "skipped": 0}
