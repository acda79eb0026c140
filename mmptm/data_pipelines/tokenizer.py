"""The sentencepiece tokenizer of mmptm text towers, how to train one, and how to load any tokenizer.

Models are unigram (Kudo 2018) or BPE sentencepiece models (Kudo & Richardson
2018) with byte fallback, so no text maps to ``<unk>``. Ids are fixed at
training: ``pad=0, unk=1, bos=2, eos=3``, and models trained here add a
``<mask>`` piece (``mask_id``, id 4) for masked language modelling. A batch of texts becomes
``bos + pieces + eos`` right-padded with ``pad``, the layout open_clip's
tokenizer produces with its start/end-of-text tokens, so a text tower pools
the ``eos`` position.

Multilingual training corpora are re-balanced with temperature-based language
sampling (:mod:`mmptm.data_pipelines.language_sampling`).

Models imported from OpenCLIP or Hugging Face keep their own tokenizer
(:class:`~mmptm.data_pipelines.clip_bpe.ClipBPETokenizer` for CLIP,
:class:`~mmptm.data_pipelines.wordpiece.WordPieceTokenizer` for BERT-based fusion models,
:class:`~mmptm.data_pipelines.fairseq_spm.FairseqSentencePieceTokenizer` for XLM-R and mBART);
:func:`load_tokenizer` opens any kind from the files a checkpoint stores (:data:`TOKENIZER_FILES`).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import sentencepiece as spm
import torch

from mmptm.data_pipelines.language_sampling import sample_by_language

if TYPE_CHECKING:
    from mmptm.data_pipelines.clip_bpe import ClipBPETokenizer
    from mmptm.data_pipelines.fairseq_spm import FairseqSentencePieceTokenizer
    from mmptm.data_pipelines.wordpiece import WordPieceTokenizer

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# The mask token of masked language modelling (Devlin et al. 2019, sec. 3.1), a user-defined
# piece of every model :meth:`SentencePieceTokenizer.train` writes; it follows the special ids.
MASK_PIECE = "<mask>"
# Sentencepiece's marker of a word's first piece (the space it replaces).
WORD_BOUNDARY = "\u2581"
MODEL_FILENAME = "tokenizer.model"
# A CLIP byte-level BPE tokenizer, in the layout of Hugging Face's CLIPTokenizer.
VOCAB_FILENAME, MERGES_FILENAME = "vocab.json", "merges.txt"
# Every file a tokenizer's `save` may write into a checkpoint directory.
# BERT's WordPiece vocabulary (fusion models imported from Hugging Face), with its casing option.
WORDPIECE_FILES = ("vocab.txt", "tokenizer_config.json")
# A sentencepiece model in fairseq's id layout (XLM-R, mBART), named as Hugging Face names it.
FAIRSEQ_MODEL_FILENAME = "sentencepiece.bpe.model"
TOKENIZER_FILES = (MODEL_FILENAME, VOCAB_FILENAME, MERGES_FILENAME, *WORDPIECE_FILES, FAIRSEQ_MODEL_FILENAME)
# Sentences whose language is unknown (a plain text list, a record without one).
UNKNOWN_LANGUAGE = "und"


class SentencePieceTokenizer:
    """Text -> ``LongTensor[B, context_length]`` with a sentencepiece model.

    Args:
        path: the ``.model`` file.
        context_length: length of the rows :meth:`__call__` returns, bos and eos included.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a sentencepiece model, or it has no pad/bos/eos ids.
    """

    def __init__(self, path: str | os.PathLike, context_length: int = 77) -> None:
        self._path = Path(path)
        if not self._path.is_file():
            raise FileNotFoundError(f"sentencepiece model '{self._path}' not found")
        self.context_length = check_context_length(context_length)
        self._load(self._path.read_bytes())

    def _load(self, proto: bytes) -> None:
        self._proto = proto
        self._word_start_table: torch.Tensor | None = None
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError) as err:
            raise ValueError(f"'{self._path}' is not a valid sentencepiece model: {err}") from None
        missing = [name for name in ("pad", "bos", "eos") if getattr(self._sp, f"{name}_id")() < 0]
        if missing:
            raise ValueError(
                f"sentencepiece model '{self._path}' has no {'/'.join(missing)} id; train it with "
                f"pad_id={PAD_ID}, unk_id={UNK_ID}, bos_id={BOS_ID}, eos_id={EOS_ID} "
                "(SentencePieceTokenizer.train does)"
            )

    # DataLoader workers receive the tokenizer pickled; the C++ processor is
    # not picklable, so ship the model bytes and rebuild it on the other side.
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self._path, "context_length": self.context_length, "proto": self._proto}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._path = state["path"]
        self.context_length = state["context_length"]
        self._load(state["proto"])

    def __repr__(self) -> str:
        return (
            f"SentencePieceTokenizer('{self._path}', vocab_size={self.vocab_size}, "
            f"context_length={self.context_length})"
        )

    @property
    def path(self) -> Path:
        """The model file this tokenizer was loaded from."""
        return self._path

    @property
    def vocab_size(self) -> int:
        """Number of ids, special and byte pieces included."""
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def mask_id(self) -> int | None:
        """The id of the ``<mask>`` piece; None for a model trained without one (outside mmptm)."""
        mask = self._sp.piece_to_id(MASK_PIECE)
        return mask if mask != self.unk_id else None

    def word_starts(self, tokens: torch.Tensor) -> torch.Tensor:
        """Where words begin: True at pieces that start with sentencepiece's word boundary ``▁``.

        Args:
            tokens: ids of any shape.

        Returns:
            A BoolTensor of the same shape (False at special, byte and word-internal pieces), the
            ``word_starts`` of whole-word masking (:func:`mmptm.objectives.masking.bert_mask`).
        """
        if self._word_start_table is None:
            pieces = (self._sp.id_to_piece(i) for i in range(self.vocab_size))
            self._word_start_table = torch.tensor([piece.startswith(WORD_BOUNDARY) for piece in pieces])
        return self._word_start_table.to(tokens.device)[tokens]

    def encode(self, text: str) -> list[int]:
        """Piece ids of one text, without bos/eos.

        The model normalises first (NFKC, whitespace runs folded to one space,
        leading/trailing whitespace dropped), as :meth:`decode` shows.
        """
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one id sequence; pad, bos and eos ids are dropped (``<mask>`` stays, as its piece).

        Args:
            ids: a list of ids or a 1-D tensor, e.g. a row of :meth:`__call__`'s output.

        Returns:
            The normalised text.
        """
        special = {self.pad_id, self.bos_id, self.eos_id}
        return self._sp.decode([i for i in as_id_list(ids) if i not in special])

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Token ids of a batch of texts.

        Args:
            texts: one text or a sequence of texts.
            context_length: row length (default: the tokenizer's ``context_length``).

        Returns:
            ``LongTensor[B, context_length]``: ``bos + pieces + eos``, pieces
            truncated so that ``eos`` is always kept, right-padded with ``pad_id``.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length if context_length is None else check_context_length(context_length)
        return pack_rows(self._sp.encode(list(texts)), length, self.bos_id, self.eos_id, self.pad_id)

    def save(self, directory: str | os.PathLike) -> Path:
        """Copy the model file into ``directory`` as ``tokenizer.model``.

        Returns:
            The path written.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / MODEL_FILENAME
        target.write_bytes(self._proto)  # the loaded file's bytes, also after unpickling
        return target

    @staticmethod
    def train(
        texts: Iterable[str] | Iterable[os.PathLike] | Mapping[str, Iterable[str]],
        output_path: str | os.PathLike,
        vocab_size: int = 8000,
        model_type: str = "unigram",
        character_coverage: float = 0.9995,
        byte_fallback: bool = True,
        language_sampling_alpha: float | None = None,
        languages: Sequence[str] | None = None,
        seed: int = 0,
        input_sentence_size: int = 10_000_000,
        normalization_rule_name: str = "nmt_nfkc",
        user_defined_symbols: Sequence[str] = (),
    ) -> Path:
        """Train a sentencepiece model, deterministically, and write it to ``output_path``.

        The same inputs and seed give byte-identical model files: training is
        single-threaded, the sentences are chosen here (sentencepiece's own
        random subsampling is off) and the model is written from memory, so
        no temporary path ends up in the stored trainer settings.

        Args:
            texts: the corpus: sentences, a mapping ``{language: sentences}``,
                or ``pathlib.Path`` files read by :func:`read_corpus`.
            output_path: the ``.model`` file to write (parents are created).
            vocab_size: target vocabulary size; a soft limit, so a small corpus
                yields a smaller vocabulary instead of an error.
            model_type: ``"unigram"`` or ``"bpe"``.
            character_coverage: share of characters covered by pieces; the rare
                rest falls back to bytes (or ``<unk>`` without byte fallback).
            byte_fallback: encode characters outside the vocabulary as UTF-8 bytes.
            language_sampling_alpha: re-balance languages with ``q_i ∝ p_i^alpha``
                (needs languages: a mapping, ``languages`` or files); None: as is.
            languages: the language of each sentence when ``texts`` is a flat list.
            seed: seed of the sentence sampling.
            input_sentence_size: at most this many training sentences (a seeded
                sample when the corpus is larger); 0: no limit.
            normalization_rule_name: sentencepiece normaliser (``nmt_nfkc``,
                ``nfkc``, ``identity``, ...).
            user_defined_symbols: pieces always kept whole, besides ``<mask>`` (always added first,
                so that it gets the id after the special ids).

        Returns:
            ``output_path`` as a Path.
        """
        if model_type not in ("unigram", "bpe"):
            raise ValueError(f"model_type must be 'unigram' or 'bpe', got '{model_type}'")
        corpus = _as_corpus(texts, languages)
        num_sentences = sum(len(items) for items in corpus.values())
        if num_sentences == 0:
            raise ValueError("cannot train a tokenizer on an empty corpus")
        total = min(num_sentences, input_sentence_size) if input_sentence_size > 0 else num_sentences
        if language_sampling_alpha is not None:
            sentences = sample_by_language(corpus, language_sampling_alpha, total=total, seed=seed)
        else:
            sentences = [s for items in corpus.values() for s in items]
            if total < num_sentences:
                keep = np.random.default_rng(seed).choice(num_sentences, size=total, replace=False)
                sentences = [sentences[i] for i in sorted(keep)]
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                byte_fallback=byte_fallback,
                normalization_rule_name=normalization_rule_name,
                user_defined_symbols=list(dict.fromkeys([MASK_PIECE, *user_defined_symbols])),
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                hard_vocab_limit=False,
                input_sentence_size=0,
                num_threads=1,
                minloglevel=2,
            )
        except RuntimeError as err:
            raise ValueError(
                f"sentencepiece training failed ({num_sentences} sentences, vocab_size={vocab_size}): {err}"
            ) from err
        output_path = Path(output_path)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        output_path.write_bytes(model.getvalue())
        return output_path


def check_context_length(context_length: int) -> int:
    """``context_length`` itself, once checked to hold at least bos and eos.

    Raises:
        ValueError: ``context_length < 2``.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 to hold bos and eos, got {context_length}")
    return context_length


def pack_rows(sequences: Iterable[Sequence[int]], length: int, bos_id: int, eos_id: int, pad_id: int) -> torch.Tensor:
    """The batch layout of every mmptm tokenizer (open_clip's): ``bos + ids + eos``, right-padded.

    Args:
        sequences: the ids of each text, without bos/eos.
        length: row length; ids are truncated to ``length - 2`` so that eos is always kept.
        bos_id / eos_id / pad_id: the special ids.

    Returns:
        ``LongTensor[len(sequences), length]``.
    """
    rows = [[bos_id, *ids[: length - 2], eos_id] for ids in sequences]
    tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
    for index, row in enumerate(rows):
        tokens[index, : len(row)] = torch.tensor(row, dtype=torch.long)
    return tokens


def as_id_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    """One id sequence, a list or a 1-D tensor, as a list of ints (what the ``decode`` methods take).

    Raises:
        ValueError: a tensor that is not 1-D.
    """
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"decode takes one sequence (a 1-D tensor), got shape {tuple(ids.shape)}")
        return ids.tolist()
    return [int(i) for i in ids]


