"""mBART: the encoder-decoder and its decoding, the denoising noise and objective, chrF, the evaluator, the configs."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import sacrebleu
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from mmptm.config import load_config
from mmptm.data_pipelines.context import DataContext
from mmptm.data_pipelines.demo import resolve
from mmptm.data_pipelines.text import text
from mmptm.data_pipelines.tokenizer import load_tokenizer
from mmptm.encoders.mbart import Generation, MBart
from mmptm.evaluation.chrf import corpus_chrf
from mmptm.evaluation.common import EvalContext
from mmptm.evaluation.denoising import denoise, detokenize, sentence_matches
from mmptm.objectives.denoising import MultilingualDenoising, span_lengths, text_infilling
from mmptm.objectives.masking import IGNORE_INDEX
from mmptm.training.trainer import train

PAD, UNK, BOS, EOS, MASK = 0, 1, 2, 3, 4
VOCAB = 40
LANGS = ["en", "fr"]
EN, FR = VOCAB, VOCAB + 1  # the appended language-id tokens
SPECIAL = {PAD, BOS, EOS, MASK, EN, FR}


def tiny_mbart(std: float | None = 0.5, **options) -> MBart:
    """A tiny model; ``std`` re-draws its matrices so that an untrained model's outputs vary (and sometimes stop)."""
    torch.manual_seed(0)
    settings_ = dict(width=32, encoder_layers=1, decoder_layers=2, heads=2, max_positions=48, languages=LANGS,
                     vocab_size=VOCAB, mask_id=MASK)
    model = MBart(**{**settings_, **options})
    if std is not None:
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() == 2:
                    parameter.normal_(0, std)
    return model


def text_row(sentences: list[list[int]], width: int) -> list[int]:
    """A ``text`` stream row: ``<s> s1 </s> s2 </s> ...`` padded to ``width``."""
    row = [BOS]
    for sentence in sentences:
        row += [*sentence, EOS]
    return row + [PAD] * (width - len(row))


def text_batch(documents: list[list[list[int]]], langs: list[str]) -> dict:
    """A ``text`` batch whose every token starts a word except the ids marked negative (continuations)."""
    width = max(2 + sum(len(s) + 1 for s in doc) for doc in documents)
    rows = [text_row([[abs(t) for t in s] for s in doc], width) for doc in documents]
    starts = [[False] + [t > 0 for s in doc for t in [*s, 0]] + [False] * width for doc in documents]
    return {"tokens": torch.tensor(rows), "word_starts": torch.tensor([s[:width] for s in starts]), "lang": langs}


def sentences_of(ids: list[int]) -> list[list[int]]:
    """Split ids at </s> (empty parts kept)."""
    parts: list[list[int]] = [[]]
    for token in ids:
        if token == EOS:
            parts.append([])
        else:
            parts[-1].append(token)
    return parts


def is_subsequence(part: list[int], whole: list[int]) -> bool:
    remaining = iter(whole)
    return all(token in remaining for token in part)


# ---------------------------------------------------------------------------------------------- text infilling


def test_text_infilling_on_a_fixed_document():
    # Two sentences, separated by </s>; 6 + 5 single-piece words (ids 10..20).
    tokens = [10, 11, 12, 13, 14, 15, EOS, 16, 17, 18, 19, 20]
    out = text_infilling(tokens, [True] * len(tokens), SPECIAL, MASK, generator=torch.Generator().manual_seed(0))
    assert out.num_words == 11 and out.masked_words == math.ceil(0.35 * 11) == 4
    assert sum(out.span_lengths) == 4
    assert out.tokens.count(EOS) == 1  # the separator is never masked
    kept = [t for t in out.tokens if t not in (MASK, EOS)]
    assert len(kept) == 11 - 4 and is_subsequence(kept, tokens)
    assert out == text_infilling(tokens, [True] * len(tokens), SPECIAL, MASK,
                                 generator=torch.Generator().manual_seed(0))  # seeded: the same noise


