"""The embedded multilingual demo corpus: spelled-out numbers and CLDR names, parallel across 8 languages.

Built offline from data that installed packages ship, so the multilingual
recipes (``mmlm_tiny``, ``xlm_tiny``, ``unicoder_tiny``, ``mbart_tiny``) train and
evaluate without a download:

- numbers 0..9999 written out by ``num2words`` ("four thousand, two hundred and
  one", "quatre mille deux cent un", ...);
- Babel's CLDR names of territories, languages, currencies, months and weekdays
  in each locale ("Germany", "Allemagne", "Deutschland", ...).

An *item* (a number, or a CLDR code) has one sentence per language; its
sentences are translations of each other. A seeded 10% of the items is held out:
none of their sentences is in a training shard, in any language. Languages get
different shares of the training items (English all, Turkish a fifth), so that
language sampling (q_i ∝ p_i^alpha) has something to re-balance.

*Documents* (for mBART's denoising, which reconstructs documents) are runs of
``DOCUMENT_SENTENCES`` consecutive numbers, one per line ("forty-one\\nforty-two\\n...").
Single sentences of this corpus cannot be reconstructed once 35% of their words
are masked (a masked "twenty" has nine equally good fillings; see
``examples/denoise_ceiling.py``); in a document the neighbours fix the missing
words, as context does in natural text. Training documents hold training
numbers only; each held-out document is built around one held-out number (at
a random place in the run; no two alike), so the held-out sentences of the
other splits are in no training document either.

Layout of ``$MMPTM_CACHE/demo-multilingual-v2``::

    text-train/<lang>/<lang>-000000.tar ...  monolingual text shards, json {"text", "lang"}
    text-val/<lang>/<lang>-000000.tar        held-out items, json {"text", "lang", "item"[, "label"]}
    docs-train/<lang>/<lang>-000000.tar ...  documents of consecutive training numbers, json {"text", "lang"}
    docs-val/<lang>/<lang>-000000.tar        a document around each held-out number, json {"text", "lang", "item"}
    parallel-train-000000.tar ...            json {"src", "tgt", "src_lang": "en", "tgt_lang", "item"}
    parallel-val-000000.tar ...              held-out en-X pairs, json as train[, "label"]
    tokenizer.model                          sentencepiece, BPE, byte fallback, <mask>, trained with alpha 0.3
    info.json                                counts, seed, languages; written last (completion marker)

``label`` (numbers only) is the leading digit, the class of the zero-shot
transfer probe. The same seed gives byte-identical files.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from num2words import num2words

from mmptm.data_pipelines.demo import ensure_built, json_bytes, shard_pattern, write_shards
from mmptm.data_pipelines.tokenizer import SentencePieceTokenizer

MULTILINGUAL_VERSION = "demo-multilingual-v2"  # v2: documents (docs-train, docs-val) added
MULTILINGUAL_LANGUAGES: tuple[str, ...] = ("en", "fr", "de", "es", "it", "pt", "ru", "tr")
# Share of the training items each language's monolingual text keeps (English: the pivot).
LANGUAGE_SHARES: dict[str, float] = {"en": 1.0, "fr": 0.8, "de": 0.7, "es": 0.6, "it": 0.5, "pt": 0.4, "ru": 0.3,
                                     "tr": 0.2}
NUM_NUMBERS = 10_000
HELD_OUT_FRACTION = 0.1
CLDR_KINDS = ("territories", "languages", "currencies", "months", "days")
SAMPLES_PER_SHARD = 5000
TOKENIZER_VOCAB_SIZE = 4000
TOKENIZER_ALPHA = 0.3  # XLM-R's exponent
DOCUMENT_SENTENCES = 4  # consecutive numbers per document
# The names of the parts `resolve("demo:<name>")` knows, and their paths in the build.
MULTILINGUAL_NAMES = {
    "text_train": "text-train",
    "text_val": "text-val",
    "docs_train": "docs-train",
    "docs_val": "docs-val",
    "parallel_train": "parallel-train",
    "parallel_val": "parallel-val",
    "multilingual_tokenizer": "tokenizer.model",
}


@dataclass(frozen=True)
class Item:
    """One meaning and its sentence in every language.

    Attributes:
        id: ``"number/4201"``, ``"territories/DE"``, ...
        texts: ``{lang: sentence}``.
        label: the leading digit of a number; None for names.
    """

    id: str
    texts: dict[str, str]
    label: int | None


def multilingual_root() -> Path:
    """``$MMPTM_CACHE/demo-multilingual-v2``, by default ``~/.cache/mmptm/demo-multilingual-v2``."""
    return Path(os.environ.get("MMPTM_CACHE", "~/.cache/mmptm")).expanduser() / MULTILINGUAL_VERSION


def ensure_multilingual_demo(root: str | os.PathLike | None = None, seed: int = 0, force: bool = False) -> Path:
    """Build the multilingual demo corpus unless a complete build with this seed exists (atomically).

    Returns:
        The corpus directory.
    """
    root = Path(root) if root is not None else multilingual_root()
    ensure_built(root, seed, force, MULTILINGUAL_VERSION, build_multilingual_demo)
    return root


def resolve_multilingual(name: str) -> str:
    """The path of the multilingual demo part ``name`` (a key of ``MULTILINGUAL_NAMES``), building it on first use."""
    root = ensure_multilingual_demo()
    path = root / MULTILINGUAL_NAMES[name]
    if path.suffix == ".model" or path.is_dir():
        return str(path)
    return shard_pattern(root, sorted(p.name for p in root.glob(f"{path.name}-*.tar")))


@functools.cache
def demo_items() -> tuple[Item, ...]:
    """Every item of the corpus, numbers first, in a fixed order (computed once per process).

    A CLDR code enters only when every language names it and no name collides with
    another item's name in the same language (a retrieval target must be unique).
    """
    from babel import Locale  # only a build needs it

    items = [
        Item(f"number/{n}", {lang: num2words(n, lang=lang) for lang in MULTILINGUAL_LANGUAGES}, int(str(n)[0]))
        for n in range(NUM_NUMBERS)
    ]
    locales = {lang: Locale.parse(lang) for lang in MULTILINGUAL_LANGUAGES}
    for kind in CLDR_KINDS:
        tables = {lang: _cldr_table(locale, kind) for lang, locale in locales.items()}
        codes = sorted(set.intersection(*(set(table) for table in tables.values())), key=str)
        items += [Item(f"{kind}/{code}", {lang: tables[lang][code] for lang in tables}, None) for code in codes]
    taken: dict[str, dict[str, int]] = {lang: {} for lang in MULTILINGUAL_LANGUAGES}
    for item in items:
        for lang, text in item.texts.items():
            taken[lang][text.casefold()] = taken[lang].get(text.casefold(), 0) + 1
    return tuple(item for item in items if all(taken[lang][t.casefold()] == 1 for lang, t in item.texts.items()))


def _cldr_table(locale: object, kind: str) -> dict[object, str]:
    """``{code: name}`` of one CLDR table of a Babel locale (alphabetic codes; stand-alone month/day names)."""
    if kind in ("months", "days"):
        return dict(getattr(locale, kind)["stand-alone"]["wide"].items())
    table = getattr(locale, kind)
    return {code: name for code, name in table.items() if code.isalpha() and name}


def split_items(items: Sequence[Item], seed: int) -> tuple[list[Item], list[Item]]:
    """A seeded ``(train, held_out)`` split: ``HELD_OUT_FRACTION`` of the numbers and of the names."""
    rng = np.random.default_rng(seed)
    train: list[Item] = []
    held_out: list[Item] = []
    for is_number in (True, False):
        group = [item for item in items if (item.label is not None) == is_number]
        order = rng.permutation(len(group))
        n_held = round(HELD_OUT_FRACTION * len(group))
        held_out += [group[i] for i in sorted(order[:n_held])]
        train += [group[i] for i in sorted(order[n_held:])]
    return train, held_out


def build_multilingual_demo(directory: Path, seed: int = 0) -> dict:
    """Write the whole corpus into ``directory`` (no atomicity; see :func:`ensure_multilingual_demo`).

    Returns:
        The contents of the ``info.json`` written last.
    """
    directory.mkdir(parents=True, exist_ok=True)
    train, held_out = split_items(demo_items(), seed)
    rng = np.random.default_rng(seed + 1)
    monolingual: dict[str, list[str]] = {}
    for lang in MULTILINGUAL_LANGUAGES:
        keep = sorted(rng.permutation(len(train))[: round(LANGUAGE_SHARES[lang] * len(train))])
        monolingual[lang] = [train[i].texts[lang] for i in keep]
        order = rng.permutation(len(keep))  # shards mix kinds
        records = [{"text": monolingual[lang][i], "lang": lang} for i in order]
        _write_text(directory / "text-train" / lang, lang, records)
        _write_text(directory / "text-val" / lang, lang, [_record(item, item.texts[lang], lang) for item in held_out])
    for split, items in (("train", train), ("val", held_out)):
        pairs = [
            {**_record(item, item.texts["en"], "en"), "tgt": item.texts[lang], "tgt_lang": lang}
            for item in items
            for lang in MULTILINGUAL_LANGUAGES[1:]
        ]
        order = rng.permutation(len(pairs)) if split == "train" else range(len(pairs))
        samples = [_sample(i, _parallel(pairs[j])) for i, j in enumerate(order)]
        write_shards(directory, f"parallel-{split}", samples, SAMPLES_PER_SHARD)
    _write_documents(directory, train, held_out, np.random.default_rng(seed + 2))
    SentencePieceTokenizer.train(
        monolingual,
        directory / "tokenizer.model",
        vocab_size=TOKENIZER_VOCAB_SIZE,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        language_sampling_alpha=TOKENIZER_ALPHA,
        seed=seed,
    )
    info = {
        "version": MULTILINGUAL_VERSION,
        "seed": seed,
        "languages": list(MULTILINGUAL_LANGUAGES),
        "num_train_items": len(train),
        "num_held_out_items": len(held_out),
        "num_held_out_numbers": sum(item.label is not None for item in held_out),
        "text_train_sentences": {lang: len(texts) for lang, texts in monolingual.items()},
        "document_sentences": DOCUMENT_SENTENCES,
        "source": "num2words (numbers 0..9999) and Babel/CLDR names (territories, languages, currencies, months, days)",
    }
    (directory / "info.json").write_bytes(json_bytes(info))
    return info


def number_documents(
    train: Sequence[Item], held_out: Sequence[Item], rng: np.random.Generator
) -> tuple[list[list[Item]], list[tuple[Item, list[Item]]]]:
    """Runs of ``DOCUMENT_SENTENCES`` consecutive numbers: ``(training runs, [(held-out number, its run)])``.

    The training runs are every run of training numbers only. Each held-out number gets a run
    that holds it at a uniformly drawn place (within 0..NUM_NUMBERS - 1) among the runs no
    earlier held-out number took, so no held-out run repeats; a number whose runs are all
    taken (by close held-out neighbours) gets none. A held-out run may hold other held-out numbers.
    """
    numbers = {int(item.id.split("/")[1]): item for item in (*train, *held_out) if item.label is not None}
    held = {int(item.id.split("/")[1]) for item in held_out if item.label is not None}
    size = DOCUMENT_SENTENCES
    runs = [
        [numbers[n] for n in range(start, start + size)]
        for start in range(len(numbers) - size + 1)
        if held.isdisjoint(range(start, start + size))
    ]
    held_runs = []
    taken: set[int] = set()
    for number in sorted(held):
        starts = sorted({min(max(number - offset, 0), len(numbers) - size) for offset in range(size)} - taken)
        if starts:
            start = starts[int(rng.integers(len(starts)))]
            taken.add(start)
            held_runs.append((numbers[number], [numbers[n] for n in range(start, start + size)]))
    return runs, held_runs


def _write_documents(directory: Path, train: Sequence[Item], held_out: Sequence[Item],
                     rng: np.random.Generator) -> None:
    """``docs-train`` (each language keeps its share of the training runs, shuffled) and ``docs-val``."""
    runs, held_runs = number_documents(train, held_out, rng)
    for lang in MULTILINGUAL_LANGUAGES:
        keep = rng.permutation(len(runs))[: round(LANGUAGE_SHARES[lang] * len(runs))]
        records = [{"text": "\n".join(item.texts[lang] for item in runs[i]), "lang": lang} for i in keep]
        _write_text(directory / "docs-train" / lang, lang, records)
        held_records = [{"text": "\n".join(item.texts[lang] for item in run), "lang": lang, "item": number.id}
                        for number, run in held_runs]
        _write_text(directory / "docs-val" / lang, lang, held_records)


def _record(item: Item, text: str, lang: str) -> dict[str, object]:
    """The json of a held-out text sample (the item id and, for numbers, the label)."""
    record: dict[str, object] = {"text": text, "lang": lang, "item": item.id}
    if item.label is not None:
        record["label"] = item.label
    return record


def _parallel(record: dict[str, object]) -> dict[str, object]:
    """A pair record in the parallel-text layout (``text``/``lang`` of the English side become ``src``/``src_lang``)."""
    record = dict(record)
    return {"src": record.pop("text"), "src_lang": record.pop("lang"), **record}


def _sample(index: int, record: dict[str, object]) -> dict[str, str | bytes]:
    return {"__key__": f"{index:09d}", "json": json_bytes(record, None)}


def _write_text(directory: Path, lang: str, records: Sequence[dict[str, object]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_shards(directory, lang, [_sample(i, record) for i, record in enumerate(records)], SAMPLES_PER_SHARD)