def load_tokenizer(
    directory_or_file: str | os.PathLike, context_length: int = 77
) -> SentencePieceTokenizer | ClipBPETokenizer | WordPieceTokenizer | FairseqSentencePieceTokenizer:
    """Open the tokenizer stored in a checkpoint directory or file, whichever kind it is.

    Accepted layouts:

    - a sentencepiece model: a ``.model`` file, or a directory holding ``tokenizer.model``
      (what :meth:`SentencePieceTokenizer.save` writes) -> :class:`SentencePieceTokenizer`;
    - a CLIP byte-level BPE tokenizer: a directory holding ``vocab.json`` and ``merges.txt``
      (Hugging Face's CLIPTokenizer files, what :meth:`ClipBPETokenizer.save` writes), or
      open_clip's ``.txt.gz`` merges file (``bpe_simple_vocab_16e6.txt.gz``) -> ``ClipBPETokenizer``;
    - BERT's WordPiece vocabulary: a ``vocab.txt`` file, or a directory holding one (and optionally
      Hugging Face's ``tokenizer_config.json`` with ``do_lower_case``) -> ``WordPieceTokenizer``;
    - XLM-R's or mBART's sentencepiece model in fairseq's id layout: a directory holding
      ``sentencepiece.bpe.model`` (a Hugging Face folder, or what
      :meth:`~mmptm.data_pipelines.fairseq_spm.FairseqSentencePieceTokenizer.save` writes), or that
      file itself -> ``FairseqSentencePieceTokenizer`` (language codes from ``tokenizer_config.json``).

    Args:
        directory_or_file: the directory or file.
        context_length: length of the rows the tokenizer returns, bos and eos included.

    Returns:
        The tokenizer.

    Raises:
        FileNotFoundError: the path does not exist or matches none of the layouts.
        ValueError: a directory holds two kinds of tokenizer.
    """
    # These build on this module's helpers, so they are imported only when needed.
    from mmptm.data_pipelines.clip_bpe import ClipBPETokenizer
    from mmptm.data_pipelines.fairseq_spm import load_fairseq_tokenizer
    from mmptm.data_pipelines.wordpiece import WordPieceTokenizer

    path = Path(directory_or_file)
    wordpiece_vocab = WORDPIECE_FILES[0]
    layouts = (
        f"a '.model' sentencepiece file, a directory with '{MODEL_FILENAME}', a directory with "
        f"'{VOCAB_FILENAME}' and '{MERGES_FILENAME}', an open_clip '.txt.gz' merges file, a BERT "
        f"'{wordpiece_vocab}' (or a directory with one), or a directory with XLM-R's or mBART's "
        f"'{FAIRSEQ_MODEL_FILENAME}'"
    )
    if path.is_file() and path.name == FAIRSEQ_MODEL_FILENAME:
        return load_fairseq_tokenizer(path.parent, context_length)
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer(path, context_length)
    if path.is_file() and path.name == wordpiece_vocab:
        return WordPieceTokenizer(path, context_length)
    if path.is_file() and path.name.endswith(".txt.gz"):
        return ClipBPETokenizer.from_open_clip_merges(path, context_length)
    if not path.is_dir():
        state = "is not a tokenizer file" if path.exists() else "does not exist"
        raise FileNotFoundError(f"tokenizer path '{path}' {state}; expected {layouts}")
    has_model = (path / MODEL_FILENAME).is_file()
    clip_files = [name for name in (VOCAB_FILENAME, MERGES_FILENAME) if (path / name).is_file()]
    found = [name for name in (MODEL_FILENAME, FAIRSEQ_MODEL_FILENAME) if (path / name).is_file()] + clip_files[:1]
    if len(found) > 1:
        raise ValueError(f"tokenizer directory '{path}' holds both '{found[0]}' and '{found[1]}'; keep one tokenizer")
    if (path / FAIRSEQ_MODEL_FILENAME).is_file():
        return load_fairseq_tokenizer(path, context_length)
    if has_model:
        return SentencePieceTokenizer(path / MODEL_FILENAME, context_length)
    if len(clip_files) == 2:
        return ClipBPETokenizer.from_directory(path, context_length)
    if clip_files:
        missing = MERGES_FILENAME if clip_files == [VOCAB_FILENAME] else VOCAB_FILENAME
        raise FileNotFoundError(f"tokenizer directory '{path}' has '{clip_files[0]}' but no '{missing}'")
    if (path / wordpiece_vocab).is_file():
        return WordPieceTokenizer(path / wordpiece_vocab, context_length)
    raise FileNotFoundError(f"no tokenizer in directory '{path}'; expected {layouts}")