def test_a_word_of_several_pieces_is_masked_whole():
    # Words: [10 11 12] [13] [14 15]: 3 words, ceil(0.35 * 3) = 2 masked, as whole words.
    tokens, starts = [10, 11, 12, 13, 14, 15], [True, False, False, True, True, False]
    words = [[10, 11, 12], [13], [14, 15]]
    for seed in range(20):
        out = text_infilling(tokens, starts, SPECIAL, MASK, generator=torch.Generator().manual_seed(seed))
        kept = [t for t in out.tokens if t != MASK]
        assert kept in words, (seed, out)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 3), min_size=1, max_size=8), min_size=1, max_size=5), st.integers(0, 2**31 - 1))
def test_text_infilling_property(word_sizes, seed):
    """Any document: exactly ceil(35%) of its words go, whole; specials stay; one <mask> per span and side of a </s>."""
    next_id = iter(range(100, 1000))  # distinct ids: every kept piece names its word
    sentences = [[[next(next_id) for _ in range(size)] for size in sizes] for sizes in word_sizes]
    tokens, starts = [], []
    for index, sentence in enumerate(sentences):
        if index:
            tokens.append(EOS)
            starts.append(False)
        for word in sentence:
            tokens += word
            starts += [True] + [False] * (len(word) - 1)
    out = text_infilling(tokens, starts, SPECIAL, MASK, generator=torch.Generator().manual_seed(seed))
    num_words = sum(len(sentence) for sentence in sentences)
    assert out.num_words == num_words and out.masked_words == math.ceil(round(0.35 * num_words, 9))
    assert sum(out.span_lengths) == out.masked_words
    noised = sentences_of(out.tokens)
    assert len(noised) == len(sentences)  # separators kept, none added
    kept_words = 0
    for original, part in zip(sentences, noised, strict=True):
        kept = [t for t in part if t != MASK]
        whole = [word for word in original if set(word) & set(kept)]
        assert kept == [t for word in whole for t in word]  # whole words of this sentence, in order
        kept_words += len(whole)
    assert kept_words == num_words - out.masked_words
    assert not {BOS, PAD, EN, FR} & set(out.tokens)
    masks, spans = out.tokens.count(MASK), len(out.span_lengths)
    assert spans <= masks <= spans + len(sentences) - 1
    if len(sentences) == 1:
        assert masks == spans


def test_single_sentence_layout_matches_the_reported_spans():
    """Each <mask> replaces exactly its span's words: the gaps between kept words add up span by span."""
    tokens = list(range(10, 40))  # 30 one-piece words
    for seed in range(30):
        out = text_infilling(tokens, [True] * 30, SPECIAL, MASK, generator=torch.Generator().manual_seed(seed))
        assert out.tokens.count(MASK) == len(out.span_lengths)
        lengths = iter(out.span_lengths)
        position = 0  # next word of the input
        for token in out.tokens:
            if token == MASK:
                position += next(lengths)
            else:
                assert token == tokens[position], (seed, out)
                position += 1
        assert position == 30


def test_masked_fraction_is_35_percent_over_many_documents():
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    words = masked = 0
    for _ in range(400):
        n = int(rng.integers(20, 80))
        tokens = rng.integers(10, VOCAB, size=n).tolist()
        out = text_infilling(tokens, [True] * n, SPECIAL, MASK, generator=generator)
        words += n
        masked += n - sum(1 for t in out.tokens if t != MASK)  # counted on the output
    assert abs(masked / words - 0.35) < 0.01, masked / words


