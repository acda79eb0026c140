"""The sentencepiece tokenizer, its training inputs and temperature-based language sampling."""

from __future__ import annotations

import io
import json
import math
import pickle
import random
import re
import tarfile
import unicodedata
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmptm.data_pipelines.demo import DEMO_LANGUAGES, caption_by_language, demo_classnames
from mmptm.data_pipelines.language_sampling import allocate, language_sampling_probs, sample_by_language
from mmptm.data_pipelines.tokenizer import SentencePieceTokenizer, read_corpus, train_tokenizer_cli

# Letters of the demo languages (Latin with diacritics, Cyrillic, Turkish
# dotted/dotless i), digits, punctuation, characters NFKC rewrites (ligature,
# ellipsis, superscript, full-width) and characters no demo caption has
# (emoji, CJK), which only byte fallback can encode.
ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"-()<>/"
    "àâäçéèêëîïôöûùüÿœæßáíóúñ¿¡ãõąćęłńśźżÀÉÖÜÇŁŻ"
    "абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВЁЖЯ"
    "çğıöşüİĞŞ"
    "ﬁ…²Ａ🙂🎉数字"
)


def demo_caption_corpus() -> list[str]:
    classnames = demo_classnames()
    return [
        caption
        for digit in range(10)
        for captions in caption_by_language(classnames, digit).values()
        for caption in captions
        for _ in range(20)
    ]


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def tokenizer(request, tmp_path_factory) -> SentencePieceTokenizer:
    path = tmp_path_factory.mktemp(request.param) / "spm.model"
    SentencePieceTokenizer.train(demo_caption_corpus(), path, vocab_size=600, model_type=request.param)
    return SentencePieceTokenizer(path, context_length=16)


def normalised(text: str) -> str:
    """What sentencepiece's nmt_nfkc normaliser makes of text over ALPHABET."""
    return re.sub(" +", " ", unicodedata.normalize("NFKC", text)).strip(" ")


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=60))
def test_decode_inverts_encode_up_to_normalisation(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.unk_id not in ids  # byte fallback: nothing is unknown
    assert tokenizer.decode(ids) == normalised(text)


def test_special_ids_are_fixed(tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert 256 + 4 < tokenizer.vocab_size <= 600


def test_batch_is_bos_pieces_eos_right_padded(tokenizer):
    texts = ["the handwritten digit seven.", "sept"]
    tokens = tokenizer(texts)
    assert tokens.dtype == torch.long and tokens.shape == (2, 16)
    for row, text in zip(tokens.tolist(), texts, strict=True):
        pieces = tokenizer.encode(text)
        assert row[: len(pieces) + 2] == [tokenizer.bos_id, *pieces, tokenizer.eos_id]
        assert set(row[len(pieces) + 2 :]) <= {tokenizer.pad_id}
    assert tokenizer.decode(tokens[1]) == "sept"


def test_truncation_keeps_eos(tokenizer):
    text = "отсканированное изображение рукописной цифры девять. " * 3
    pieces = tokenizer.encode(text)
    assert len(pieces) > 16
    for length in (2, 3, 16):
        row = tokenizer(text, context_length=length)[0].tolist()
        assert row == [tokenizer.bos_id, *pieces[: length - 2], tokenizer.eos_id]
    assert tokenizer("one").shape == (1, 16)
    with pytest.raises(ValueError, match="context_length"):
        tokenizer("one", context_length=1)


def test_save_copies_the_model_and_pickling_keeps_it(tokenizer, tmp_path):
    saved = tokenizer.save(tmp_path / "checkpoint")
    assert saved == tmp_path / "checkpoint" / "tokenizer.model"
    assert saved.read_bytes() == tokenizer.path.read_bytes()
    clone = pickle.loads(pickle.dumps(tokenizer))
    texts = ["un'immagine scansionata della cifra otto", "beş rakamının fotoğrafı 🙂"]
    assert torch.equal(clone(texts), tokenizer(texts))
    assert clone.path == tokenizer.path


def test_missing_invalid_or_incomplete_model_files_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.model"))):
        SentencePieceTokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "bad.model"))):
        SentencePieceTokenizer(tmp_path / "bad.model")
    model = io.BytesIO()  # sentencepiece's defaults have no pad id
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(demo_caption_corpus()), model_writer=model, vocab_size=100, minloglevel=2
    )
    (tmp_path / "nopad.model").write_bytes(model.getvalue())
    with pytest.raises(ValueError, match="no pad id"):
        SentencePieceTokenizer(tmp_path / "nopad.model")