def _as_corpus(
    texts: Iterable[str] | Iterable[os.PathLike] | Mapping[str, Iterable[str]], languages: Sequence[str] | None
) -> dict[str, list[str]]:
    """Normalise :meth:`SentencePieceTokenizer.train`'s input to ``{language: sentences}``."""
    if isinstance(texts, Mapping):
        if languages is not None:
            raise ValueError("give languages either as the keys of a mapping or as `languages`, not both")
        return {str(lang): list(items) for lang, items in texts.items()}
    if isinstance(texts, str):
        raise TypeError("texts must be a collection of sentences, not one string")
    items = list(texts)
    if items and all(isinstance(item, os.PathLike) for item in items):
        if languages is not None:
            raise ValueError("the languages of files come from the files; do not pass `languages`")
        return read_corpus(items)
    if any(isinstance(item, os.PathLike) for item in items):
        raise TypeError("texts mixes sentences and file paths; pass one kind")
    if languages is None:
        return {UNKNOWN_LANGUAGE: items}
    if len(languages) != len(items):
        raise ValueError(f"got {len(items)} texts but {len(languages)} languages")
    corpus: dict[str, list[str]] = {}
    for text, lang in zip(items, languages, strict=True):
        corpus.setdefault(lang, []).append(text)
    return corpus


