"""CLIP's byte-level BPE tokenizer against open_clip and Hugging Face, and ``load_tokenizer``.

Hugging Face's CLIPTokenizer (tokenizers backend) normalises with NFC and a
lower case without the final-sigma rule: no ftfy, no HTML unescaping. It gives
open_clip's ids wherever open_clip's cleaning leaves the text as it is
(``HF_EQUAL_TEXTS``), and on ``CLEANED_TEXTS`` once cleaned with
:func:`clean_text`, but not on them raw. It also maps the literal special
tokens of ``SPECIAL_LITERAL_TEXTS`` to special ids, which open_clip and
ClipBPETokenizer do not. It pads with ``<|endoftext|>`` instead of 0, so the
comparison masks padding; its truncation keeps eos as open_clip's does.
"""

from __future__ import annotations

import pickle
import string

import open_clip
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import CLIPTokenizer, CLIPTokenizerFast

from mmptm.data_pipelines.clip_bpe import ClipBPETokenizer, clean_text
from mmptm.data_pipelines.tokenizer import TOKENIZER_FILES, SentencePieceTokenizer, load_tokenizer

# Texts that open_clip's cleaning leaves as they are, up to case and whitespace.
HF_EQUAL_TEXTS = [
    "a photo of a cat.",
    "A PHOTO OF A DOG!!!",
    "Crème brûlée à la française, naïve café",
    "Ünïcödé ÄÖÜ ß straße",
    "日本語のテキスト 中文 한국어",
    "Привет, мир! Ελληνικά σοφός",
    "emoji 🙂🎉👩‍👩‍👧 ❤️ flags 🇫🇷",
    "don't won't it's we're they've I'm you'll he'd O'Neil's 'tis",
    "numbers 1234567890 3.14159 1,000,000 2nd 10%",
    "multiple    spaces\tand\ttabs\nnew lines   ",
    "",
    "   ",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "see https://example.com/path?q=1 #hashtag @user !$ ?!?!",
    "word " * 100,
    "Ünïcödé 🙂 " * 40,
]
# Texts that ftfy, HTML unescaping or Python's lower case change otherwise than Hugging Face's normaliser:
# entities, curly quotes, ligature, full width, mojibake, a capital sigma ending a word.
CLEANED_TEXTS = [
    "fish &amp; chips &lt;b&gt; &#39;quoted&#39; &amp;amp;",
    "“curly quotes” and ‘single’ … ellipsis",
    "ﬁne ligature Ｆｕｌｌｗｉｄｔｈ",
    "mojibake cafÃ© naÃ¯ve",
    "ΟΔΟΣ",
]
SPECIAL_LITERAL_TEXTS = ["a literal <|endoftext|> or <|startoftext|> is text"]
TEXTS = HF_EQUAL_TEXTS + CLEANED_TEXTS + SPECIAL_LITERAL_TEXTS


@pytest.fixture(scope="module")
def tokenizer() -> ClipBPETokenizer:
    return ClipBPETokenizer.from_open_clip_merges(open_clip.tokenizer.default_bpe())


@pytest.fixture(scope="module")
def saved_dir(tokenizer, tmp_path_factory):
    return tokenizer.save(tmp_path_factory.mktemp("clip_bpe"))


def hf_ids(hf_tokenizer, texts: list[str], length: int = 77) -> torch.Tensor:
    """Hugging Face's ids in open_clip's layout: padding set to 0."""
    out = hf_tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return out["input_ids"] * out["attention_mask"]


@pytest.mark.parametrize("length", [77, 12])
def test_ids_equal_open_clip_tokenize(tokenizer, length):
    assert torch.equal(tokenizer(TEXTS, context_length=length), open_clip.tokenize(TEXTS, context_length=length))


def test_special_ids_and_layout(tokenizer):
    assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (49408, 0, 49406, 49407)
    assert tokenizer.unk_id == tokenizer.eos_id
    tokens = tokenizer(["a cat", "word " * 100])
    assert tokens.dtype == torch.long and tokens.shape == (2, 77)
    assert tokens[0, :4].tolist() == [49406, *tokenizer.encode("a cat"), 49407] and not tokens[0, 4:].any()
    assert tokens[1, 0] == 49406 and tokens[1, -1] == 49407


def test_text_never_yields_special_ids(tokenizer):
    """Unlike open_clip (``<end_of_text>``) and Hugging Face (``<|endoftext|>``), no literal is special."""
    for text in ["<|endoftext|> <|startoftext|>", "<end_of_text> <start_of_text>"]:
        assert not {tokenizer.bos_id, tokenizer.eos_id} & set(tokenizer.encode(text))
    assert open_clip.tokenize(["<start_of_text>"])[0, :3].tolist() == [49406, 49406, 49407]