def test_training_is_deterministic(tmp_path):
    corpus = {"en": demo_caption_corpus()[:600], "fr": demo_caption_corpus()[1000:1100]}
    options = dict(vocab_size=400, language_sampling_alpha=0.3, input_sentence_size=500, seed=3)
    first = SentencePieceTokenizer.train(corpus, tmp_path / "a" / "spm.model", **options)
    second = SentencePieceTokenizer.train(corpus, tmp_path / "b" / "spm.model", **options)
    assert first.read_bytes() == second.read_bytes()


def test_language_sampling_up_samples_a_rare_language_into_the_vocabulary(tmp_path):
    rng = random.Random(0)
    words = "the a of digit number photo image scanned written hand small large black white paper pen".split()
    corpus = {
        "en": [" ".join(rng.choice(words) for _ in range(8)) for _ in range(2000)],
        "tr": ["kelebekler uçuyor bahçede"] * 3,
    }
    lengths = {}
    for alpha in (None, 0.0):
        path = SentencePieceTokenizer.train(
            corpus, tmp_path / f"{alpha}.model", vocab_size=400, model_type="bpe", language_sampling_alpha=alpha
        )
        lengths[alpha] = len(SentencePieceTokenizer(path).encode("uçuyor bahçede"))
    # At its natural 0.15% share "ç" falls outside the character coverage and
    # costs two byte pieces; with uniform sampling Turkish words become pieces.
    assert lengths[0.0] < lengths[None]


def test_train_input_forms(tmp_path):
    texts = ["bonjour le monde", "hello world"] * 20
    langs = ["fr", "en"] * 20
    assert SentencePieceTokenizer.train(texts, tmp_path / "flat.model", vocab_size=300).is_file()
    assert SentencePieceTokenizer.train(
        texts, tmp_path / "langs.model", vocab_size=300, languages=langs, language_sampling_alpha=0.5
    ).is_file()
    (tmp_path / "en.txt").write_text("hello world\n" * 20, encoding="utf-8")
    (tmp_path / "fr.txt").write_text("bonjour le monde\n" * 20, encoding="utf-8")
    files = [tmp_path / "en.txt", tmp_path / "fr.txt"]
    assert SentencePieceTokenizer.train(files, tmp_path / "files.model", vocab_size=300).is_file()
    with pytest.raises(ValueError, match="2 texts but 1 languages"):
        SentencePieceTokenizer.train(texts[:2], tmp_path / "x.model", languages=["fr"])
    with pytest.raises(TypeError, match="not one string"):
        SentencePieceTokenizer.train("hello world", tmp_path / "x.model")
    with pytest.raises(ValueError, match="empty corpus"):
        SentencePieceTokenizer.train([], tmp_path / "x.model")
    with pytest.raises(ValueError, match="model_type"):
        SentencePieceTokenizer.train(texts, tmp_path / "x.model", model_type="wordpiece")


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, files in enumerate(samples):
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_read_corpus_reads_text_jsonl_and_shards(tmp_path):
    (tmp_path / "wiki.de.txt").write_text("Hallo Welt\n\n  Guten Tag  \n", encoding="utf-8")
    (tmp_path / "mixed.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [{"text": "bonjour", "lang": "fr"}, {"text": "ciao"}, {"lang": "es"}]) + "\n",
        encoding="utf-8",
    )
    write_shard(
        tmp_path / "pl.tar",
        [
            {"json": json.dumps({"text": "dzień dobry"}).encode()},
            {
                "png": b"\x89PNG",
                "txt": b"a photo",
                "json": json.dumps({"captions": {"en": "a photo", "ru": ["фото", "снимок"]}}).encode(),
            },
            {"png": b"\x89PNG", "txt": "zdjęcie".encode()},
        ],
    )
    corpus = read_corpus([tmp_path / "wiki.de.txt", tmp_path / "mixed.jsonl", tmp_path / "pl.tar"])
    assert corpus == {
        "de": ["Hallo Welt", "Guten Tag"],
        "fr": ["bonjour"],
        "mixed": ["ciao"],
        "pl": ["dzień dobry", "zdjęcie"],
        "en": ["a photo"],
        "ru": ["фото", "снимок"],
    }
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_corpus([tmp_path / "missing.txt"])
    write_shard(tmp_path / "broken.tar", [{"json": b'{"text": '}])
    with pytest.raises(ValueError, match=r"broken\.tar: sample '000000'"):
        read_corpus([tmp_path / "broken.tar"])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"\.txt, \.jsonl or \.tar"):
        read_corpus([tmp_path / "data.csv"])