def test_span_lengths_follow_poisson_3_5():
    generator = torch.Generator().manual_seed(0)
    lengths: list[int] = []
    for _ in range(20):
        drawn = span_lengths(1000, 3.5, generator)
        assert sum(drawn) == 1000
        lengths += drawn[:-1]  # the last one is cut to fit the budget
    sample = np.array(lengths)
    assert abs(sample.mean() - 3.5) < 0.1 and abs(sample.var() - 3.5) < 0.25
    bins = np.arange(10)
    observed = [*(np.sum(sample == k) for k in bins), np.sum(sample >= 10)]
    expected = np.array([*stats.poisson.pmf(bins, 3.5), stats.poisson.sf(9, 3.5)]) * len(sample)
    assert stats.chisquare(observed, expected).pvalue > 0.01
    # 0-length spans exist (each inserts a <mask>), about exp(-3.5) of them.
    assert abs(np.mean(sample == 0) - math.exp(-3.5)) < 0.01


# ---------------------------------------------------------------------------------------------- the objective


def test_denoising_layout_language_ids_and_permutation():
    model = tiny_mbart()
    documents = [[[10, 11, 12], [13, 14], [15, 16, 17, 18]], [[20, 21, 22, 23, 24]]]
    batch = text_batch(documents, ["fr", "en"])
    objective = MultilingualDenoising()
    firsts = Counter()
    for seed in range(40):
        inputs = objective.corrupt(model, batch, torch.Generator().manual_seed(seed))
        for row, (doc, lang) in enumerate(zip(documents, (FR, EN), strict=True)):
            original = [t for i, s in enumerate(doc) for t in ([EOS] if i else []) + s]
            source = [t for t in inputs.source[row].tolist() if t != PAD]
            assert source[-2:] == [EOS, lang] and lang not in source[:-1] and BOS not in source
            decoder_input = [t for t in inputs.decoder_input[row].tolist() if t != PAD]
            target = [t for t in inputs.target[row].tolist() if t != IGNORE_INDEX]
            assert decoder_input == [lang, *original] and target == [*original, EOS]
            assert (inputs.target[row, len(target):] == IGNORE_INDEX).all()
            noised = sentences_of(source[:-2])
            assert len(noised) == len(doc)
            # The sentence each noised part comes from (None: all its words masked); each at most once.
            origin = [next((i for i, s in enumerate(doc) if set(part) & set(s)), None) for part in noised]
            known = [i for i in origin if i is not None]
            assert len(set(known)) == len(known)
            for i, part in zip(origin, noised, strict=True):
                assert i is None or is_subsequence([t for t in part if t != MASK], doc[i])
            if row == 0 and origin[0] is not None:
                firsts[origin[0]] += 1
    assert set(firsts) == {0, 1, 2}  # every sentence comes first sometimes: the order is shuffled
    again = objective.corrupt(model, batch, torch.Generator().manual_seed(39))
    assert all(torch.equal(a, b) for a, b in zip(inputs, again, strict=True))  # seeded: the same noise