def read_corpus(
    inputs: Iterable[str | os.PathLike], text_key: str = "text", lang_key: str = "lang"
) -> dict[str, list[str]]:
    """Read sentences by language from text, JSONL and webdataset tar files.

    - ``.txt``: one sentence per line; the language is the last dot-separated
      part of the file's stem (``en.txt``, ``wiki.en.txt`` -> ``en``).
    - ``.jsonl``: one object per line with ``text_key`` and ``lang_key``; a
      record without a language takes the file's (as for ``.txt``).
    - ``.tar`` (webdataset shards): per sample, a ``json`` with ``text_key``
      (and ``lang_key``), or with ``"captions": {lang: caption or [captions]}``
      (image-text shards); otherwise its ``txt`` caption, with the file's language.

    Blank lines and texts are skipped.

    Args:
        inputs: file paths.
        text_key / lang_key: the JSON keys of the text and its language.

    Returns:
        ``{language: sentences}``, in the order the sentences were read.
    """
    corpus: dict[str, list[str]] = {}

    def add(text: Any, lang: Any) -> None:
        if isinstance(text, str) and text.strip():
            corpus.setdefault(str(lang), []).append(text.strip())

    for name in inputs:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer training input '{path}' not found")
        file_lang = path.stem.rsplit(".", 1)[-1]
        if path.suffix == ".txt":
            for line in path.read_text(encoding="utf-8").splitlines():
                add(line, file_lang)
        elif path.suffix == ".jsonl":
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: invalid JSON: {err}") from None
                add(record.get(text_key), record.get(lang_key) or file_lang)
        elif path.suffix == ".tar":
            for key, sample in _tar_samples(path):
                try:
                    _add_tar_sample(sample, add, file_lang, text_key, lang_key)
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    raise ValueError(f"{path}: sample '{key}': {err}") from None
        else:
            raise ValueError(f"tokenizer training input '{path}': expected a .txt, .jsonl or .tar file")
    return corpus


