"""FairseqSentencePieceTokenizer against Hugging Face's XLM-R and mBART tokenizers on the same model."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from mmptm.data_pipelines.fairseq_spm import (
    MBART50_LANGUAGE_CODES,
    MBART_CC25_LANGUAGE_CODES,
    FairseqSentencePieceTokenizer,
    load_fairseq_tokenizer,
)
from mmptm.data_pipelines.tokenizer import SentencePieceTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "le renard brun saute par-dessus le chien paresseux",
    "der schnelle braune Fuchs springt über den faulen Hund",
    "one hundred and twenty-three thousand four hundred",
    "cent vingt-trois mille quatre cents",
    "hundertdreiundzwanzigtausendvierhundert",
]
# Unseen characters (<unk>), punctuation, repeated and leading/trailing spaces, an empty text.
TEXTS = ["the lazy fox", "  le   chien  ", "zzq über 123!", "", "hundert mille dog"]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    """A unigram model with fairseq's sentencepiece ids (<unk>=0, <s>=1, </s>=2, no pad), as XLM-R's."""
    root = tmp_path_factory.mktemp("fairseq_spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_prefix=str(root / "sp"), vocab_size=64, model_type="unigram",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    return root / "sp.model"


def hf_folder(root: Path, model: Path, tokenizer_class: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sentencepiece.bpe.model").write_bytes(model.read_bytes())
    (root / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class}))
    return root


@pytest.mark.parametrize(
    ("tokenizer_class", "codes"),
    [("XLMRobertaTokenizer", ()), ("MBartTokenizer", MBART_CC25_LANGUAGE_CODES),
     ("MBart50Tokenizer", MBART50_LANGUAGE_CODES)],
)  # fmt: skip
def test_ids_equal_hugging_face_tokenizers(tmp_path, spm_model, tokenizer_class, codes):
    folder = hf_folder(tmp_path / "hf", spm_model, tokenizer_class)
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    ours = load_tokenizer(folder, context_length=16)
    assert isinstance(ours, FairseqSentencePieceTokenizer)
    assert ours.language_codes == codes
    assert ours.vocab_size == len(reference)
    assert (ours.bos_id, ours.pad_id, ours.eos_id, ours.unk_id) == (0, 1, 2, 3)
    assert ours.mask_id == reference.mask_token_id == len(reference) - 1
    assert ours.language_token_ids == {code: reference.convert_tokens_to_ids(code) for code in codes}
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    for text in TEXTS:
        # fairseq encodes with sentencepiece itself; Hugging Face's MBart50Tokenizer adds a "▁" for
        # trailing whitespace, which sentencepiece's normalisation drops, so it sees collapsed spaces.
        assert ours.encode(text) == [3 if i == 0 else i + 1 for i in sp.encode(text)], text
        pieces = reference(" ".join(text.split()), add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == pieces, text
        if pieces:
            assert ours.decode(pieces) == reference.decode(pieces), text
    if not codes:  # XLM-R's batch rows: <s> X </s>, padded
        rows = reference(TEXTS, padding="max_length", max_length=16, truncation=True)["input_ids"]
        assert ours(TEXTS).tolist() == rows
    assert 3 in ours.encode("#"), "an unseen character is fairseq's <unk>"


def test_decode_keeps_language_codes_and_mask(spm_model):
    tokenizer = FairseqSentencePieceTokenizer(spm_model, language_codes=["en_XX", "fr_XX"])
    ids = tokenizer.encode("the lazy dog")
    fr = tokenizer.language_token_ids["fr_XX"]
    assert fr == tokenizer.vocab_size - 2 and tokenizer.mask_id == tokenizer.vocab_size - 1
    assert tokenizer.decode([0, *ids, tokenizer.mask_id, 2, fr, *ids, 1, 1]) == "the lazy dog<mask>fr_XX the lazy dog"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([tokenizer.vocab_size])


def test_word_starts_follow_the_pieces(spm_model):
    tokenizer = FairseqSentencePieceTokenizer(spm_model, language_codes=["en_XX"])
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    ids = tokenizer.encode("the quick brown fox")
    expected = [sp.id_to_piece(i - 1).startswith("\u2581") for i in ids]
    assert tokenizer.word_starts(torch.tensor(ids)).tolist() == expected
    assert any(expected) and not all(expected)
    special = torch.tensor([0, 1, 2, 3, tokenizer.language_token_ids["en_XX"], tokenizer.mask_id])
    assert not tokenizer.word_starts(special).any()


def test_save_load_and_pickle_round_trip(tmp_path, spm_model):
    tokenizer = FairseqSentencePieceTokenizer(spm_model, context_length=12, language_codes=["en_XX", "xx_YY"])
    tokenizer.save(tmp_path / "ckpt")
    again = load_tokenizer(tmp_path / "ckpt", context_length=12)
    assert isinstance(again, FairseqSentencePieceTokenizer)
    assert again.language_token_ids == tokenizer.language_token_ids
    assert torch.equal(again(TEXTS), tokenizer(TEXTS))
    assert load_tokenizer(tmp_path / "ckpt" / "sentencepiece.bpe.model").language_codes == ("en_XX", "xx_YY")
    unpickled = pickle.loads(pickle.dumps(tokenizer))
    assert torch.equal(unpickled(TEXTS), tokenizer(TEXTS)) and unpickled.mask_id == tokenizer.mask_id
    # Released language lists are saved with the Hugging Face class that reads them.
    FairseqSentencePieceTokenizer(spm_model, language_codes=MBART_CC25_LANGUAGE_CODES).save(tmp_path / "cc25")
    config = json.loads((tmp_path / "cc25" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "MBartTokenizer"
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "cc25"))
    assert reference.convert_tokens_to_ids("zh_CN") == load_tokenizer(tmp_path / "cc25").language_token_ids["zh_CN"]


def test_bad_inputs_are_refused_with_the_file_named(tmp_path, spm_model):
    # mmptm's own layout (pad=0, unk=1, bos=2, eos=3) is not fairseq's.
    own = SentencePieceTokenizer.train(CORPUS * 20, tmp_path / "own.model", vocab_size=320)
    with pytest.raises(ValueError, match="fairseq's layout"):
        FairseqSentencePieceTokenizer(own)
    with pytest.raises(ValueError, match="more than once"):
        FairseqSentencePieceTokenizer(spm_model, language_codes=["en_XX", "en_XX"])
    with pytest.raises(FileNotFoundError, match="sentencepiece.bpe.model"):
        load_fairseq_tokenizer(tmp_path)
    folder = hf_folder(tmp_path / "bert", spm_model, "BertTokenizer")
    with pytest.raises(ValueError, match="tokenizer_class 'BertTokenizer'.*MBartTokenizer"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"language_codes": "en_XX"}))
    with pytest.raises(ValueError, match="must be a list of strings"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tokenizer(folder)
    (folder / "tokenizer.model").write_bytes(own.read_bytes())
    with pytest.raises(ValueError, match="holds both 'tokenizer.model' and 'sentencepiece.bpe.model'"):
        load_tokenizer(folder)
