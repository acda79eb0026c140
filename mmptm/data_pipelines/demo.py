"""The embedded demo dataset: real handwritten digits with captions in ten languages.

Built offline from data that installed packages ship, so the bundled recipes
train and evaluate without a download:

- images: scikit-learn's ``load_digits()`` (1,797 8×8 scans with 16 grey
  levels, the test set of the UCI "Optical Recognition of Handwritten Digits"
  data), upsampled bicubically to 32×32 and stored as RGB PNG;
- captions: our own templates (the same ones serve as zero-shot prompts)
  filled with the number word of ``num2words`` in each language;
- a sentencepiece tokenizer (BPE, byte fallback, a ``<mask>`` piece) trained on all the caption text.

Layout of ``$MMPTM_CACHE/demo-v2`` (default ``~/.cache/mmptm/demo-v2``)::

    train-000000.tar ...   webdataset shards of 500 samples, img2dataset-style
    val-000000.tar ...     a seeded, class-stratified 20% of the images
    tokenizer.model        sentencepiece, BPE, byte fallback
    classnames.json        {lang: [number word of 0..9]}
    templates.json         {lang: [template with a {} placeholder]}
    info.json              counts, seed, languages; written last (completion marker)

A sample is ``<key>.cls`` (the label in ASCII), ``<key>.json``
(``{"captions": {lang: [caption per template]}, "label", "source_index"}``),
``<key>.png`` and ``<key>.txt`` (one English caption); the key is the
zero-padded index of the image in ``load_digits()``. The same seed gives
byte-identical files.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from num2words import num2words
from PIL import Image
from webdataset import TarWriter

from mmptm.data_pipelines.tokenizer import SentencePieceTokenizer

try:  # POSIX: serialise concurrent builders; elsewhere the atomic rename alone keeps the cache whole
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

DEMO_VERSION = "demo-v2"
DEMO_LANGUAGES: tuple[str, ...] = ("en", "fr", "de", "es", "it", "pt", "nl", "pl", "ru", "tr")
# The parts `resolve("demo:<name>")` knows.
DEMO_NAMES = ("train", "val", "tokenizer", "classnames", "templates")

# Captions and zero-shot prompts. The number word always follows a noun such as
# "digit" in apposition, so it needs no article, gender or case agreement
# ("le chiffre un", "цифры пять", "beş rakamı").
DEMO_TEMPLATES: dict[str, tuple[str, ...]] = {
    "en": (
        "a handwritten {}.",
        "a photo of the digit {}.",
        "the number {} written by hand.",
        "a scanned image of a handwritten {}.",
        "the handwritten digit {}.",
    ),
    "fr": (
        "le chiffre {} écrit à la main.",
        "une photo du chiffre {}.",
        "le chiffre manuscrit {}.",
        "une image numérisée du chiffre {} écrit à la main.",
        "le nombre {}, écrit à la main.",
    ),
    "de": (
        "die handgeschriebene Ziffer {}.",
        "ein Foto der Ziffer {}.",
        "die Zahl {}, von Hand geschrieben.",
        "ein eingescanntes Bild der handgeschriebenen Ziffer {}.",
        "die Ziffer {}, mit der Hand geschrieben.",
    ),
    "es": (
        "el dígito {} escrito a mano.",
        "una foto del dígito {}.",
        "el número {} escrito a mano.",
        "una imagen escaneada del dígito manuscrito {}.",
        "el dígito manuscrito {}.",
    ),
    "it": (
        "la cifra {} scritta a mano.",
        "una foto della cifra {}.",
        "il numero {} scritto a mano.",
        "un'immagine scansionata della cifra {} scritta a mano.",
        "la cifra manoscritta {}.",
    ),
    "pt": (
        "o dígito {} escrito à mão.",
        "uma foto do dígito {}.",
        "o número {} escrito à mão.",
        "uma imagem digitalizada do dígito manuscrito {}.",
        "o dígito manuscrito {}.",
    ),
    "nl": (
        "het handgeschreven cijfer {}.",
        "een foto van het cijfer {}.",
        "het getal {}, met de hand geschreven.",
        "een gescande afbeelding van het handgeschreven cijfer {}.",
        "het met de hand geschreven cijfer {}.",
    ),
    "pl": (
        "odręcznie napisana cyfra {}.",
        "zdjęcie cyfry {}.",
        "liczba {} napisana odręcznie.",
        "zeskanowany obraz odręcznie napisanej cyfry {}.",
        "cyfra {} napisana ręcznie.",
    ),
    "ru": (
        "рукописная цифра {}.",
        "фотография цифры {}.",
        "число {}, написанное от руки.",
        "отсканированное изображение рукописной цифры {}.",
        "цифра {}, написанная от руки.",
    ),
    "tr": (
        "el yazısıyla yazılmış {} rakamı.",
        "{} rakamının fotoğrafı.",
        "elle yazılmış {} sayısı.",
        "el yazısı {} rakamının taranmış görüntüsü.",
        "el yazısı {} rakamı.",
    ),
}

IMAGE_SIZE = 32
VAL_FRACTION = 0.2
SAMPLES_PER_SHARD = 500
TOKENIZER_VOCAB_SIZE = 1000
# BPE, not unigram: the captions hold fewer than 300 distinct words, and the
# unigram trainer seeds its vocabulary only with substrings shared by two or
# more distinct words, so it stops near 530 pieces and splits most template
# words into single letters. BPE merges them into whole words within 1000 pieces.
TOKENIZER_MODEL_TYPE = "bpe"
# Fixed tar header fields: with them the shards depend on the seed only
# (2024-01-01 rather than 0, so extracted files do not date from 1970).
_TAR_MTIME = 1_704_067_200
_TAR_OWNER = "mmptm"
_TAR_MODE = 0o644


@dataclass(frozen=True)
class DemoPaths:
    """Where the parts of a built demo dataset are.

    Attributes:
        root: the dataset directory.
        train_shards / val_shards: webdataset URL patterns (brace notation,
            ``.../train-{000000..000002}.tar``; a plain path for a single shard).
        tokenizer: the sentencepiece model.
        classnames / templates: the JSON files ``{lang: [...]}`` for zero-shot evaluation.
        languages: the caption languages.
        num_train / num_val: samples per split.
    """

    root: Path
    train_shards: str
    val_shards: str
    tokenizer: Path
    classnames: Path
    templates: Path
    languages: tuple[str, ...]
    num_train: int
    num_val: int


def demo_root() -> Path:
    """``$MMPTM_CACHE/demo-v2``, by default ``~/.cache/mmptm/demo-v2``."""
    return Path(os.environ.get("MMPTM_CACHE", "~/.cache/mmptm")).expanduser() / DEMO_VERSION


def demo_classnames() -> dict[str, list[str]]:
    """The number word of each digit 0..9 per demo language, from ``num2words``."""
    return {lang: [num2words(digit, lang=lang) for digit in range(10)] for lang in DEMO_LANGUAGES}


def ensure_demo(root: str | os.PathLike | None = None, seed: int = 0, force: bool = False) -> DemoPaths:
    """Build the demo dataset unless a complete build with this seed exists.

    The build is atomic (see :func:`ensure_built`).

    Args:
        root: target directory (default :func:`demo_root`).
        seed: seed of the train/val split and of the English caption choice.
        force: rebuild even if a complete build exists.

    Returns:
        The paths of the built dataset.
    """
    root = Path(root) if root is not None else demo_root()
    return _demo_paths(root, ensure_built(root, seed, force, DEMO_VERSION, build_demo))


def ensure_built(
    root: Path, seed: int, force: bool, version: str, build: Callable[[Path, int], dict]
) -> dict:
    """Run ``build(directory, seed)`` into ``root`` atomically unless a complete build of ``version`` is there.

    The build goes to a temporary directory next to ``root`` and is renamed
    into place, so a crash never leaves a half dataset; concurrent builders
    wait on a lock file (POSIX) and then find the finished build.

    Args:
        root: target directory.
        seed: the build's seed, recorded in its ``info.json``.
        force: rebuild even if a complete build exists.
        version: the ``version`` its ``info.json`` must have.
        build: writes the dataset and returns the ``info.json`` contents it wrote last.

    Returns:
        The build's ``info.json`` contents.
    """
    if not force and (info := _read_info(root, seed, version)) is not None:
        return info
    root.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(root):
        info = None if force else _read_info(root, seed, version)  # another process may have built it meanwhile
        if info is None:
            if fcntl is not None:  # only under a real lock is every temporary build a crashed one
                for stale in root.parent.glob(f".{root.name}.tmp-*"):
                    shutil.rmtree(stale, ignore_errors=True)
            tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                info = build(tmp, seed)
                _replace_dir(tmp, root, seed, version)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return info


def resolve(spec: str) -> str:
    """Map ``demo:<name>`` to a path of a demo dataset (building it on first use).

    Args:
        spec: ``demo:train``, ``demo:val`` (shard patterns), ``demo:tokenizer``,
            ``demo:classnames``, ``demo:templates`` (the image-text demo), or a part of the
            multilingual demo corpus (:mod:`mmptm.data_pipelines.demo_multilingual`):
            ``demo:text_train``, ``demo:text_val`` (folders of per-language shard folders),
            ``demo:parallel_train``, ``demo:parallel_val``, ``demo:multilingual_tokenizer``;
            any other string is returned unchanged.

    Returns:
        The path or shard pattern.

    Raises:
        ValueError: an unknown ``demo:`` name.
    """
    if not spec.startswith("demo:"):
        return spec
    from mmptm.data_pipelines.demo_multilingual import MULTILINGUAL_NAMES, resolve_multilingual

    name = spec.removeprefix("demo:")
    if name in MULTILINGUAL_NAMES:
        return resolve_multilingual(name)
    if name not in DEMO_NAMES:
        valid = ", ".join("demo:" + n for n in (*DEMO_NAMES, *MULTILINGUAL_NAMES))
        raise ValueError(f"unknown demo path '{spec}'; valid: {valid}")
    paths = ensure_demo()
    return str(
        {
            "train": paths.train_shards,
            "val": paths.val_shards,
            "tokenizer": paths.tokenizer,
            "classnames": paths.classnames,
            "templates": paths.templates,
        }[name]
    )


def build_demo(directory: Path, seed: int = 0) -> dict:
    """Write the whole demo dataset into ``directory`` (no atomicity; see :func:`ensure_demo`).

    Args:
        directory: an empty or missing directory.
        seed: seed of the split and of the English caption of each sample.

    Returns:
        The contents of the ``info.json`` written last.
    """
    from sklearn.datasets import load_digits  # slow to import; only a build needs it

    directory.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    labels = digits.target.astype(int)
    classnames = demo_classnames()
    captions = [caption_by_language(classnames, digit) for digit in range(10)]
    rng = np.random.default_rng(seed)
    splits = dict(zip(("train", "val"), split_by_class(labels, VAL_FRACTION, rng), strict=True))

    english = rng.integers(len(DEMO_TEMPLATES["en"]), size=len(labels))  # the template of each image's txt

    def sample(i: int) -> dict[str, str | bytes]:
        return {
            "__key__": f"{i:09d}",
            "png": _png(digits.images[i]),
            "txt": captions[labels[i]]["en"][english[i]].encode("utf-8"),
            "json": json_bytes({"captions": captions[labels[i]], "label": int(labels[i]), "source_index": i}, None),
            "cls": str(labels[i]).encode("ascii"),
        }

    shard_names = {
        split: write_shards(directory, split, [sample(i) for i in indices]) for split, indices in splits.items()
    }

    # Every caption of every image, as the text tower will see them: the
    # tokenizer learns the words in proportion to their use.
    sentences = [
        caption for i in range(len(labels)) for lang in DEMO_LANGUAGES for caption in captions[labels[i]][lang]
    ]
    SentencePieceTokenizer.train(
        sentences,
        directory / "tokenizer.model",
        vocab_size=TOKENIZER_VOCAB_SIZE,
        model_type=TOKENIZER_MODEL_TYPE,
        character_coverage=1.0,
        byte_fallback=True,
        seed=seed,
    )
    (directory / "classnames.json").write_bytes(json_bytes(classnames))
    (directory / "templates.json").write_bytes(
        json_bytes({lang: list(DEMO_TEMPLATES[lang]) for lang in DEMO_LANGUAGES})
    )
    info = {
        "version": DEMO_VERSION,
        "seed": seed,
        "languages": list(DEMO_LANGUAGES),
        "num_train": len(splits["train"]),
        "num_val": len(splits["val"]),
        "num_per_class": {
            split: np.bincount(labels[indices], minlength=10).tolist() for split, indices in splits.items()
        },
        "train_shards": shard_names["train"],
        "val_shards": shard_names["val"],
        "image_size": IMAGE_SIZE,
        "source": "sklearn.datasets.load_digits (UCI Optical Recognition of Handwritten Digits, test set)",
    }
    (directory / "info.json").write_bytes(json_bytes(info))
    return info


def caption_by_language(classnames: Mapping[str, Sequence[str]], digit: int) -> dict[str, list[str]]:
    """Every template of every demo language filled with the number word of ``digit``."""
    return {
        lang: [template.format(classnames[lang][digit]) for template in DEMO_TEMPLATES[lang]] for lang in DEMO_LANGUAGES
    }


def split_by_class(labels: np.ndarray, val_fraction: float, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """A class-stratified random split of sample indices.

    Each class puts ``round(val_fraction * its size)`` random samples into
    val. Both splits come back shuffled, so that every shard mixes classes.

    Returns:
        ``(train_indices, val_indices)``.
    """
    train: list[int] = []
    val: list[int] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = round(val_fraction * len(members))
        val.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    return rng.permutation(train).tolist(), rng.permutation(val).tolist()


def _png(image: np.ndarray) -> bytes:
    """A 0..16 grey 8×8 digit as a 32×32 RGB PNG (PNG is lossless and its bytes are reproducible)."""
    grey = Image.fromarray(np.rint(image * (255 / 16)).astype(np.uint8), mode="L")
    buffer = io.BytesIO()
    grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def json_bytes(value: object, indent: int | None = 2) -> bytes:
    return json.dumps(value, ensure_ascii=False, indent=indent).encode("utf-8")


def write_shards(
    directory: Path, split: str, samples: Sequence[dict[str, str | bytes]], samples_per_shard: int = SAMPLES_PER_SHARD
) -> list[str]:
    """Write ``samples`` into ``{split}-000000.tar``, ... of ``samples_per_shard`` each; return the names."""
    names = []
    for start in range(0, len(samples), samples_per_shard):
        names.append(f"{split}-{len(names):06d}.tar")
        with (
            open(directory / names[-1], "wb") as stream,
            TarWriter(
                stream, user=_TAR_OWNER, group=_TAR_OWNER, mode=_TAR_MODE, mtime=_TAR_MTIME, encoder=False
            ) as tar,
        ):
            for sample in samples[start : start + samples_per_shard]:
                tar.write(sample)
    return names


def shard_pattern(root: Path, names: Sequence[str]) -> str:
    if len(names) == 1:
        return str(root / names[0])
    prefix = names[0].rsplit("-", 1)[0]
    return str(root / f"{prefix}-{{{0:06d}..{len(names) - 1:06d}}}.tar")


def _read_info(root: Path, seed: int, version: str) -> dict | None:
    """``info.json`` of a complete build of ``version`` and ``seed``, else None."""
    try:
        info = json.loads((root / "info.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if info.get("version") != version or info.get("seed") != seed:
        return None
    return info


def _demo_paths(root: Path, info: dict) -> DemoPaths:
    return DemoPaths(
        root=root,
        train_shards=shard_pattern(root, info["train_shards"]),
        val_shards=shard_pattern(root, info["val_shards"]),
        tokenizer=root / "tokenizer.model",
        classnames=root / "classnames.json",
        templates=root / "templates.json",
        languages=tuple(info["languages"]),
        num_train=info["num_train"],
        num_val=info["num_val"],
    )


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``.<root name>.lock`` next to ``root`` (no-op without fcntl)."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with open(root.parent / f".{root.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _replace_dir(new: Path, root: Path, seed: int, version: str) -> None:
    """Move the finished build ``new`` to ``root``, replacing an older or incomplete one there."""
    old = None
    if root.exists():
        old = root.parent / f".{root.name}.tmp-old-{uuid.uuid4().hex[:8]}"
        os.rename(root, old)
    try:
        os.rename(new, root)
    except OSError:
        # Without a lock (no fcntl) another builder can win the race; its build is as good as ours.
        if _read_info(root, seed, version) is None:
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