def test_train_tokenizer_cli_writes_a_loadable_model(tmp_path):
    (tmp_path / "en.txt").write_text("\n".join(demo_caption_corpus()[:400]), encoding="utf-8")
    (tmp_path / "ru.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "lang": "ru"}) for t in ["рукописная цифра пять.", "цифра семь."] * 5),
        encoding="utf-8",
    )
    out = train_tokenizer_cli(
        [str(tmp_path / "en.txt"), str(tmp_path / "ru.jsonl")],
        str(tmp_path / "out" / "spm.model"),
        vocab_size=400,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        alpha=0.3,
    )
    tok = SentencePieceTokenizer(out)
    assert tok.decode(tok.encode("цифра семь.")) == "цифра семь."


@pytest.mark.parametrize("alpha", [0.3, 0.5, 1.0])
def test_language_sampling_probs_sum_to_one_and_keep_order(alpha):
    counts = {"en": 1_000_000, "fr": 50_000, "sw": 100}
    probs = language_sampling_probs(counts, alpha)
    assert list(probs) == list(counts)
    assert math.isclose(sum(probs.values()), 1.0)
    assert probs["en"] > probs["fr"] > probs["sw"] > 0


def test_language_sampling_limits():
    counts = {"en": 900, "fr": 90, "sw": 10}
    proportional = language_sampling_probs(counts, 1.0)
    assert proportional == pytest.approx({"en": 0.9, "fr": 0.09, "sw": 0.01})
    assert language_sampling_probs(counts, 0.0) == pytest.approx({lang: 1 / 3 for lang in counts})
    assert language_sampling_probs(counts, 1e-9) == pytest.approx({lang: 1 / 3 for lang in counts})
    # XLM's alpha=0.5: sw from 1% to sqrt(.01)/(sqrt(.9)+sqrt(.09)+sqrt(.01)) = 7.0%
    assert language_sampling_probs(counts, 0.5)["sw"] == pytest.approx(0.1 / (0.9**0.5 + 0.3 + 0.1))
    assert language_sampling_probs({"en": 5, "xx": 0}, 0.0) == {"en": 1.0, "xx": 0.0}
    with pytest.raises(ValueError, match="alpha"):
        language_sampling_probs(counts, -0.5)
    with pytest.raises(ValueError, match="negative"):
        language_sampling_probs({"en": -1}, 0.5)
    with pytest.raises(ValueError, match="no language"):
        language_sampling_probs({"en": 0}, 0.5)


@given(
    counts=st.dictionaries(st.sampled_from(DEMO_LANGUAGES), st.integers(0, 10**9), min_size=1).filter(
        lambda c: any(c.values())
    ),
    alpha=st.floats(0.0, 2.0),
    total=st.integers(0, 10_000),
)
def test_language_sampling_properties(counts, alpha, total):
    probs = language_sampling_probs(counts, alpha)
    assert math.isclose(sum(probs.values()), 1.0, rel_tol=1e-9)
    by_count = sorted(counts, key=counts.get)
    assert all(probs[a] <= probs[b] * (1 + 1e-12) for a, b in zip(by_count, by_count[1:], strict=False))
    parts = allocate(total, probs)
    assert sum(parts.values()) == total
    assert all(abs(parts[lang] - total * probs[lang]) < 1 for lang in counts)


def test_sample_by_language_repeats_rare_languages_and_subsamples_common_ones():
    texts = {"en": [f"en{i}" for i in range(90)], "sw": [f"sw{i}" for i in range(10)]}
    sampled = sample_by_language(texts, alpha=0.0, seed=1)
    assert len(sampled) == 100
    en = [s for s in sampled if s.startswith("en")]
    sw = [s for s in sampled if s.startswith("sw")]
    assert len(en) == len(sw) == 50
    assert len(set(en)) == 50  # drawn without replacement
    assert all(sw.count(s) == 5 for s in texts["sw"])  # every rare sentence repeated equally
    assert sample_by_language(texts, alpha=0.0, seed=1) == sampled
    assert sorted(sample_by_language(texts, alpha=1.0)) == sorted(texts["en"] + texts["sw"])
