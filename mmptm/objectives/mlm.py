"""Masked language modelling across languages: MMLM (mBERT, XLM-R) and TLM (XLM).

- MMLM (Devlin et al. 2019, sec. 3.1; Conneau et al. 2020, XLM-R, sec. 2): BERT
  80/10/10 masking of 15% of the tokens of monolingual rows drawn by language
  (the ``text`` dataset), optionally of whole words.
- TLM (Lample & Conneau 2019, "Cross-lingual Language Model Pretraining",
  sec. 3.3 and Fig. 2): a sentence and its translation concatenated into one
  sequence, tokens masked in both, each half with its language embedding and
  positions restarting at the second sentence, so that a masked word can be
  predicted from its translation.

Both train the ``multilingual_encoder`` model (or any model with its
interface: ``forward(tokens, languages, positions)``, ``mlm_logits``,
``language_ids`` and the tokenizer's ids as attributes).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmptm.objectives.masking import IGNORE_INDEX, bert_mask
from mmptm.registry import register_objective
from mmptm.training.distributed import unwrap_model


def special_ids(model: nn.Module) -> list[int]:
    """The ids never masked nor predicted: pad, bos, eos and unknown-to-the-model ``None``s dropped."""
    return [i for i in (model.pad_id, model.bos_id, model.eos_id) if i is not None]


def mask_id_of(model: nn.Module) -> int:
    """The model's ``<mask>`` id.

    Raises:
        ValueError: the tokenizer has none (e.g. a CLIP BPE tokenizer, or a sentencepiece model not trained by mmptm).
    """
    if getattr(model, "mask_id", None) is None:
        raise ValueError(
            "masked language modelling needs a tokenizer with a <mask> token; train the sentencepiece model "
            "with `mmptm tokenizer train` (it adds one) and point tokenizer.path at it"
        )
    return model.mask_id


def mask_tokens(
    model: nn.Module,
    tokens: torch.Tensor,
    mask_prob: float,
    word_starts: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~mmptm.objectives.masking.bert_mask` with the model's vocabulary and special ids."""
    return bert_mask(
        tokens,
        mask_id=mask_id_of(model),
        vocab_size=model.vocab_size,
        special_ids=special_ids(model),
        mask_prob=mask_prob,
        generator=generator,
        word_starts=word_starts,
    )


