"""A dual encoder's tower options: start a tower from a checkpoint, keep it frozen, unfreeze it later.

- ``init_from``: the text tower of a multilingual CLIP starts from a text encoder
  that already knows the languages (M-CLIP, Carlsson et al. 2022, sec. 3: a
  pretrained multilingual encoder with a new linear projection; AltCLIP, Chen
  et al. 2022, sec. 3), or from another CLIP's text tower.
- ``frozen`` / ``unfreeze_at_step``: locked-image tuning (LiT, Zhai et al. 2022,
  "LiT: Zero-Shot Transfer with Locked-image text Tuning", sec. 3 and 4.1: a
  pretrained, frozen image tower and a text tower trained to read it), and its
  variant that unlocks the tower after a number of steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import nn

from mmptm.config import TOWER_OPTION_KEYS, TowerOptions
from mmptm.registry import ENCODERS, build


def build_tower(role: str, spec: dict[str, Any], **context: Any) -> tuple[nn.Module, TowerOptions]:
    """Build an encoder from a tower section; the tower options are returned, not applied.

    ``init_from`` is loaded by the trainer (the model's ``init_towers``), not here, so that rebuilding
    a trained model from its saved config does not need the checkpoint it started from.

    Args:
        role: the section's name under ``model`` (``text``, ``vision``), for error messages.
        spec: the section: ``{"name": <encoder>, **encoder options, **tower options}``.
        **context: run-time values (``embed_dim``, tokenizer ids).

    Returns:
        The tower and its :class:`~mmptm.config.TowerOptions`.

    Raises:
        ValueError: a bad encoder option, naming the section.
    """
    spec = dict(spec)
    options = TowerOptions(**{key: spec.pop(key) for key in TOWER_OPTION_KEYS if key in spec})
    try:
        return build(ENCODERS, spec, **context), options
    except ValueError as err:
        raise ValueError(f"model.{role}: {err}") from err


def load_tower_weights(tower: nn.Module, source: str, attribute: str) -> Path:
    """Load a tower's weights from a checkpoint (or run) folder.

    The checkpoint holds either a whole model with this tower under ``attribute``
    (a CLIP checkpoint's ``text.*``) or the encoder alone (e.g. a
    ``multilingual_encoder`` run), which loads into the tower's
    ``pretrained_encoder`` if it has one (its other parameters, such as a new
    projection, keep their initialisation) or into the whole tower.

    Returns:
        The weights file read.

    Raises:
        ValueError: no checkpoint at ``source``, a parameter whose shape differs (named, with both
            shapes), or missing / unexpected parameters; the message starts with ``init_from=<source>``.
    """
    from mmptm.data_pipelines.demo import resolve
    from mmptm.training.checkpoint import resolve_checkpoint

    try:
        path = resolve_checkpoint(resolve(source)) / "model.safetensors"
    except FileNotFoundError as err:
        raise ValueError(f"init_from={source}: {err}") from None
    state = load_file(str(path))
    prefix = f"{attribute}."
    if any(key.startswith(prefix) for key in state):
        state = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
        target, what = tower, f"its '{attribute}' tower"
    else:
        target, what = getattr(tower, "pretrained_encoder", tower), "the encoder"
    own = target.state_dict()
    for key, value in state.items():
        if key in own and value.shape != own[key].shape:
            raise ValueError(
                f"init_from={source}: parameter '{key}' of {what} has shape {tuple(value.shape)} in {path} but "
                f"{tuple(own[key].shape)} in the tower the config builds: give the tower the checkpoint's sizes "
                "(see its config.yaml) and the run its tokenizer"
            )
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"init_from={source}: {path} does not hold this tower's architecture: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (a different encoder, or options such as language_embeddings differ)"
        )
    target.load_state_dict(state)
    return path