def test_denoising_loss_gradients_and_errors():
    model = tiny_mbart(std=None)
    batch = text_batch([[[10, 11, 12], [13, 14]], [[20, -21, 22, 23]]], ["en", "fr"])
    torch.manual_seed(0)
    out = MultilingualDenoising()(model, batch)
    assert torch.isfinite(out["loss"]) and 0 <= out["acc"] <= 1
    out["loss"].backward()
    for name in ("token_embedding", "encoder_positions", "decoder_positions", "encoder.resblocks.0.attn",
                 "decoder.0.self_attn", "decoder.0.cross_attn", "decoder.1.mlp", "encoder_norm", "decoder_norm"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name
    with pytest.raises(ValueError, match="word_starts"):
        MultilingualDenoising().corrupt(model, {k: v for k, v in batch.items() if k != "word_starts"})
    with pytest.raises(ValueError, match="not among the model's languages"):
        MultilingualDenoising().corrupt(model, {**batch, "lang": ["en", "de"]})
    with pytest.raises(ValueError, match="<mask>"):
        MultilingualDenoising().corrupt(tiny_mbart(mask_id=None), batch)
    with pytest.raises(ValueError, match="mask_ratio"):
        MultilingualDenoising(mask_ratio=0)


# ---------------------------------------------------------------------------------------------- the model


def test_language_tokens_appended_or_taken_from_the_vocabulary():
    model = tiny_mbart(std=None)
    assert model.vocab_size == VOCAB + 2 and model.language_tokens(["fr", "en"]).tolist() == [FR, EN]
    assert model.token_embedding.num_embeddings == VOCAB + 2
    named = tiny_mbart(std=None, language_token_ids={"en": 30, "fr": 31, "de": 32})
    assert named.vocab_size == VOCAB and named.language_tokens(["fr"]).tolist() == [31]
    with pytest.raises(ValueError, match="missing \\['fr'\\]"):
        tiny_mbart(std=None, language_token_ids={"en": 30})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_mbart(std=None, language_token_ids={"en": 30, "fr": VOCAB})
    with pytest.raises(ValueError, match="languages"):
        tiny_mbart(std=None, languages=[])


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    source, _ = sources()
    decoder_input = torch.randint(10, VOCAB, (4, 6), generator=torch.Generator().manual_seed(2))
    results = []
    for enable in (False, True):
        model = tiny_mbart(std=None)
        model.set_grad_checkpointing(enable)
        loss = model(source, decoder_input).square().mean()
        loss.backward()
        results.append((loss, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


def test_dropout_in_training_only_with_the_same_masks_under_checkpointing():
    source, _ = sources()
    decoder_input = torch.randint(10, VOCAB, (4, 6), generator=torch.Generator().manual_seed(2))
    dropouts = dict(dropout=0.2, attention_dropout=0.1, activation_dropout=0.3)
    plain, model = tiny_mbart(std=None).eval(), tiny_mbart(std=None, **dropouts).eval()
    assert (model.encoder.resblocks[0].dropout, model.decoder[1].self_attn.dropout, model.decoder[0].mlp.dropout) == (
        0.2, 0.1, 0.3)
    with torch.no_grad():  # evaluation: no dropout, the same function as without it
        torch.testing.assert_close(model(source, decoder_input), plain(source, decoder_input), rtol=0, atol=0)
    model.train()
    results = []
    for enable in (False, True):  # backward's recomputation draws the forward's masks again
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(5)
        loss = model(source, decoder_input).square().mean()
        loss.backward()
        results.append((loss, [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1])
    with torch.no_grad():  # training draws new masks at every call
        assert not torch.equal(model(source, decoder_input), model(source, decoder_input))
        assert not torch.allclose(model(source, decoder_input), plain(source, decoder_input))


@pytest.mark.parametrize("key", ["dropout", "attention_dropout", "activation_dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.5, "0.1", True])
def test_dropout_outside_0_1_is_refused_naming_it(key, value):
    name = {"dropout": "dropout", "attention_dropout": "attention dropout", "activation_dropout": "activation dropout"}
    with pytest.raises(ValueError, match=f"^{name[key]} must be a probability in \\[0, 1\\], got {value!r}"):
        tiny_mbart(std=None, **{key: value})


def sources() -> tuple[torch.Tensor, list[str]]:
    generator = torch.Generator().manual_seed(1)
    source = torch.randint(10, VOCAB, (4, 9), generator=generator)
    source[:, -2:] = torch.tensor([EOS, EN])
    source[1, 5:] = torch.tensor([EOS, FR, PAD, PAD])
    source[3, -1] = FR
    return source, ["en", "fr", "en", "fr"]


def test_cached_greedy_decoding_equals_full_recomputation():
    model = tiny_mbart().double().eval()  # float64: the two ways may differ by rounding only
    source, langs = sources()
    cached = model.greedy_search(source, langs, max_length=14)
    full = model.greedy_search(source, langs, max_length=14, use_cache=False)
    assert torch.equal(cached.tokens, full.tokens)
    torch.testing.assert_close(cached.logits, full.logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cached.scores, full.scores)
    # The step logits are the teacher-forced logits of the generated tokens.
    decoder_input = torch.cat([model.language_tokens(langs)[:, None], cached.tokens[:, :-1]], dim=1)
    torch.testing.assert_close(cached.logits, model(source, decoder_input), rtol=1e-10, atol=1e-10)
    assert len(set(cached.tokens.flatten().tolist())) > 3  # the outputs vary: the check means something


def test_beam_search_of_one_is_greedy_and_wider_beams_score_higher():
    model = tiny_mbart().eval()
    source, langs = sources()
    greedy = model.generate(source, langs, max_length=12)
    single = model.beam_search(source, langs, beam_size=1, max_length=12)
    assert torch.equal(single.tokens, greedy.tokens)
    torch.testing.assert_close(single.scores, greedy.scores)
    wide = model.generate(source, langs, max_length=12, beam_size=4, length_penalty=1.0)
    assert (wide.scores >= greedy.scores - 1e-6).all() and (wide.scores > greedy.scores).any()
    # A hypothesis's score is its teacher-forced log-probability over its length.
    decoder_input = torch.cat([model.language_tokens(langs)[:, None], wide.tokens[:, :-1]], dim=1)
    log_probs = model.next_token_log_probs(model(source, decoder_input))
    real = wide.tokens != PAD
    lengths = torch.where((wide.tokens == EOS).any(dim=1), (wide.tokens == EOS).int().argmax(dim=1) + 1, 12)
    real &= torch.arange(wide.tokens.shape[1])[None, :] < lengths[:, None]
    summed = torch.where(real, log_probs.gather(2, wide.tokens[:, :, None]).squeeze(2), 0.0).sum(dim=1)
    torch.testing.assert_close(wide.scores, summed / lengths.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_decoding_stops_at_eos_and_at_max_length(beam_size, monkeypatch):
    model = tiny_mbart().eval()
    source, langs = sources()
    plain_logits = model.logits
    calls = []

    def logits(hidden):  # row 0 says </s> at its 2nd step, the other rows never
        out = plain_logits(hidden).clone()
        if len(calls) == 1:
            out[: beam_size, EOS] = 1e4
        out[beam_size:, EOS] = -1e4
        calls.append(1)
        return out

    monkeypatch.setattr(model, "logits", logits)
    out = model.generate(source, langs, max_length=7, beam_size=beam_size)
    assert out.tokens.shape == (4, 7)
    assert out.tokens[0, 1] == EOS and (out.tokens[0, 2:] == PAD).all()
    assert (out.tokens[1:] != EOS).all() and (out.tokens[1:] != PAD).all()
    assert not {BOS, MASK, EN, FR} & set(out.tokens.flatten().tolist())  # never generated
    with pytest.raises(ValueError, match="max_length"):
        model.generate(source, langs, max_length=48)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_document_ends_at_its_last_sentence(beam_size, monkeypatch):
    model = tiny_mbart().eval()
    source, langs = sources()
    plain_logits = model.logits
    calls = []

    def logits(hidden):  # every row says </s> at steps 2 and 4, never elsewhere
        out = plain_logits(hidden).clone()
        out[:, EOS] = 1e4 if len(calls) in (1, 3) else -1e4
        calls.append(1)
        return out

    monkeypatch.setattr(model, "logits", logits)
    out = model.generate(source, langs, max_length=7, beam_size=beam_size, sentences=[2, 1, 3, 2])
    for row, ends_at in enumerate([3, 1, None, 3]):  # rows of 2 sentences end at their second </s>
        eos = (out.tokens[row] == EOS).nonzero().flatten().tolist()
        if ends_at is None:  # 3 sentences: both </s> are separators, decoding runs to max_length
            assert eos == [1, 3] and (out.tokens[row] != PAD).all()
        else:
            assert eos[-1] == ends_at and (out.tokens[row, ends_at + 1 :] == PAD).all()
    if beam_size == 1:  # the cached and the full decoder agree on documents too
        calls.clear()
        full = model.greedy_search(source, langs, max_length=7, use_cache=False, sentences=[2, 1, 3, 2])
        assert torch.equal(full.tokens, out.tokens)
    for bad in ([1, 1, 1], [1, 0, 1, 1]):
        with pytest.raises(ValueError, match="sentences"):
            model.generate(source, langs, max_length=7, beam_size=beam_size, sentences=bad)


def test_detokenize_keeps_the_sentences_of_a_document():
    class Pieces:
        eos_id = EOS

        def decode(self, ids):
            return " ".join(map(str, ids))

    ids = [7, 8, EOS, MASK, 9, EOS, 10, EOS, 11]
    assert detokenize(Pieces(), ids, {MASK}) == "7 8"
    assert detokenize(Pieces(), ids, {MASK}, sentences=3) == "7 8\n9\n10"
    assert sentence_matches("7 8\n9\n10", "7 8\n10\n10") == 2


# ---------------------------------------------------------------------------------------------- chrF


@pytest.mark.parametrize(
    ("hypotheses", "references"),
    [
        (["the cat sat on the mat"], ["the cat sat on the mat"]),
        (["the cat sat on a mat", "quatre mille deux"], ["the cat sat on the mat", "quatre mille deux cent un"]),
        (["", "dreihundert"], ["zwei", "dreihundertzwei"]),
        (["ab", "xyz"], ["abcdefghij", "x"]),
        (["Привет мир", "дві тисячі"], ["Привет, мир!", "две тысячи"]),
    ],
)
def test_chrf_matches_sacrebleu(hypotheses, references):
    expected = sacrebleu.metrics.CHRF().corpus_score(hypotheses, [references]).score
    assert corpus_chrf(hypotheses, references) == pytest.approx(expected, abs=1e-9)


def test_chrf_bounds_and_errors():
    assert corpus_chrf(["same text"], ["same text"]) == 100.0
    assert corpus_chrf(["xxxx"], ["yyyy"]) == 0.0
    with pytest.raises(ValueError, match="2 references"):
        corpus_chrf(["a"], ["a", "b"])


# ---------------------------------------------------------------------------------------------- evaluation, training


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve("demo:multilingual_tokenizer"), context_length=24)


def demo_mbart(tokenizer, **options) -> MBart:
    torch.manual_seed(0)
    settings_ = dict(width=32, encoder_layers=1, decoder_layers=1, heads=2, max_positions=40, languages=LANGS,
                     vocab_size=tokenizer.vocab_size, mask_id=tokenizer.mask_id)
    return MBart(**{**settings_, **options})


def test_denoise_evaluator_on_held_out_sentences(tokenizer):
    context = EvalContext(tokenizer=tokenizer, data=DataContext(tokenizer=tokenizer, training=False))
    model = demo_mbart(tokenizer).eval()
    metrics = denoise(model, context, data="demo:text_val", languages=["fr"], max_sentences=12, max_length=8,
                      batch_size=5)
    assert set(metrics) == {"denoise_em", "denoise_sentence_em", "denoise_chrf", "denoise_copy_em",
                            "denoise_copy_sentence_em", "denoise_copy_chrf", "denoise_em/fr"}
    # Every sentence loses at least one word, so copying the source never reconstructs it.
    assert metrics["denoise_copy_em"] == 0 and 0 < metrics["denoise_copy_chrf"] < 100
    assert metrics["denoise_em"] == metrics["denoise_em/fr"] == 0  # untrained
    assert metrics == denoise(model, context, data="demo:text_val", languages=["fr"], max_sentences=12,
                              max_length=8, batch_size=4)
    beam = denoise(model, context, languages=["fr"], max_sentences=3, max_length=6, beam_size=2)  # documents
    assert set(beam) == set(metrics) and 0 < beam["denoise_copy_chrf"] < 100
    assert beam["denoise_em"] == beam["denoise_sentence_em"] == 0  # untrained, and 6 tokens cannot hold 4 sentences


def test_denoise_evaluator_scores_whole_documents(monkeypatch):
    """An oracle that returns the original scores 1; one that drops a sentence scores per sentence."""
    tokenizer = load_tokenizer(resolve("demo:multilingual_tokenizer"), context_length=48)  # whole documents
    context = EvalContext(tokenizer=tokenizer, data=DataContext(tokenizer=tokenizer, training=False))
    model = demo_mbart(tokenizer, max_positions=64).eval()
    targets = []
    corrupt = MultilingualDenoising.corrupt

    def recording_corrupt(self, model, batch, generator=None):
        inputs = corrupt(self, model, batch, generator)
        targets.append(inputs.target.clamp(min=0))
        return inputs

    def oracle(source, languages, sentences, **options):
        assert sentences == [4] * len(languages)  # every held-out document has 4 sentences
        return Generation(targets[-1], torch.zeros(len(languages)), None)

    monkeypatch.setattr(MultilingualDenoising, "corrupt", recording_corrupt)
    monkeypatch.setattr(model, "generate", oracle)
    metrics = denoise(model, context, data="demo:docs_val", languages=["en", "fr"], max_sentences=6)
    assert metrics["denoise_em"] == metrics["denoise_sentence_em"] == metrics["denoise_chrf"] / 100 == 1
    assert metrics["denoise_copy_em"] == 0 and 0 < metrics["denoise_copy_sentence_em"] < 1

    def first_sentence_lost(source, languages, sentences, **options):
        tokens = targets[-1].clone()
        for row in tokens:  # the first sentence and its </s> removed
            cut = row.tolist().index(tokenizer.eos_id) + 1
            row[:] = torch.cat([row[cut:], row.new_full((cut,), tokenizer.pad_id)])
        return Generation(tokens, torch.zeros(len(languages)), None)

    monkeypatch.setattr(model, "generate", first_sentence_lost)
    metrics = denoise(model, context, data="demo:docs_val", languages=["en"], max_sentences=6)
    assert metrics["denoise_em"] == 0 and metrics["denoise_sentence_em"] == 0


def test_denoising_loss_falls_on_a_tiny_real_run(tokenizer):
    model = demo_mbart(tokenizer)
    stream = text(DataContext(tokenizer=tokenizer, seed=0), "demo:text_train", languages=LANGS, batch_size=16,
                  max_length=20, epoch_samples=16 * 40, shuffle_buffer=50)
    objective = MultilingualDenoising()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for batch in stream:
        loss = objective(model, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert len(losses) == 40
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), losses


def test_bundled_mbart_configs_train(tmp_path):
    overrides = [
        "train.max_steps=2", "train.progress_bar=false", "train.tensorboard=false", "data.text.shuffle_buffer=10",
        "eval.tasks=[{name: denoise, languages: [tr], max_sentences: 4, max_length: 6}]",
    ]
    metrics = train(load_config("mbart_tiny.yaml", overrides), output_dir=tmp_path / "tiny")
    assert set(metrics) >= {"eval/denoise_em", "eval/denoise_chrf", "eval/denoise_copy_em", "eval/denoise_copy_chrf"}
    logged = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/denoising/acc" in record for record in logged)
    base = [
        "train.max_steps=1", "train.progress_bar=false", "train.tensorboard=false", "train.warmup_steps=0",
        "tokenizer.context_length=12", "data.text.batch_size=2", "data.text.shuffle_buffer=4",
        "data.text.epoch_samples=4", "data.text.num_workers=1", "eval.tasks=[]",
    ]
    train(load_config("mbart_base.yaml", base), output_dir=tmp_path / "base")
    logged = [json.loads(line) for line in (tmp_path / "base" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 1 and math.isfinite(logged[-1]["train/loss"])