def masked_lm_loss(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the MLM head at the positions with a target (the others are never projected).

    Args:
        model: the unwrapped model (``mlm_logits``).
        hidden: ``[B, L, D]`` states.
        labels: ``[B, L]`` targets, ``IGNORE_INDEX`` where nothing is predicted.

    Returns:
        ``(loss, accuracy)`` over the predicted positions (accuracy detached).
    """
    chosen = labels != IGNORE_INDEX
    logits = model.mlm_logits(hidden[chosen]).float()
    targets = labels[chosen]
    loss = F.cross_entropy(logits, targets)
    return loss, (logits.detach().argmax(dim=-1) == targets).float().mean()


class PairInputs(NamedTuple):
    """Two sentences as one sequence (XLM's TLM layout, Lample & Conneau 2019, Fig. 2)."""

    tokens: torch.Tensor  # [B, Ls + Lt]: bos src eos pad... bos tgt eos pad...
    languages: torch.Tensor  # [B, Ls + Lt]: the language of each half
    positions: torch.Tensor  # [B, Ls + Lt]: 0.. in each half


def concat_pair(
    src: torch.Tensor, tgt: torch.Tensor, src_languages: torch.Tensor, tgt_languages: torch.Tensor
) -> PairInputs:
    """Concatenate padded ``[B, Ls]`` and ``[B, Lt]`` rows; positions restart and languages switch at the second.

    Padding inside the sequence is harmless: the encoder masks pad keys out of attention.
    """
    batch = src.shape[0]
    positions = torch.cat([torch.arange(src.shape[1]), torch.arange(tgt.shape[1])]).to(src.device)
    languages = torch.cat(
        [src_languages[:, None].expand(-1, src.shape[1]), tgt_languages[:, None].expand(-1, tgt.shape[1])], dim=1
    )
    return PairInputs(torch.cat([src, tgt], dim=1), languages, positions.expand(batch, -1))


def pair_languages(model: nn.Module, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The language indices of the source and target sides of a ``parallel_text`` batch."""
    if not hasattr(model, "language_ids"):
        raise ValueError(
            f"a {type(model).__name__} model is no multilingual encoder (no language_ids): TLM, CLWR and CLPC "
            "train a multilingual_encoder; align a dual encoder's text tower on parallel text with text_alignment"
        )
    return model.language_ids(batch["src_lang"], device), model.language_ids(batch["tgt_lang"], device)


def check_pair_batch(batch: dict[str, Any], objective: str) -> None:
    """Raise a ValueError unless the batch carries token ids of both sides."""
    if "src_tokens" not in batch:
        raise ValueError(f"{objective} needs token ids: set `tokenize: true` on its parallel_text data stream")


@register_objective("mmlm")
class MultilingualMaskedLM(nn.Module):
    """Multilingual masked LM on monolingual rows (Devlin et al. 2019, sec. 3.1; XLM-R, sec. 2).

    Reads ``text`` batches (``tokens``, ``lang``, ``word_starts``).

    Args:
        mask_prob: share of each row's tokens predicted (BERT: 0.15).
        whole_word: mask whole words (all pieces of a chosen word).
    """

    def __init__(self, mask_prob: float = 0.15, whole_word: bool = False) -> None:
        super().__init__()
        self.mask_prob = mask_prob
        self.whole_word = whole_word

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Returns ``loss`` and ``acc`` (accuracy at the predicted positions)."""
        inner = unwrap_model(model)
        tokens = batch["tokens"]
        if self.whole_word and "word_starts" not in batch:
            raise ValueError("mmlm whole_word=True needs 'word_starts' in the batch (a sentencepiece tokenizer)")
        word_starts = batch["word_starts"] if self.whole_word else None
        inputs, labels = mask_tokens(inner, tokens, self.mask_prob, word_starts)
        hidden = model(inputs, languages=inner.language_ids(batch["lang"], tokens.device))
        loss, accuracy = masked_lm_loss(inner, hidden, labels)
        return {"loss": loss, "acc": accuracy}


@register_objective("tlm")
class TranslationLM(nn.Module):
    """Translation language modelling on parallel pairs (Lample & Conneau 2019, sec. 3.3, Fig. 2).

    Each side is masked on its own (so both halves always have targets), then the
    pair is concatenated with per-half language ids and positions restarting at
    the translation. Reads ``parallel_text`` batches with ``tokenize: true``.

    Args:
        mask_prob: share of each sentence's tokens predicted.
    """

    def __init__(self, mask_prob: float = 0.15) -> None:
        super().__init__()
        self.mask_prob = mask_prob

    def corrupt(self, model: nn.Module, batch: dict[str, Any]) -> tuple[PairInputs, torch.Tensor]:
        """The masked pair inputs and their ``[B, Ls + Lt]`` labels."""
        check_pair_batch(batch, "tlm")
        src_inputs, src_labels = mask_tokens(model, batch["src_tokens"], self.mask_prob)
        tgt_inputs, tgt_labels = mask_tokens(model, batch["tgt_tokens"], self.mask_prob)
        pair = concat_pair(src_inputs, tgt_inputs, *pair_languages(model, batch, src_inputs.device))
        return pair, torch.cat([src_labels, tgt_labels], dim=1)

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Returns ``loss`` and ``acc`` over the masked tokens of both sentences."""
        inner = unwrap_model(model)
        pair, labels = self.corrupt(inner, batch)
        hidden = model(pair.tokens, languages=pair.languages, positions=pair.positions)
        loss, accuracy = masked_lm_loss(inner, hidden, labels)
        return {"loss": loss, "acc": accuracy}
