"""Which objectives a mixed run trains on each micro-step: all of them, in turn, or drawn by ratio.

A run that mixes objectives over different data streams (Devlin et al.-style
multi-task pretraining; XLM's alternation of MLM and TLM batches, Lample &
Conneau 2019, sec. 3.3) either sums every objective's loss in every micro-step
(``all``), cycles through them (``round_robin``), or draws one per micro-step
with probability proportional to its ``ratio`` (``proportional``). The draw
depends only on the run's seed and the micro-step's index, so a resumed run
draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

ObjectiveSampling = Literal["all", "round_robin", "proportional"]


def objectives_for_draw(mode: ObjectiveSampling, ratios: Sequence[float], seed: int, draw: int) -> list[int]:
    """The indices of the objectives that run in one micro-step.

    Args:
        mode: ``all`` (every objective), ``round_robin`` (objective ``draw mod n``) or
            ``proportional`` (one objective, drawn with probability ``ratio_i / sum(ratios)``).
        ratios: one positive sampling ratio per objective (read by ``proportional`` only).
        seed: the run's seed.
        draw: the micro-step's global index, ``step * grad_accum_steps + micro``.

    Returns:
        Sorted objective indices.
    """
    count = len(ratios)
    if mode == "all":
        return list(range(count))
    if mode == "round_robin":
        return [draw % count]
    if mode == "proportional":
        probs = np.asarray(ratios, dtype=np.float64)
        return [int(np.random.default_rng([seed, draw]).choice(count, p=probs / probs.sum()))]
    raise ValueError(f"unknown objective sampling {mode!r}; choices: all, round_robin, proportional")
