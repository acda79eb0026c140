"""BERT's input corruption for masked language modelling, shared by every masked-LM objective.

Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for
Language Understanding", sec. 3.1 (Task #1) and appendix A.1: 15% of the
positions are chosen for prediction; a chosen token is replaced by ``<mask>``
80% of the time, by a random token 10% of the time and kept 10% of the time,
and the model predicts the original token at every chosen position. As in the
reference ``create_pretraining_data.py``, a sequence gets exactly
``max(1, round(mask_prob * n))`` chosen positions among its ``n`` maskable
tokens, so every non-empty row has a target. Whole-word masking (the
``--do_whole_word_mask`` variant released with BERT) chooses whole words: all
pieces of a chosen word are predicted, each with its own 80/10/10 draw.
MMLM (mBERT, XLM-R), TLM (XLM) and the multimodal BERTs (VisualBERT, ViLBERT)
use it as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Targets of positions with nothing to predict: ``F.cross_entropy``'s default ``ignore_index``.
IGNORE_INDEX = -100


def bert_mask(
    tokens: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
    word_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt a batch of token ids with BERT's 80/10/10 masking (Devlin et al. 2019, sec. 3.1).

    Args:
        tokens: ``LongTensor[B, L]`` token ids.
        mask_id: the ``<mask>`` id.
        vocab_size: number of ids; random replacements are drawn uniformly from the ids in
            ``range(vocab_size)`` that are not in ``special_ids`` (nor ``mask_id``).
        special_ids: ids never chosen for prediction nor drawn as replacements (pad, bos, eos,
            language tags, ...).
        mask_prob: share of each row's maskable tokens chosen for prediction, in ``(0, 1]``.
        generator: the random source (None: torch's global one).
        word_starts: ``BoolTensor[B, L]``, True at the first piece of each word: whole-word
            masking. A maskable piece that follows a special token starts a word too. None:
            every token is a word of its own.

    Returns:
        ``(inputs, labels)``: ``inputs`` is ``tokens`` with the chosen positions corrupted;
        ``labels`` holds the original token at chosen positions and ``IGNORE_INDEX`` (-100)
        everywhere else.

    Raises:
        ValueError: a bad ``mask_prob``, ``tokens`` not 2-D, ``word_starts`` of another shape, or
            no id left to draw random replacements from.
    """
    if tokens.dim() != 2:
        raise ValueError(f"bert_mask takes tokens [B, L], got shape {tuple(tokens.shape)}")
    if not 0 < mask_prob <= 1:
        raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
    if word_starts is not None and word_starts.shape != tokens.shape:
        raise ValueError(f"word_starts has shape {tuple(word_starts.shape)}, tokens {tuple(tokens.shape)}")
    device = tokens.device
    excluded = torch.tensor(sorted({*special_ids, mask_id}), dtype=torch.long, device=device)
    replacements = torch.arange(vocab_size, device=device)
    replacements = replacements[~torch.isin(replacements, excluded)]
    if replacements.numel() == 0:
        raise ValueError(f"no id in range({vocab_size}) outside the special ids {excluded.tolist()}")

    maskable = ~torch.isin(tokens, excluded)
    chosen = _choose_words(maskable, word_starts, mask_prob, generator)
    draw = torch.rand(tokens.shape, generator=generator, device=device)
    random_tokens = replacements[
        torch.randint(len(replacements), tokens.shape, generator=generator, device=device)
    ]
    inputs = torch.where(chosen & (draw < 0.8), torch.full_like(tokens, mask_id), tokens)
    inputs = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_tokens, inputs)
    labels = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE_INDEX))
    return inputs, labels


def _choose_words(
    maskable: torch.Tensor, word_starts: torch.Tensor | None, mask_prob: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Positions chosen for prediction: whole words in random order until ``max(1, round(p * n))`` tokens.

    As the reference implementation, words are taken in a random order while the
    tokens chosen so far stay below the row's budget, so that the last word may
    overshoot it (by less than one word).

    Returns:
        ``BoolTensor[B, L]``.
    """
    batch, length = maskable.shape
    if word_starts is None:
        starts = maskable
    else:
        previous = torch.nn.functional.pad(maskable[:, :-1], (1, 0), value=False)
        starts = maskable & (~previous | word_starts.to(device=maskable.device, dtype=torch.bool))
    # Word index of each maskable position; the other positions go to a dummy slot `length`.
    word = torch.where(maskable, starts.long().cumsum(dim=1) - 1, torch.full_like(maskable, length, dtype=torch.long))
    sizes = torch.zeros(batch, length + 1, dtype=torch.long, device=maskable.device)
    sizes.scatter_add_(1, word, maskable.long())
    sizes[:, length] = 0
    counts = maskable.sum(dim=1)
    budget = torch.where(counts > 0, (counts.double() * mask_prob).round().long().clamp(min=1), counts)

    scores = torch.rand(batch, length + 1, generator=generator, device=maskable.device)
    scores = scores.masked_fill(sizes == 0, 2.0)  # empty slots last
    order = scores.argsort(dim=1)
    sorted_sizes = sizes.gather(1, order)
    before = sorted_sizes.cumsum(dim=1) - sorted_sizes
    taken_sorted = (before < budget[:, None]) & (sorted_sizes > 0)
    taken = torch.zeros_like(taken_sorted).scatter(1, order, taken_sorted)
    return taken.gather(1, word) & maskable
