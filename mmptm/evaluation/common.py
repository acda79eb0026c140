"""What the evaluations share: input errors, mixed precision, skip counting, normalised embeddings."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

Autocast = Callable[[], AbstractContextManager[Any]]
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class EvaluationError(ValueError):
    """Bad evaluation input (a prompt file, a data set, a language); the message says what to fix."""


def precision_autocast(precision: str, device: torch.device | str) -> Autocast | None:
    """The autocast factory of an evaluation precision.

    Args:
        precision: ``fp32`` (no autocast), ``bf16`` or ``fp16``.
        device: where the model runs (its type picks the autocast backend).

    Returns:
        None for fp32, else a callable returning a ``torch.autocast`` context.
    """
    if precision == "fp32":
        return None
    if precision not in _AUTOCAST_DTYPES:
        raise EvaluationError(f"unknown precision '{precision}'; choose fp32, bf16 or fp16")
    return functools.partial(torch.autocast, device_type=torch.device(device).type, dtype=_AUTOCAST_DTYPES[precision])


def _autocast_context(autocast: Autocast | None) -> AbstractContextManager[Any]:
    return autocast() if autocast is not None else contextlib.nullcontext()


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for the block; the model's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class CountingStream:
    """The non-empty batches of an evaluation stream; ``skipped`` sums the samples it skipped.

    Args:
        batches: a dataset's batches (with ``"skipped"`` counts and possibly ``"empty"`` markers).
    """

    def __init__(self, batches: Iterable[Mapping[str, Any]]) -> None:
        self.batches = batches
        self.skipped = 0

    def __iter__(self) -> Iterator[Mapping[str, Any]]:
        for batch in self.batches:
            self.skipped += int(batch.get("skipped", 0))
            if not batch.get("empty"):
                yield batch

    def no_samples_error(self, what: str) -> EvaluationError:
        """The error for a stream that yielded no ``what``."""
        hint = f" ({self.skipped} samples skipped: see the warnings above)" if self.skipped else ""
        return EvaluationError(f"the evaluation data produced no {what}{hint}")


def encode_images(
    model: nn.Module, images: torch.Tensor, device: torch.device | str, autocast: Autocast | None = None
) -> torch.Tensor:
    """L2-normalised float32 image embeddings ``[B, D]``."""
    with _autocast_context(autocast):
        features = model.encode_image(images.to(device))
    return F.normalize(features.float(), dim=-1)


def encode_texts(
    model: nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    texts: Sequence[str],
    device: torch.device | str,
    autocast: Autocast | None = None,
) -> torch.Tensor:
    """L2-normalised float32 text embeddings ``[len(texts), D]``, tokenised and encoded as one batch."""
    tokens = tokenizer(list(texts)).to(device)
    with _autocast_context(autocast):
        features = model.encode_text(tokens)
    return F.normalize(features.float(), dim=-1)
