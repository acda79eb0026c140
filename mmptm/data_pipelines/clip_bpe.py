"""OpenAI CLIP's byte-level BPE tokenizer, for models imported from OpenCLIP or Hugging Face.

CLIP (Radford et al. 2021) tokenizes lower-cased text with a byte-level BPE
(Sennrich et al. 2016) of 49408 ids: 256 byte symbols, the same 256 ending a
word (``</w>``), 48894 merges, ``<|startoftext|>`` and ``<|endoftext|>``. This
is a re-implementation of open_clip's ``SimpleTokenizer`` with its default
cleaning (``clean="lower"``) that gives the ids of ``open_clip.tokenize`` and
reads and writes the ``vocab.json`` + ``merges.txt`` pair of Hugging Face's
``CLIPTokenizer``, so an imported model sees the ids it was trained on.

Text never yields the special ids: open_clip turns a literal
``<start_of_text>`` / ``<end_of_text>`` in a caption into them (and Hugging Face
a literal ``<|startoftext|>`` / ``<|endoftext|>``); here such text is tokenized
like any other, so a caption cannot end its own sequence early. Hugging Face's
``CLIPTokenizer`` (transformers >= 5; ``CLIPTokenizerFast`` before) normalises
with NFC and a lower case without Python's final-sigma rule, without ftfy and
HTML unescaping, so it gives other ids where that cleaning changes the text
(HTML entities, curly quotes, ligatures, full-width letters, mojibake, a
capital sigma ending a word); on the cleaned text the ids are the same.
"""

from __future__ import annotations

import functools
import gzip
import html
import itertools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ftfy
import regex
import torch

from mmptm.data_pipelines.tokenizer import (
    MERGES_FILENAME,
    VOCAB_FILENAME,
    as_id_list,
    check_context_length,
    pack_rows,
)

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# open_clip pads with 0, which is also the id of the symbol "!" (see ClipBPETokenizer.decode).
PAD_ID = 0
# open_clip's merges file holds more merges than CLIP uses: 49152 ids minus 256 bytes and 2 special tokens.
OPEN_CLIP_NUM_MERGES = 49152 - 256 - 2
MERGES_HEADER = "#version: 0.2"
# The pre-tokenizer of OpenAI CLIP: English contractions, letter runs, single digits, other non-space runs.
WORD_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
WORD_CACHE_SIZE = 100_000


@functools.cache
def byte_symbols() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters, the alphabet of the BPE.

    Printable Latin-1 bytes map to themselves; the others (control, whitespace)
    to the characters from U+0100 on, in byte order. The dict's order, printable
    bytes first, is the order of the first 256 ids of CLIP's vocabulary.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    symbols = {byte: chr(byte) for byte in printable}
    symbols.update({byte: chr(256 + index) for index, byte in enumerate(others)})
    return symbols


