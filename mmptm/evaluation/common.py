"""What the evaluations share: input errors, mixed precision, skip counting, normalised embeddings."""

from __future__ import annotations

import contextlib
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What the trainer hands a registered evaluator (``eval.tasks``) besides the model and its options.

    An evaluator is ``fn(model, context: EvalContext, **options) -> {metric: float}``,
    registered with ``mmptm.register_evaluator(name)``; it runs on the main
    process with the unwrapped model in eval mode (gradients enabled: wrap
    encoding in ``torch.no_grad()``), and its metrics are logged as
    ``eval/<metric>``.

    Attributes:
        tokenizer: the run's tokenizer.
        data: the data context for evaluation streams (no augmentation, rank 0 of 1): pass it to a
            dataset factory as ``context``.
        device: where the model is.
        autocast: the run's mixed-precision context factory (None: fp32).
        batches: wraps an evaluation stream: a progress bar, and an interruption when a stop signal
            arrives. Iterate every evaluation stream through it: ``for batch in context.batches(stream, "xlret")``.
        step: the training step being evaluated.
    """

    tokenizer: Any
    data: Any
    device: torch.device | str = "cpu"
    autocast: Autocast | None = None
    batches: Callable[[Iterable[Any], str], Iterable[Any]] = lambda stream, what: stream
    step: int = 0


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


def autocast_context(autocast: Autocast | None) -> AbstractContextManager[Any]:
    """A new context of an evaluation's autocast factory (``EvalContext.autocast``, :func:`precision_autocast`).

    Args:
        autocast: the factory, or None for fp32.

    Returns:
        The factory's ``torch.autocast`` context, or a no-op context for None.
    """
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
    with autocast_context(autocast):
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
    with autocast_context(autocast):
        features = model.encode_text(tokens)
    return F.normalize(features.float(), dim=-1)