def _tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` of a webdataset shard: files grouped by the name up to the first dot."""
    sample: dict[str, bytes] = {}
    key = ""
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, _, filename = member.name.rpartition("/")
            base, dot, extension = filename.partition(".")
            if not dot:
                continue
            member_key = f"{directory}/{base}" if directory else base
            if member_key != key and sample:
                yield key, sample
                sample = {}
            key = member_key
            sample[extension.lower()] = tar.extractfile(member).read()
    if sample:
        yield key, sample


def _add_tar_sample(
    sample: dict[str, bytes], add: Callable[[Any, Any], None], file_lang: str, text_key: str, lang_key: str
) -> None:
    """Pass a shard sample's texts to ``add(text, lang)``, preferring its JSON metadata."""
    record = json.loads(sample["json"]) if "json" in sample else {}
    if not isinstance(record, dict):  # a shard's json may be any value; only objects carry texts
        record = {}
    if text_key in record:
        add(record[text_key], record.get(lang_key) or file_lang)
    elif isinstance(record.get("captions"), dict):
        for lang, captions in record["captions"].items():
            for caption in [captions] if isinstance(captions, str) else captions:
                add(caption, lang)
    elif "txt" in sample:
        add(sample["txt"].decode("utf-8"), record.get(lang_key) or file_lang)


def train_tokenizer_cli(
    inputs: list[str],
    output: str,
    vocab_size: int,
    model_type: str,
    character_coverage: float,
    byte_fallback: bool,
    alpha: float | None,
    text_key: str = "text",
    lang_key: str = "lang",
) -> Path:
    """``mmptm tokenizer train``: read the inputs with :func:`read_corpus` and train.

    Args:
        inputs: ``.txt``, ``.jsonl`` or webdataset ``.tar`` files.
        output: the ``.model`` file to write.
        vocab_size, model_type, character_coverage, byte_fallback: as in
            :meth:`SentencePieceTokenizer.train`.
        alpha: language sampling exponent (XLM: 0.5, XLM-R: 0.3); None: no re-balancing.
        text_key / lang_key: JSON keys of the text and its language.

    Returns:
        The path of the written model.
    """
    corpus = read_corpus(inputs, text_key=text_key, lang_key=lang_key)
    if not corpus:
        raise ValueError(f"no text found in {', '.join(map(str, inputs))}")
    return SentencePieceTokenizer.train(
        corpus,
        output,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        language_sampling_alpha=alpha,
    )
