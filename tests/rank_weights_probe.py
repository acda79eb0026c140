"""An objective for multi-process tests, loaded with ``--import``: it saves each rank's weights and adds no loss.

``rank_weights_probe`` writes the wrapped model's state dict, as this rank sees it
before the step's update, to ``<folder>/rank<r>_call<n>.pt``; a test compares the
ranks' files to check that DDP kept their weights equal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import mmptm
from mmptm.training.distributed import unwrap_model


@mmptm.register_objective("rank_weights_probe")
class RankWeightsProbe(nn.Module):
    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.calls = 0

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:  # noqa: ARG002
        self.calls += 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        weights = {k: v.detach().cpu().clone() for k, v in unwrap_model(model).state_dict().items()}
        torch.save(weights, self.folder / f"rank{rank}_call{self.calls}.pt")
        return {"loss": torch.zeros(())}
