"""Sentencepiece models in fairseq's id layout: the tokenizers of XLM-R and mBART checkpoints.

fairseq (and Hugging Face's ``XLMRobertaTokenizer``, ``MBartTokenizer`` and
``MBart50Tokenizer``, which reproduce it) does not use a sentencepiece model's
own ids. Its dictionary starts with ``<s>=0, <pad>=1, </s>=2, <unk>=3``; the
model's pieces follow shifted by one (piece ``k >= 3`` gets id ``k + 1``, the
"fairseq offset"; the model's own ``<unk>, <s>, </s>`` at 0-2 are replaced by
the four specials); then mBART's language codes (Liu et al. 2020, sec. 2.1:
``en_XX``, ...), one id each in their order; then ``<mask>``, last. So
``xlm-roberta-base`` has ``250,000 + 1 + 1 = 250,002`` ids and
``mbart-large-cc25`` ``250,000 + 1 + 25 + 1 = 250,027``.

:class:`FairseqSentencePieceTokenizer` gives these ids with the interface of
:class:`~mmptm.data_pipelines.tokenizer.SentencePieceTokenizer`, so imported
XLM-R and mBART checkpoints train and evaluate on mmptm's pipelines. It is
stored in a checkpoint as Hugging Face stores it: ``sentencepiece.bpe.model``
plus a ``tokenizer_config.json`` that names the language codes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

from mmptm.data_pipelines.tokenizer import (
    FAIRSEQ_MODEL_FILENAME,
    WORD_BOUNDARY,
    as_id_list,
    check_context_length,
    pack_rows,
)

TOKENIZER_CONFIG_FILENAME = "tokenizer_config.json"
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# Piece k >= 3 of the sentencepiece model has id k + FAIRSEQ_OFFSET.
FAIRSEQ_OFFSET = 1
MASK_TOKEN = "<mask>"
# The language codes of the released mBART models, in their id order (Hugging Face's
# tokenization_mbart and tokenization_mbart50 hard-code the same lists).
MBART_CC25_LANGUAGE_CODES = (
    "ar_AR", "cs_CZ", "de_DE", "en_XX", "es_XX", "et_EE", "fi_FI", "fr_XX", "gu_IN", "hi_IN", "it_IT",
    "ja_XX", "kk_KZ", "ko_KR", "lt_LT", "lv_LV", "my_MM", "ne_NP", "nl_XX", "ro_RO", "ru_RU", "si_LK",
    "tr_TR", "vi_VN", "zh_CN",
)  # fmt: skip
MBART50_LANGUAGE_CODES = MBART_CC25_LANGUAGE_CODES + (
    "af_ZA", "az_AZ", "bn_IN", "fa_IR", "he_IL", "hr_HR", "id_ID", "ka_GE", "km_KH", "mk_MK", "ml_IN",
    "mn_MN", "mr_IN", "pl_PL", "ps_AF", "pt_XX", "sv_SE", "sw_KE", "ta_IN", "te_IN", "th_TH", "tl_XX",
    "uk_UA", "ur_PK", "xh_ZA", "gl_ES", "sl_SI",
)  # fmt: skip
# Hugging Face tokenizer classes of fairseq sentencepiece folders -> their built-in language codes.
HF_TOKENIZER_LANGUAGE_CODES: dict[str, tuple[str, ...]] = {
    "XLMRobertaTokenizer": (),
    "XLMRobertaTokenizerFast": (),
    "MBartTokenizer": MBART_CC25_LANGUAGE_CODES,
    "MBartTokenizerFast": MBART_CC25_LANGUAGE_CODES,
    "MBart50Tokenizer": MBART50_LANGUAGE_CODES,
    "MBart50TokenizerFast": MBART50_LANGUAGE_CODES,
}


class FairseqSentencePieceTokenizer:
    """Text -> ``LongTensor[B, context_length]`` in fairseq's ids (XLM-R, mBART) over a sentencepiece model.

    A batch row is ``<s> pieces </s>`` right-padded with ``<pad>`` (XLM-R's input layout, and the
    layout of every mmptm tokenizer); mBART's ``pieces </s> <lang>`` sources are built from
    :meth:`encode` and :attr:`language_token_ids` by the denoising pipeline.

    Args:
        path: the sentencepiece ``.model`` file (``sentencepiece.bpe.model`` in Hugging Face folders).
        context_length: length of the rows :meth:`__call__` returns, ``<s>`` and ``</s>`` included.
        language_codes: mBART's language codes, which get the ids after the pieces (none for XLM-R).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a sentencepiece model, one whose ids 0-2 are not ``<unk>`` and two control
            pieces (fairseq's layout would then give text pieces special ids), or repeated language codes.
    """

    def __init__(
        self, path: str | os.PathLike, context_length: int = 77, language_codes: Sequence[str] = ()
    ) -> None:
        self._path = Path(path)
        if not self._path.is_file():
            raise FileNotFoundError(f"sentencepiece model '{self._path}' not found")
        self.context_length = check_context_length(context_length)
        self.language_codes = tuple(language_codes)
        repeated = sorted({code for code in self.language_codes if self.language_codes.count(code) > 1})
        if repeated:
            raise ValueError(f"language codes {repeated} are given more than once")
        self._load(self._path.read_bytes())

    def _load(self, proto: bytes) -> None:
        self._proto = proto
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as err:
            raise ValueError(f"'{self._path}' is not a valid sentencepiece model: {err}") from None
        if self._sp.unk_id() != 0 or not (self._sp.is_control(1) and self._sp.is_control(2)):
            raise ValueError(
                f"sentencepiece model '{self._path}' does not have fairseq's layout (<unk>=0, <s>=1, </s>=2, "
                f"as XLM-R's and mBART's models have); it has unk={self._sp.unk_id()}, "
                f"pieces 1-2 {[self._sp.id_to_piece(i) for i in (1, 2)]}. An mmptm-trained model "
                "(pad=0, unk=1, bos=2, eos=3) is read by SentencePieceTokenizer instead"
            )
        first_extra = self._sp.get_piece_size() + FAIRSEQ_OFFSET
        self.language_token_ids = {code: first_extra + i for i, code in enumerate(self.language_codes)}
        self._extra_tokens = {**{i: code for code, i in self.language_token_ids.items()}, self.mask_id: MASK_TOKEN}
        self._word_start_table: torch.Tensor | None = None

    # DataLoader workers receive the tokenizer pickled; the C++ processor is not picklable.
    def __getstate__(self) -> dict[str, Any]:
        return {
            "path": self._path,
            "context_length": self.context_length,
            "language_codes": self.language_codes,
            "proto": self._proto,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._path = state["path"]
        self.context_length = state["context_length"]
        self.language_codes = state["language_codes"]
        self._load(state["proto"])

    def __repr__(self) -> str:
        return (
            f"FairseqSentencePieceTokenizer('{self._path}', vocab_size={self.vocab_size}, "
            f"languages={len(self.language_codes)}, context_length={self.context_length})"
        )

    @property
    def path(self) -> Path:
        """The model file this tokenizer was loaded from."""
        return self._path

    @property
    def vocab_size(self) -> int:
        """Number of ids: the specials, the pieces, the language codes and ``<mask>``."""
        return self._sp.get_piece_size() + FAIRSEQ_OFFSET + len(self.language_codes) + 1

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def mask_id(self) -> int:
        """``<mask>``: the last id."""
        return self.vocab_size - 1

    def _to_fairseq(self, piece_ids: list[int]) -> list[int]:
        return [UNK_ID if i == 0 else i + FAIRSEQ_OFFSET for i in piece_ids]

    def encode(self, text: str) -> list[int]:
        """Ids of one text, without ``<s>``/``</s>`` (the model normalises it first)."""
        return self._to_fairseq(self._sp.encode(text))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one id sequence, as Hugging Face's tokenizers decode it, with ``<s>``, ``<pad>``
        and ``</s>`` dropped: the pieces joined, ``▁`` read as a space (the first one dropped),
        ``<unk>``, language codes and ``<mask>`` written as their names, byte pieces as UTF-8."""
        text: list[str] = []
        pending = bytearray()  # consecutive byte-fallback pieces form one UTF-8 character
        for i in as_id_list(ids):
            if i in (BOS_ID, PAD_ID, EOS_ID):
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            if i > UNK_ID and i - FAIRSEQ_OFFSET < self._sp.get_piece_size() and self._sp.is_byte(i - FAIRSEQ_OFFSET):
                pending.append(int(self._sp.id_to_piece(i - FAIRSEQ_OFFSET)[3:5], 16))  # "<0xE2>"
                continue
            if pending:
                text.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            text.append(self._token(i))
        text.append(pending.decode("utf-8", errors="replace"))
        joined = "".join(text).replace(WORD_BOUNDARY, " ")
        return joined[1:] if joined.startswith(" ") else joined

    def _token(self, i: int) -> str:
        """The string of a non-byte id: its piece, or ``<unk>``, a language code, ``<mask>``."""
        if i == UNK_ID:
            return "<unk>"
        return self._extra_tokens.get(i) or self._sp.id_to_piece(i - FAIRSEQ_OFFSET)

    def word_starts(self, tokens: torch.Tensor) -> torch.Tensor:
        """True at ids of pieces that start a word (``▁...``); False at specials, language codes and ``<mask>``.

        Args:
            tokens: ids of any shape.

        Returns:
            A BoolTensor of the same shape: the ``word_starts`` of whole-word masking.
        """
        if self._word_start_table is None:
            table = torch.zeros(self.vocab_size, dtype=torch.bool)
            for piece_id in range(3, self._sp.get_piece_size()):
                table[piece_id + FAIRSEQ_OFFSET] = self._sp.id_to_piece(piece_id).startswith(WORD_BOUNDARY)
            self._word_start_table = table
        return self._word_start_table.to(tokens.device)[tokens]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Token ids of a batch of texts.

        Args:
            texts: one text or a sequence of texts.
            context_length: row length (default: the tokenizer's ``context_length``).

        Returns:
            ``LongTensor[B, context_length]``: ``<s> pieces </s>``, pieces truncated so that ``</s>``
            is kept, right-padded with ``<pad>`` (what ``XLMRobertaTokenizer`` gives).
        """
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length if context_length is None else check_context_length(context_length)
        ids = [self._to_fairseq(row) for row in self._sp.encode(list(texts))]
        return pack_rows(ids, length, BOS_ID, EOS_ID, PAD_ID)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``sentencepiece.bpe.model`` and ``tokenizer_config.json`` into ``directory``.

        The config names the language codes (read back by :func:`load_fairseq_tokenizer`) and, where
        the codes are a released model's, the Hugging Face tokenizer class that reads the folder.

        Returns:
            The model file written.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / FAIRSEQ_MODEL_FILENAME
        target.write_bytes(self._proto)
        config: dict[str, Any] = {"language_codes": list(self.language_codes)}
        hf_class = {(): "XLMRobertaTokenizer", MBART_CC25_LANGUAGE_CODES: "MBartTokenizer",
                    MBART50_LANGUAGE_CODES: "MBart50Tokenizer"}.get(self.language_codes)  # fmt: skip
        if hf_class is not None:
            config["tokenizer_class"] = hf_class
        (directory / TOKENIZER_CONFIG_FILENAME).write_text(json.dumps(config, indent=2) + "\n")
        return target


def load_fairseq_tokenizer(directory: str | os.PathLike, context_length: int = 77) -> FairseqSentencePieceTokenizer:
    """The fairseq-layout tokenizer of a folder holding ``sentencepiece.bpe.model``.

    Its language codes are ``tokenizer_config.json``'s ``language_codes`` (what
    :meth:`FairseqSentencePieceTokenizer.save` writes) or else those of its Hugging Face
    ``tokenizer_class`` (``MBartTokenizer``: mbart-large-cc25's 25, ``MBart50Tokenizer``: the 52 of
    mBART-50, ``XLMRobertaTokenizer`` or no config: none).

    Raises:
        FileNotFoundError: no ``sentencepiece.bpe.model`` in ``directory``.
        ValueError: an unreadable ``tokenizer_config.json``, a tokenizer class that is not a fairseq
            sentencepiece one, or ``language_codes`` that is not a list of strings.
    """
    directory = Path(directory)
    model = directory / FAIRSEQ_MODEL_FILENAME
    if not model.is_file():
        raise FileNotFoundError(f"no '{FAIRSEQ_MODEL_FILENAME}' in '{directory}'")
    config_path = directory / TOKENIZER_CONFIG_FILENAME
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{config_path}: not valid JSON ({err})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    codes = config.get("language_codes")
    if codes is None:
        tokenizer_class = config.get("tokenizer_class", "XLMRobertaTokenizer")
        if tokenizer_class not in HF_TOKENIZER_LANGUAGE_CODES:
            raise ValueError(
                f"{config_path}: tokenizer_class '{tokenizer_class}' is not a fairseq sentencepiece tokenizer; "
                f"expected one of {sorted(HF_TOKENIZER_LANGUAGE_CODES)} or a 'language_codes' list"
            )
        codes = HF_TOKENIZER_LANGUAGE_CODES[tokenizer_class]
    elif not isinstance(codes, list) or not all(isinstance(code, str) for code in codes):
        raise ValueError(f"{config_path}: 'language_codes' must be a list of strings, got {codes!r}")
    return FairseqSentencePieceTokenizer(model, context_length, codes)