def test_save_writes_hugging_face_files_and_reloads(tokenizer, saved_dir):
    assert sorted(path.name for path in saved_dir.iterdir()) == ["merges.txt", "vocab.json"]
    assert set(TOKENIZER_FILES) >= {"merges.txt", "vocab.json", "tokenizer.model"}
    assert (saved_dir / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    reloaded = ClipBPETokenizer.from_directory(saved_dir)
    assert torch.equal(reloaded(TEXTS), tokenizer(TEXTS))
    again = reloaded.save(saved_dir.parent / "again")
    for name in ("vocab.json", "merges.txt"):
        assert (again / name).read_bytes() == (saved_dir / name).read_bytes()


@pytest.mark.parametrize("hf_class", sorted({CLIPTokenizer, CLIPTokenizerFast}, key=lambda cls: cls.__name__))
def test_hugging_face_gives_the_same_ids(tokenizer, saved_dir, hf_class):
    hf_tokenizer = hf_class.from_pretrained(saved_dir)
    assert torch.equal(hf_ids(hf_tokenizer, HF_EQUAL_TEXTS), tokenizer(HF_EQUAL_TEXTS))
    assert torch.equal(hf_ids(hf_tokenizer, HF_EQUAL_TEXTS, 12), tokenizer(HF_EQUAL_TEXTS, context_length=12))
    cleaned = [clean_text(text) for text in CLEANED_TEXTS]
    assert torch.equal(hf_ids(hf_tokenizer, cleaned), tokenizer(CLEANED_TEXTS))
    # transformers < 5's slow CLIPTokenizer runs ftfy too; the tokenizers-backed one differs on every such text.
    differing = CLEANED_TEXTS + SPECIAL_LITERAL_TEXTS if hf_tokenizer.is_fast else SPECIAL_LITERAL_TEXTS
    for text in differing:
        assert not torch.equal(hf_ids(hf_tokenizer, [text]), tokenizer([text])), text


def test_decode_drops_special_ids_and_padding_but_keeps_id_zero(tokenizer):
    ids = tokenizer.encode("wow !$")
    assert tokenizer.pad_id in ids  # "!" is id 0, the padding id
    row = tokenizer(["wow !$"])[0]
    assert tokenizer.decode(row) == tokenizer.decode(ids) == "wow !$"
    assert tokenizer.decode(tokenizer(["A Photo of a CAT."])[0]) == "a photo of a cat ."
    with pytest.raises(ValueError, match="1-D"):
        tokenizer.decode(tokenizer(["a", "b"]))


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=string.printable, max_size=80))
def test_decode_inverts_encode_up_to_spaces_for_ascii(tokenizer, text):
    """Decoding returns the cleaned text with each pre-tokenized word followed by a space, as open_clip."""
    ids = tokenizer.encode(text)
    decoded = tokenizer.decode(ids)
    assert decoded.replace(" ", "") == clean_text(text).replace(" ", "")
    assert decoded == open_clip.tokenizer.decode(torch.tensor(ids, dtype=torch.long)).strip()
    assert tokenizer.encode(decoded) == ids


@settings(max_examples=100, deadline=None)
@given(words=st.lists(st.text(alphabet=string.ascii_letters, min_size=1, max_size=12), max_size=10))
def test_decode_inverts_encode_for_words(tokenizer, words):
    text = " ".join(words)
    assert tokenizer.decode(tokenizer.encode(text)) == text.lower()


def test_pickle_round_trip(saved_dir):
    tokenizer = ClipBPETokenizer.from_directory(saved_dir, context_length=16)
    tokenizer(TEXTS)  # fills the word cache, which is not shipped
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert isinstance(copy, ClipBPETokenizer) and copy.context_length == 16
    assert torch.equal(copy(TEXTS), tokenizer(TEXTS))


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    corpus = [f"the handwritten digit {word} number {index}" for index in range(200) for word in ("one", "two")]
    return SentencePieceTokenizer.train(corpus, path, vocab_size=300)


def test_load_tokenizer_dispatches_on_the_layout(tokenizer, saved_dir, sentencepiece_model):
    for path in (sentencepiece_model, sentencepiece_model.parent):
        loaded = load_tokenizer(path, context_length=20)
        assert isinstance(loaded, SentencePieceTokenizer) and loaded.context_length == 20
    for path in (saved_dir, open_clip.tokenizer.default_bpe()):
        loaded = load_tokenizer(path, context_length=20)
        assert isinstance(loaded, ClipBPETokenizer) and loaded.context_length == 20
        assert torch.equal(loaded(TEXTS), tokenizer(TEXTS, context_length=20))


def test_load_tokenizer_errors_name_the_path_and_layouts(tmp_path, saved_dir, sentencepiece_model):
    other_file = tmp_path / "other" / "captions.txt"
    other_file.parent.mkdir()
    other_file.write_text("a photo")
    for path in (tmp_path / "other", tmp_path / "missing", other_file):
        with pytest.raises(FileNotFoundError, match="tokenizer.model.*vocab.json.*merges.txt.*txt.gz") as err:
            load_tokenizer(path)
        assert str(path) in str(err.value)
    half = tmp_path / "half"
    half.mkdir()
    (half / "vocab.json").write_bytes((saved_dir / "vocab.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="no 'merges.txt'"):
        load_tokenizer(half)
    (half / "tokenizer.model").write_bytes(sentencepiece_model.read_bytes())
    with pytest.raises(ValueError, match="both"):
        load_tokenizer(half)


def test_malformed_files_raise_value_errors(tmp_path, saved_dir):
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n", encoding="utf-8")
    (tmp_path / "vocab.json").write_text('{"a": 0}', encoding="utf-8")
    with pytest.raises(ValueError, match="two symbols"):
        ClipBPETokenizer.from_directory(tmp_path)
    (tmp_path / "merges.txt").write_bytes((saved_dir / "merges.txt").read_bytes())
    with pytest.raises(ValueError, match="not a CLIP byte-level vocabulary"):
        ClipBPETokenizer.from_directory(tmp_path)
    (tmp_path / "vocab.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="symbol -> integer id"):
        ClipBPETokenizer.from_directory(tmp_path)
    (tmp_path / "bpe.txt.gz").write_text("not gzip")
    with pytest.raises(ValueError, match="not a gzipped"):
        load_tokenizer(tmp_path / "bpe.txt.gz")
