"""BERT's WordPiece tokenizer (``vocab.txt``), for fusion models imported from Hugging Face.

Devlin et al. 2019, sec. 3 ("WordPiece embeddings with a 30,000 token vocabulary");
VisualBERT and ViLBERT checkpoints use BERT's vocabulary. Text is normalised and
split as Hugging Face's ``BertTokenizer`` does (lower-casing and accent stripping
for uncased vocabularies, splitting on punctuation and CJK characters) and each
word is cut greedily into the longest vocabulary pieces, word-internal ones
written ``##piece``. The work is done by the ``tokenizers`` library (installed
with ``transformers``, and with mmptm's ``[interop]`` extra), so the ids are
Hugging Face's. Rows are ``[CLS] ids [SEP]`` right-padded with ``[PAD]``, the
layout of every mmptm tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmptm.data_pipelines.tokenizer import check_context_length, pack_rows

WORDPIECE_VOCAB_FILENAME = "vocab.txt"
# Hugging Face's tokenizer options, of which the casing is read (and written, so the folder stays loadable by it).
TOKENIZER_CONFIG_FILENAME = "tokenizer_config.json"
SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "bos": "[CLS]", "eos": "[SEP]", "mask": "[MASK]"}


class WordPieceTokenizer:
    """BERT's WordPiece tokenizer over a ``vocab.txt`` (one piece per line, the line number is the id).

    Args:
        vocab_file: the vocabulary.
        context_length: length of the rows :meth:`__call__` returns, ``[CLS]`` and ``[SEP]`` included.
        lowercase: lower-case and strip accents first (uncased BERT vocabularies); None: read
            ``do_lower_case`` from a ``tokenizer_config.json`` next to the vocabulary, else True.

    Raises:
        ImportError: the ``tokenizers`` library is missing.
        ValueError: the vocabulary lacks one of BERT's special pieces.
    """

    def __init__(self, vocab_file: str | os.PathLike, context_length: int = 77, lowercase: bool | None = None) -> None:
        try:
            from tokenizers import BertWordPieceTokenizer
        except ImportError:  # pragma: no cover - installed with transformers and the [interop] extra
            raise ImportError("BERT WordPiece vocabularies need the 'tokenizers' package: pip install tokenizers") \
                from None
        self._path = Path(vocab_file)
        if lowercase is None:
            options_file = self._path.parent / TOKENIZER_CONFIG_FILENAME
            options = json.loads(options_file.read_text(encoding="utf-8")) if options_file.is_file() else {}
            lowercase = bool(options.get("do_lower_case", True))
        self.lowercase = lowercase
        self.context_length = check_context_length(context_length)
        self._tokenizer = BertWordPieceTokenizer(str(self._path), lowercase=lowercase, strip_accents=lowercase)
        self._ids = {}
        for name, piece in SPECIAL_TOKENS.items():
            token_id = self._tokenizer.token_to_id(piece)
            if token_id is None:
                raise ValueError(f"WordPiece vocabulary '{self._path}' has no {piece} piece (BERT's {name} token)")
            self._ids[name] = token_id

    def __reduce__(self) -> tuple[Any, ...]:  # picklable for DataLoader workers
        return (WordPieceTokenizer, (self._path, self.context_length, self.lowercase))

    def __repr__(self) -> str:
        return f"WordPieceTokenizer('{self._path}', vocab_size={self.vocab_size}, context_length={self.context_length})"

    @property
    def vocab_size(self) -> int:
        """Number of ids (lines of ``vocab.txt``)."""
        return self._tokenizer.get_vocab_size()

    @property
    def pad_id(self) -> int:
        return self._ids["pad"]

    @property
    def unk_id(self) -> int:
        return self._ids["unk"]

    @property
    def bos_id(self) -> int:
        """``[CLS]``."""
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        """``[SEP]``."""
        return self._ids["eos"]

    @property
    def mask_id(self) -> int:
        """``[MASK]``."""
        return self._ids["mask"]

    def encode(self, text: str) -> list[int]:
        """The piece ids of ``text``, without ``[CLS]``/``[SEP]``."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids``, special pieces dropped and ``##`` pieces joined to their word."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """``LongTensor[B, context_length]``: ``[CLS] ids [SEP]``, ids truncated so that ``[SEP]`` stays, padded."""
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length if context_length is None else check_context_length(context_length)
        return pack_rows([self.encode(text) for text in texts], length, self.bos_id, self.eos_id, self.pad_id)

    def save(self, directory: str | os.PathLike) -> Path:
        """Copy ``vocab.txt`` into ``directory`` with a ``tokenizer_config.json`` holding the casing.

        Returns:
            ``directory``, which :func:`~mmptm.data_pipelines.tokenizer.load_tokenizer` and Hugging Face's
            ``BertTokenizer.from_pretrained`` load.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self._path.resolve() != (directory / WORDPIECE_VOCAB_FILENAME).resolve():
            shutil.copyfile(self._path, directory / WORDPIECE_VOCAB_FILENAME)
        options = {"tokenizer_class": "BertTokenizer", "do_lower_case": self.lowercase}
        (directory / TOKENIZER_CONFIG_FILENAME).write_text(json.dumps(options, indent=2), encoding="utf-8")
        return directory
