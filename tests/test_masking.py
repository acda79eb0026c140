"""BERT 80/10/10 masking (``mmptm.objectives.masking.bert_mask``) and the tokenizers' mask ids."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmptm.data_pipelines.clip_bpe import ClipBPETokenizer
from mmptm.data_pipelines.tokenizer import MASK_PIECE, SentencePieceTokenizer
from mmptm.objectives.masking import IGNORE_INDEX, bert_mask

PAD, BOS, EOS, MASK = 0, 2, 3, 4
SPECIAL = (PAD, 1, BOS, EOS)
VOCAB = 50


@st.composite
def token_batches(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``bos + ids + eos + pad``, and random word starts."""
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(2, 24))
    rows, starts = [], []
    for _ in range(batch):
        n = draw(st.integers(0, length - 2))
        ids = draw(st.lists(st.integers(5, VOCAB - 1), min_size=n, max_size=n))
        rows.append([BOS, *ids, EOS] + [PAD] * (length - n - 2))
        starts.append(draw(st.lists(st.booleans(), min_size=length, max_size=length)))
    return torch.tensor(rows), torch.tensor(starts)


def mask(tokens: torch.Tensor, seed: int = 0, **options) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return bert_mask(tokens, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, generator=generator, **options)


@settings(max_examples=60, deadline=None)
@given(token_batches(), st.floats(0.05, 1.0), st.integers(0, 2**31), st.booleans())
def test_masking_invariants(batch, mask_prob, seed, whole_words):
    tokens, starts = batch
    inputs, labels = mask(tokens, seed, mask_prob=mask_prob, word_starts=starts if whole_words else None)
    chosen = labels != IGNORE_INDEX
    maskable = ~torch.isin(tokens, torch.tensor([*SPECIAL, MASK]))
    # Targets are the original tokens, only at maskable positions; the rest is untouched.
    assert torch.equal(labels[chosen], tokens[chosen])
    assert not (chosen & ~maskable).any()
    assert torch.equal(inputs[~chosen], tokens[~chosen])
    # A corrupted position holds <mask>, the original, or a random non-special id.
    corrupted = inputs[chosen]
    assert ((corrupted == MASK) | ~torch.isin(corrupted, torch.tensor(SPECIAL))).all()
    counts = maskable.sum(dim=1)
    budget = torch.where(counts > 0, (counts.double() * mask_prob).round().long().clamp(min=1), counts)
    if not whole_words:
        assert torch.equal(chosen.sum(dim=1), budget)
    else:
        # Whole words: at least the budget (the last word may overshoot), and a word is all or nothing.
        assert (chosen.sum(dim=1) >= budget).all()
        for row in range(len(tokens)):
            word_chosen = None
            for position in range(tokens.shape[1]):
                if not maskable[row, position]:
                    word_chosen = None
                    continue
                if starts[row, position] or word_chosen is None:
                    word_chosen = bool(chosen[row, position])
                assert bool(chosen[row, position]) == word_chosen


def test_eighty_ten_ten_and_fifteen_percent():
    tokens = torch.randint(5, VOCAB, (400, 100), generator=torch.Generator().manual_seed(1))
    inputs, labels = mask(tokens, seed=2)
    chosen = labels != IGNORE_INDEX
    assert chosen.float().mean().item() == pytest.approx(0.15)
    n = chosen.sum().item()
    masked = (inputs[chosen] == MASK).sum().item() / n
    kept = (inputs[chosen] == tokens[chosen]).sum().item() / n
    # A random replacement equals the original 1 time in 45.
    assert masked == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1 + 0.1 / 45, abs=0.01)
    assert 1 - masked - kept == pytest.approx(0.1 * 44 / 45, abs=0.01)


def test_same_generator_seed_same_corruption():
    tokens = torch.randint(5, VOCAB, (8, 30), generator=torch.Generator().manual_seed(0))
    first, second = mask(tokens, seed=7), mask(tokens, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[1], mask(tokens, seed=8)[1])


def test_whole_words_on_a_fixed_sentence():
    # bos  ▁the ▁cat s ▁sat  eos pad: "cat"+"s" is one word.
    tokens = torch.tensor([[BOS, 10, 11, 12, 13, EOS, PAD]])
    starts = torch.tensor([[False, True, True, False, True, False, False]])
    for seed in range(30):
        _, labels = mask(tokens, seed, mask_prob=0.3, word_starts=starts)
        chosen = (labels != IGNORE_INDEX)[0].tolist()
        assert chosen[2] == chosen[3]
        assert chosen[0] is chosen[5] is chosen[6] is False


def test_errors_name_the_problem():
    tokens = torch.tensor([[BOS, 10, EOS]])
    with pytest.raises(ValueError, match="mask_prob"):
        mask(tokens, mask_prob=0.0)
    with pytest.raises(ValueError, match=r"tokens \[B, L\]"):
        mask(tokens[0])
    with pytest.raises(ValueError, match="word_starts"):
        mask(tokens, word_starts=torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="no id"):
        bert_mask(tokens, mask_id=4, vocab_size=5, special_ids=range(4))


def test_trained_sentencepiece_models_have_a_mask_piece(tmp_path):
    texts = ["the cat sat on the mat", "le chat est sur le tapis"] * 20
    tokenizer = SentencePieceTokenizer(SentencePieceTokenizer.train(texts, tmp_path / "spm.model", vocab_size=300))
    assert tokenizer.mask_id == 4
    assert tokenizer.mask_id in tokenizer.encode(f"the {MASK_PIECE} sat")
    assert MASK_PIECE not in tokenizer.decode(tokenizer(["the cat"])[0])


def test_models_without_a_mask_piece_say_so(tmp_path):
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["the cat sat on the mat"] * 20), model_writer=model, vocab_size=30,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2, hard_vocab_limit=False,
    )
    (tmp_path / "plain.model").write_bytes(model.getvalue())
    assert SentencePieceTokenizer(tmp_path / "plain.model").mask_id is None


def test_clip_bpe_has_no_mask_token():
    import open_clip

    assert ClipBPETokenizer.from_open_clip_merges(open_clip.tokenizer.default_bpe()).mask_id is None
