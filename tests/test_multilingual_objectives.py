"""The multilingual encoder, MMLM / TLM / CLWR / CLPC on fixed inputs, the evaluators and the bundled configs."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmptm.config import load_config
from mmptm.data_pipelines.context import DataContext
from mmptm.data_pipelines.demo import resolve
from mmptm.data_pipelines.tokenizer import load_tokenizer
from mmptm.encoders.multilingual import MultilingualEncoder
from mmptm.evaluation.common import EvalContext
from mmptm.evaluation.multilingual import mlm_accuracy, xlret, xltransfer
from mmptm.objectives.clpc import CrossLingualParaphraseClassification, in_batch_negatives
from mmptm.objectives.clwr import CrossLingualWordRecovery
from mmptm.objectives.masking import IGNORE_INDEX
from mmptm.objectives.mlm import MultilingualMaskedLM, TranslationLM, concat_pair
from mmptm.training.trainer import train

LANGS = ["en", "fr", "de"]
PAD, BOS, EOS, MASK = 0, 2, 3, 4


def tiny_model(**options) -> MultilingualEncoder:
    torch.manual_seed(0)
    settings_ = dict(width=32, layers=1, heads=2, max_positions=32, languages=LANGS, vocab_size=60, mask_id=MASK)
    return MultilingualEncoder(**{**settings_, **options})


def rows(lengths: list[int], width: int = 10, start: int = 5) -> torch.Tensor:
    tokens = torch.full((len(lengths), width), PAD)
    for i, n in enumerate(lengths):
        tokens[i, : n + 2] = torch.tensor([BOS, *range(start + i, start + i + n), EOS])
    return tokens


def pair_batch(size: int = 4) -> dict:
    return {
        "src_tokens": rows([3 + i % 3 for i in range(size)]),
        "tgt_tokens": rows([2 + i % 4 for i in range(size)], width=8, start=30),
        "src_lang": ["en"] * size,
        "tgt_lang": ["fr", "de"] * (size // 2),
    }


def test_tlm_masks_both_halves_resets_positions_and_switches_languages():
    model = tiny_model()
    batch = pair_batch()
    torch.manual_seed(1)
    pair, labels = TranslationLM().corrupt(model, batch)
    assert pair.tokens.shape == labels.shape == (4, 18)
    assert ((labels[:, :10] != IGNORE_INDEX).sum(dim=1) >= 1).all()
    assert ((labels[:, 10:] != IGNORE_INDEX).sum(dim=1) >= 1).all()
    assert pair.positions[0].tolist() == [*range(10), *range(8)]
    assert (pair.languages[:, :10] == 0).all()
    assert pair.languages[:, 10:].tolist() == [[1] * 8, [2] * 8, [1] * 8, [2] * 8]
    # Targets are the original tokens, never specials.
    original = torch.cat([batch["src_tokens"], batch["tgt_tokens"]], dim=1)
    chosen = labels != IGNORE_INDEX
    assert torch.equal(labels[chosen], original[chosen]) and (labels[chosen] > MASK).all()
    out = TranslationLM()(model, batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.language_embedding.weight.grad.abs().sum() > 0


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.lists(st.integers(1, 6), min_size=1, max_size=4))
def test_concat_pair_layout_property(src_lengths, tgt_lengths):
    size = min(len(src_lengths), len(tgt_lengths))
    src, tgt = rows(src_lengths[:size], width=8), rows(tgt_lengths[:size], width=8)
    pair = concat_pair(src, tgt, torch.zeros(size, dtype=torch.long), torch.ones(size, dtype=torch.long))
    assert torch.equal(pair.tokens[:, :8], src) and torch.equal(pair.tokens[:, 8:], tgt)
    assert torch.equal(pair.positions[:, 8:], pair.positions[:, :8])
    assert pair.languages.sum(dim=1).tolist() == [8] * size


def test_mmlm_whole_words_and_missing_mask_token():
    model = tiny_model()
    tokens = rows([6, 6])
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 1::2] = True  # two-piece words
    out = MultilingualMaskedLM(mask_prob=0.3, whole_word=True)(
        model, {"tokens": tokens, "word_starts": starts, "lang": ["en", "de"]}
    )
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="word_starts"):
        MultilingualMaskedLM(whole_word=True)(model, {"tokens": tokens, "lang": ["en", "en"]})
    with pytest.raises(ValueError, match="<mask>"):
        MultilingualMaskedLM()(tiny_model(mask_id=None), {"tokens": tokens, "lang": ["en", "en"]})
    with pytest.raises(ValueError, match="'sw'"):
        MultilingualMaskedLM()(model, {"tokens": tokens, "lang": ["en", "sw"]})


def test_clwr_recovers_source_words_from_target_embeddings():
    model = tiny_model()
    batch = pair_batch()
    out = CrossLingualWordRecovery()(model, batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and 0 <= out["acc"] <= 1
    assert model.word_recovery.weight.grad.abs().sum() > 0
    # Padding of the target gets no attention: adding more leaves the re-expression unchanged.
    source = model.token_embedding(batch["src_tokens"])
    target = batch["tgt_tokens"]
    longer = torch.cat([target, torch.full((4, 3), PAD)], dim=1)
    with torch.no_grad():
        model.word_recovery.weight.normal_()
        short = model.word_recovery(source, model.token_embedding(target), target != PAD)
        long = model.word_recovery(source, model.token_embedding(longer), longer != PAD)
    torch.testing.assert_close(short, long)


def test_clpc_negatives_come_from_other_rows():
    for size, k in ((2, 1), (5, 3), (8, 7)):
        negatives = in_batch_negatives(size, k, torch.device("cpu"))
        assert negatives.shape == (size, k)
        assert not (negatives == torch.arange(size)[:, None]).any()
        assert all(len(set(row)) == k for row in negatives.tolist())
    similarity = torch.tensor([[9.0, 1.0, 5.0], [2.0, 9.0, 1.0], [3.0, 4.0, 9.0]])
    assert in_batch_negatives(3, 1, torch.device("cpu"), similarity).squeeze(1).tolist() == [2, 0, 1]
    model = tiny_model()
    for hard in (False, True):
        out = CrossLingualParaphraseClassification(negatives=2, hard_negatives=hard)(model, pair_batch())
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and model.pair_classifier.weight.grad is not None
    dual = CrossLingualParaphraseClassification(mode="dual")
    out = dual(model, pair_batch())
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and set(out) == {"loss", "acc"}
    # Identical sentences on both sides: each source is most similar to its own "translation".
    same = pair_batch() | {"tgt_tokens": pair_batch()["src_tokens"], "tgt_lang": ["en"] * 4}
    assert dual(tiny_model().eval(), same)["acc"] == 1
    with pytest.raises(ValueError, match="mode"):
        CrossLingualParaphraseClassification(mode="bi")
    with pytest.raises(ValueError, match="at least 2"):
        CrossLingualParaphraseClassification()(model, pair_batch(size=2) | {
            k: v[:1] for k, v in pair_batch(size=2).items()})


def test_encoder_mean_pools_real_tokens_only():
    model = tiny_model().eval()
    tokens = rows([3, 5])
    langs = torch.tensor([0, 1])
    padded = torch.cat([tokens, torch.full((2, 4), PAD)], dim=1)
    torch.testing.assert_close(model.encode_text(tokens, languages=langs), model.encode_text(padded, languages=langs))
    assert model.encode_text(tokens, languages=langs, layer=1).shape == (2, 32)
    with pytest.raises(ValueError, match="languages"):
        model(tokens)
    assert tiny_model(language_embeddings=False).language_ids(["xx"]).tolist() == [0]


@pytest.fixture(scope="module")
def eval_context() -> EvalContext:
    tokenizer = load_tokenizer(resolve("demo:multilingual_tokenizer"), context_length=24)
    return EvalContext(tokenizer=tokenizer, data=DataContext(tokenizer=tokenizer, training=False))


def test_evaluators_on_held_out_data(eval_context):
    tokenizer = eval_context.tokenizer
    torch.manual_seed(0)
    model = MultilingualEncoder(width=32, layers=1, heads=2, max_positions=48, languages=["en", "fr", "de"],
                                vocab_size=tokenizer.vocab_size, mask_id=tokenizer.mask_id).eval()
    retrieval = xlret(model, eval_context, languages=["fr"])
    assert set(retrieval) == {"xlret_acc", "xlret_src_to_tgt", "xlret_tgt_to_src", "xlret_acc/en-fr"}
    assert 0 <= retrieval["xlret_acc"] <= 1
    transfer = xltransfer(model, eval_context, languages=["en", "fr"])
    assert set(transfer) == {"xltransfer_acc", "xltransfer_acc/en", "xltransfer_acc/fr"}
    assert transfer["xltransfer_acc"] == transfer["xltransfer_acc/fr"]
    mlm = mlm_accuracy(model, eval_context, languages=["de"])
    assert mlm["mlm_acc"] == mlm["mlm_acc/de"] < 0.2  # an untrained model
    assert mlm == mlm_accuracy(model, eval_context, languages=["de"])  # seeded masking


@pytest.mark.parametrize("name", ["mmlm_tiny.yaml", "xlm_tiny.yaml", "unicoder_tiny.yaml"])
def test_bundled_multilingual_configs_train(name, tmp_path):
    overrides = [
        "train.max_steps=2", "train.progress_bar=false", "train.tensorboard=false", "data.text.shuffle_buffer=10",
        "eval.tasks=[{name: xlret, languages: [fr]}]",
    ]
    if name != "mmlm_tiny.yaml":
        overrides.append("data.parallel.shuffle_buffer=10")
    config = load_config(name, overrides)
    metrics = train(config, output_dir=tmp_path)
    assert 0 <= metrics["eval/xlret_acc"] <= 1
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in record for record in logged)


def test_base_recipe_builds_and_steps(tmp_path):
    overrides = [
        "train.max_steps=1", "train.progress_bar=false", "train.tensorboard=false", "train.warmup_steps=0",
        "tokenizer.context_length=12", "eval.tasks=[]",
        *(f"data.{s}.{k}={v}" for s in ("text", "parallel") for k, v in
          (("batch_size", 2), ("shuffle_buffer", 4), ("num_workers", 1), ("epoch_samples", 4))),
    ]
    train(load_config("xlm_base.yaml", overrides), output_dir=tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 1 and "train/tlm/loss" in logged[-1]
