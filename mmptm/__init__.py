"""mmptm: multimodal and multilingual pretraining.

The public API::

    import mmptm

    @mmptm.register_encoder("my_tower")
    class MyTower(torch.nn.Module): ...

    config = mmptm.load_config("clip_tiny.yaml", ["train.max_steps=100"])
    mmptm.train(config, output_dir="runs/demo")
    model, tokenizer, preprocess = mmptm.load_pretrained("runs/demo")
"""

from __future__ import annotations

from typing import Any

from mmptm.config import Config, ConfigError, load_config
from mmptm.models import create_model, load_pretrained
from mmptm.registry import (
    register_dataset,
    register_encoder,
    register_evaluator,
    register_model,
    register_objective,
)

__version__ = "0.1.0"


def train(config: Config, output_dir: Any = None, resume: bool = False) -> dict[str, float]:
    """Train ``config`` (see :class:`mmptm.training.trainer.Trainer`); returns the final eval metrics."""
    from mmptm.training.trainer import train as _train

    return _train(config, output_dir=output_dir, resume=resume)


__all__ = [
    "Config",
    "ConfigError",
    "create_model",
    "load_config",
    "load_pretrained",
    "register_dataset",
    "register_encoder",
    "register_evaluator",
    "register_model",
    "register_objective",
    "train",
]