def clean_text(text: str) -> str:
    """open_clip's default text cleaning: ftfy, HTML unescaped twice, whitespace runs folded, lower case.

    Args:
        text: raw text.

    Returns:
        The cleaned text, without leading or trailing whitespace.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class ClipBPETokenizer:
    """Text -> ``LongTensor[B, context_length]`` with CLIP's byte-level BPE, as ``open_clip.tokenize``.

    Build one with :meth:`from_directory` (Hugging Face's ``vocab.json`` +
    ``merges.txt``) or :meth:`from_open_clip_merges` (open_clip's
    ``bpe_simple_vocab_16e6.txt.gz``); the constructor takes the parsed files.

    Args:
        vocab: symbol -> id, ids ``0..len(vocab)-1``; holds the 512 byte symbols,
            every merge result, ``<|startoftext|>`` and ``<|endoftext|>``.
        merges: symbol pairs, highest priority first.
        context_length: length of the rows :meth:`__call__` returns, bos and eos included.

    Raises:
        ValueError: the vocabulary and merges do not form a CLIP byte-level BPE.
    """

    def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], context_length: int = 77) -> None:
        self.context_length = check_context_length(context_length)
        self._encoder = dict(vocab)
        self._merges = [tuple(pair) for pair in merges]
        _check_vocab(self._encoder, self._merges)
        self._decoder = {index: symbol for symbol, index in self._encoder.items()}
        self._ranks = {pair: rank for rank, pair in enumerate(self._merges)}
        self._byte_symbols = byte_symbols()
        self._symbol_bytes = {symbol: bytes([byte]) for byte, symbol in self._byte_symbols.items()}
        # Captions repeat words, and BPE of a word is the slow part; cache it per instance.
        self._word_ids = functools.lru_cache(maxsize=WORD_CACHE_SIZE)(self._bpe_ids)

    @classmethod
    def from_directory(cls, directory: str | os.PathLike, context_length: int = 77) -> ClipBPETokenizer:
        """Load Hugging Face's ``vocab.json`` + ``merges.txt`` (as :meth:`save` writes them).

        Args:
            directory: the directory holding both files.
            context_length: as in the constructor.

        Raises:
            FileNotFoundError: a file is missing.
            ValueError: a file is malformed.
        """
        directory = Path(directory)
        vocab_path, merges_path = directory / VOCAB_FILENAME, directory / MERGES_FILENAME
        for path in (vocab_path, merges_path):
            if not path.is_file():
                raise FileNotFoundError(f"CLIP tokenizer file '{path}' not found")
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"'{vocab_path}' is not valid JSON: {err}") from None
        if not isinstance(vocab, dict) or not all(type(index) is int for index in vocab.values()):
            raise ValueError(f"'{vocab_path}' must hold a JSON object of symbol -> integer id")
        lines = merges_path.read_text(encoding="utf-8").splitlines()
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        return cls._from_parsed(directory, vocab, _parse_merges(lines, merges_path), context_length)

    @classmethod
    def from_open_clip_merges(cls, path: str | os.PathLike, context_length: int = 77) -> ClipBPETokenizer:
        """Load open_clip's gzipped merges file and build the vocabulary from it, as open_clip does.

        Args:
            path: ``bpe_simple_vocab_16e6.txt.gz`` (``open_clip.tokenizer.default_bpe()``).
            context_length: as in the constructor.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: the file is not a gzipped merges file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"open_clip merges file '{path}' not found")
        try:
            lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"'{path}' is not a gzipped UTF-8 merges file: {err}") from None
        # The first line is a header; CLIP uses only the first merges.
        merges = _parse_merges(lines[1 : OPEN_CLIP_NUM_MERGES + 1], path)
        symbols = list(byte_symbols().values())
        vocab_symbols = [*symbols, *(symbol + END_OF_WORD for symbol in symbols)]
        vocab_symbols += [first + second for first, second in merges] + [BOS_TOKEN, EOS_TOKEN]
        vocab = {symbol: index for index, symbol in enumerate(vocab_symbols)}
        return cls._from_parsed(path, vocab, merges, context_length)

    @classmethod
    def _from_parsed(
        cls, source: Path, vocab: dict[str, int], merges: list[tuple[str, str]], context_length: int
    ) -> ClipBPETokenizer:
        """The tokenizer of parsed files, with ``source`` named in a validation error."""
        try:
            return cls(vocab, merges, context_length)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def __reduce__(self) -> tuple[Any, ...]:
        # DataLoader workers receive the tokenizer pickled: ship the vocabulary, not the word cache.
        return type(self), (self._encoder, self._merges, self.context_length)

    def __repr__(self) -> str:
        return f"ClipBPETokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return len(self._encoder)

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def unk_id(self) -> int:
        """``<|endoftext|>``, Hugging Face's unknown token; byte-level BPE never needs one."""
        return self.eos_id

    @property
    def bos_id(self) -> int:
        return self._encoder[BOS_TOKEN]

    @property
    def mask_id(self) -> None:
        """None: CLIP's vocabulary has no mask token, so masked-LM objectives refuse this tokenizer."""
        return None

    @property
    def eos_id(self) -> int:
        return self._encoder[EOS_TOKEN]

    def _bpe_ids(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized word: its UTF-8 bytes' symbols, merged by rank until no merge applies."""
        symbols = [self._byte_symbols[byte] for byte in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        while len(symbols) > 1:
            best = min(itertools.pairwise(symbols), key=lambda pair: self._ranks.get(pair, len(self._ranks)))
            if best not in self._ranks:
                break
            merged, index = [], 0
            while index < len(symbols):
                if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == best:
                    merged.append(best[0] + best[1])
                    index += 2
                else:
                    merged.append(symbols[index])
                    index += 1
            symbols = merged
        return tuple(self._encoder[symbol] for symbol in symbols)

    def encode(self, text: str) -> list[int]:
        """Ids of one text, without bos/eos, after :func:`clean_text`.

        Args:
            text: raw text.

        Returns:
            The ids of the BPE symbols of each pre-tokenized word.
        """
        return [index for word in WORD_PATTERN.findall(clean_text(text)) for index in self._word_ids(word)]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one id sequence; bos, eos and everything after the first eos (padding) are dropped.

        Padding is recognised by its place, not its id, since ``pad_id`` 0 is also
        the symbol ``"!"``. Words are joined by single spaces, so a word and its
        punctuation come back apart (``"a cat." -> "a cat ."``), as in open_clip.

        Args:
            ids: a list of ids or a 1-D tensor, e.g. a row of :meth:`__call__`'s output.

        Returns:
            The text as :func:`clean_text` left it, pre-tokenized words separated by spaces.
        """
        ids = as_id_list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        text = bytearray()
        for index in ids:
            if index == self.bos_id:
                continue
            symbol = self._decoder[index]
            piece = symbol.removesuffix(END_OF_WORD)
            text += b"".join(self._symbol_bytes[char] for char in piece)
            if piece != symbol:
                text += b" "
        return text.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Token ids of a batch of texts, as ``open_clip.tokenize``.

        Args:
            texts: one text or a sequence of texts.
            context_length: row length (default: the tokenizer's ``context_length``).

        Returns:
            ``LongTensor[B, context_length]``: ``bos + ids + eos``, ids truncated
            so that ``eos`` is always kept, right-padded with 0.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length if context_length is None else check_context_length(context_length)
        return pack_rows([self.encode(text) for text in texts], length, self.bos_id, self.eos_id, self.pad_id)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``vocab.json`` and ``merges.txt`` into ``directory``, as Hugging Face's CLIPTokenizer reads them.

        Returns:
            ``directory``, which :meth:`from_directory` and ``CLIPTokenizer.from_pretrained`` load.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab = dict(sorted(self._encoder.items(), key=lambda item: item[1]))
        (directory / VOCAB_FILENAME).write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
        merges = "".join(f"{first} {second}\n" for first, second in self._merges)
        (directory / MERGES_FILENAME).write_text(f"{MERGES_HEADER}\n{merges}", encoding="utf-8")
        return directory


def _parse_merges(lines: Sequence[str], source: Path) -> list[tuple[str, str]]:
    """Symbol pairs of merges-file lines ``"first second"``; blank lines are skipped."""
    merges = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        pair = line.split()
        if len(pair) != 2:
            raise ValueError(f"{source}: merge {number} must be two symbols separated by a space, got {line!r}")
        merges.append((pair[0], pair[1]))
    return merges


def _check_vocab(vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Raise ValueError unless ``vocab`` and ``merges`` form a CLIP byte-level BPE."""
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"vocabulary ids must be 0..{len(vocab) - 1}, each once")
    symbols = byte_symbols().values()
    required = [BOS_TOKEN, EOS_TOKEN, *symbols, *(symbol + END_OF_WORD for symbol in symbols)]
    missing = [symbol for symbol in required if symbol not in vocab]
    if missing:
        raise ValueError(f"not a CLIP byte-level vocabulary: {len(missing)} symbols missing, e.g. {missing[:3]}")
    for rank, (first, second) in enumerate(merges):
        if first + second not in vocab:
            raise ValueError(f"merge {rank} ({first!r} {second!r}) makes {first + second!r}, not in the vocabulary")
