"""Checkpoint directories: weights, resolved config, tokenizer and training state.

Layout (DESIGN.md sec 2)::

    <run>/checkpoints/step_00000100/
        config.yaml          resolved run config
        model.safetensors    weights (never pickled)
        tokenizer.model      the sentencepiece model the text tower reads (or, for an
                             imported CLIP, its BPE vocab.json + merges.txt)
        training_state/      optimizer.pt, scheduler.pt, rng.pt, scaler.pt (fp16 loss scaling only),
                             objectives.pt (the objectives' state, e.g. mrm's k-means codebook; when
                             they have any), state.json (step, every rank's data position, counters)
    <run>/checkpoints/latest  name of the newest complete checkpoint

A checkpoint is written into a temporary sibling folder and renamed into
place, and ``latest`` is replaced atomically afterwards, so a crash at any
moment leaves the previous checkpoint as the latest complete one; the next
save removes the staging folders such a crash leaves behind.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})$")
LATEST = "latest"
STAGING_GLOB = ".tmp-step_*"


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a ``step_XXXXXXXX`` folder holds."""
    return int(CHECKPOINT_PATTERN.match(checkpoint.name).group(1))


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_weights(model: nn.Module | Mapping[str, torch.Tensor], path: Path) -> None:
    """Write a model's weights (or a full state dict, e.g. gathered from FSDP shards) as safetensors."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt", "library": "mmptm"})


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    state = load_file(str(path))
    own = model.state_dict()
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise ValueError(
            f"{path}: weights do not match the model built from its config: shapes (file, model) differ for "
            f"{wrong[:4]}{'...' if len(wrong) > 4 else ''}"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(
            f"{path}: weights do not match the model built from its config: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _json_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def _restore_json_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module | Mapping[str, torch.Tensor],
    config_yaml: str,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | Mapping[str, Any] | None = None,
    scheduler: Any = None,
    state: dict[str, Any] | None = None,
    keep: int = 3,
    staging: Path | None = None,
    scaler: Any = None,
    objectives: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``step_XXXXXXXX`` atomically, point ``latest`` at it and keep the newest ``keep``.

    Rotation keeps the checkpoint just written and the ``keep - 1`` newest before it; checkpoints of
    later steps (left by another run in the folder) are never removed, nor do they count.

    Args:
        run_dir: the run's output folder.
        step: optimizer steps done.
        model: the unwrapped model, or its full state dict.
        config_yaml: the resolved run config.
        tokenizer: saved with its ``save(folder)`` (``tokenizer.model``, or ``vocab.json`` + ``merges.txt``)
            when given.
        optimizer / scheduler / state: training state for ``--resume`` (omit ``state`` for an export);
            the optimizer may be given as its state dict, or be None when ``staging`` already holds
            its shards (``training_state/distributed``).
        keep: how many step checkpoints to keep.
        staging: the temporary folder to fill and rename, when other processes already wrote
            into it (see :func:`staging_dir`); default: a new one.
        scaler: the fp16 loss scaler (``torch.amp.GradScaler``) whose state to save with the training state.
        objectives: the objectives' state dict (buffers such as a k-means codebook), saved with the
            training state when it is not empty.

    Returns:
        The checkpoint folder.
    """
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = staging or Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        save_weights(model, tmp / "model.safetensors")
        if tokenizer is not None:
            tokenizer.save(tmp)
        if state is not None:
            ts = tmp / "training_state"
            ts.mkdir(exist_ok=True)
            if optimizer is not None:
                state_dict = optimizer if isinstance(optimizer, Mapping) else optimizer.state_dict()
                torch.save(state_dict, ts / "optimizer.pt")
            if scheduler is not None:
                torch.save(scheduler.state_dict(), ts / "scheduler.pt")
            if scaler is not None:
                torch.save(scaler.state_dict(), ts / "scaler.pt")
            if objectives:
                torch.save(dict(objectives), ts / "objectives.pt")
            torch.save(rng_state(), ts / "rng.pt")
            payload = {"step": step, **(state or {}), "rng": _json_rng_state()}
            (ts / "state.json").write_text(json.dumps(payload), encoding="utf-8")
        if final.exists():  # a re-save of the same step (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic(root / LATEST, final.name)
    up_to_now = [c for c in list_checkpoints(run_dir) if checkpoint_step(c) <= step]
    for old in up_to_now[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    # Staging folders of saves killed before their rename: only the main process saves, one at a time.
    for stale in root.glob(STAGING_GLOB):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / "model.safetensors").is_file() and (checkpoint / "config.yaml").is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete step checkpoints, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_PATTERN.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or the newest complete one if that file is missing or stale."""
    root = checkpoints_dir(run_dir)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8").strip()
        if is_complete(named):
            return named
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (-> its latest checkpoint)."""
    path = Path(path)
    if is_complete(path):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(
            f"'{path}' is neither a checkpoint (config.yaml + model.safetensors) nor a run folder with checkpoints"
        )
    return latest


def load_training_state(
    checkpoint: Path,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    objectives: nn.Module | None = None,
) -> dict[str, Any]:
    """Restore the scheduler and RNG state (and ``optimizer``'s, ``scaler``'s and ``objectives``', when given);
    return ``state.json``.

    A checkpoint without ``scaler.pt`` (a run without fp16 loss scaling) leaves ``scaler`` as it is; one
    without ``objectives.pt`` (objectives without state, or a checkpoint written before it was saved)
    leaves ``objectives`` as they are.

    The optimizer state is in ``training_state/optimizer.pt`` (``optimizer_state_file``) for callers
    that restore it themselves, e.g. into a sharded optimizer.
    """
    ts = checkpoint / "training_state"
    if not (ts / "state.json").is_file():
        raise FileNotFoundError(f"{checkpoint}: no training_state/ to resume from (an export-only checkpoint?)")
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(optimizer_state_file(checkpoint), map_location="cpu", weights_only=True))
    if scheduler is not None and (ts / "scheduler.pt").is_file():
        scheduler.load_state_dict(torch.load(ts / "scheduler.pt", weights_only=True))
    if scaler is not None and (ts / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(ts / "scaler.pt", weights_only=True))
    if objectives is not None and (ts / "objectives.pt").is_file():
        objectives.load_state_dict(torch.load(ts / "objectives.pt", map_location="cpu", weights_only=True))
    rng = torch.load(ts / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((ts / "state.json").read_text(encoding="utf-8"))
    _restore_json_rng_state(state.pop("rng"))
    return state


def optimizer_state_file(checkpoint: Path) -> Path:
    return checkpoint / "training_state" / "optimizer.pt"


def staging_dir(run_dir: str | Path, step: int) -> Path:
    """The temporary folder every process of a sharded save writes into before rank 0 renames it.

    Deterministic, so that all ranks agree on it without communicating; the
    caller (rank 0) empties it before the others write.
    """
    return checkpoints_dir(run_dir) / f".tmp-step_{step:08d}-sharded"


def distributed_state_dir(checkpoint: Path) -> Path:
    """Where a sharded run keeps its per-rank model and optimizer shards (``torch.distributed.checkpoint``)."""
    return checkpoint / "training_state" / "distributed"
