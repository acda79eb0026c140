"""Multilingual data: the ``text`` dataset (language sampling, packing, skips), ``parallel_text``
languages and tokens, and the multilingual demo corpus (held-out items, ``demo:`` names)."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from braceexpand import braceexpand
from webdataset import TarWriter

from mmptm.data_pipelines.context import DataContext
from mmptm.data_pipelines.demo import resolve
from mmptm.data_pipelines.demo_multilingual import (
    MULTILINGUAL_LANGUAGES,
    demo_items,
    ensure_multilingual_demo,
    split_items,
)
from mmptm.data_pipelines.language_sampling import language_sampling_probs
from mmptm.data_pipelines.parallel_text import parallel_text
from mmptm.data_pipelines.text import _data_size, language_shards, text
from mmptm.data_pipelines.tokenizer import load_tokenizer


class WordTokenizer:
    """One id per word (5 + its length), enough to test rows and packing without a model file."""

    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3
    context_length = 12

    def encode(self, text: str) -> list[int]:
        return [5 + len(word) for word in text.split()]


def write_json_shard(path: Path, records: list[object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as stream, TarWriter(stream, encoder=False) as tar:
        for i, record in enumerate(records):
            data = record if isinstance(record, bytes) else json.dumps(record).encode()
            tar.write({"__key__": f"{i:06d}", "json": data})


def batches(stream) -> list[dict]:
    return list(stream)


def test_language_sampling_matches_p_to_the_alpha(tmp_path):
    sizes = {"en": 900, "fr": 300, "sw": 60}
    for lang, n in sizes.items():
        write_json_shard(tmp_path / lang / "0.tar", [{"text": f"w{i}", "lang": lang} for i in range(n)])
    stream = text(
        DataContext(tokenizer=WordTokenizer()), str(tmp_path), alpha=0.3, pack=False,
        batch_size=500, epoch_samples=10_000, shuffle_buffer=10,
    )
    counts = Counter(lang for batch in batches(stream) if not batch.get("empty") for lang in batch["lang"])
    assert sum(counts.values()) == 10_000
    urls = language_shards(str(tmp_path), None)
    expected = language_sampling_probs({lang: _data_size(u) for lang, u in urls.items()}, 0.3)
    # The shard bytes are nearly proportional to the sentence counts.
    assert expected == pytest.approx(language_sampling_probs(sizes, 0.3), abs=0.01)
    for lang, q in expected.items():
        assert counts[lang] / 10_000 == pytest.approx(q, abs=0.02)


def test_rows_pack_sentences_of_one_language_up_to_max_length(tmp_path):
    write_json_shard(tmp_path / "en" / "0.tar", [{"text": "aa b ccc", "lang": "en"}] * 50)
    write_json_shard(tmp_path / "de" / "0.tar", [{"text": "dddd", "lang": "de"}] * 50)
    stream = text(DataContext(tokenizer=WordTokenizer()), str(tmp_path), batch_size=4, epoch_samples=8)
    good = [b for b in batches(stream) if not b.get("empty")]
    rows = [(row, lang) for b in good for row, lang in zip(b["tokens"], b["lang"], strict=True)]
    assert len(rows) == 8
    en_row = [2, 7, 6, 8, 3, 7, 6, 8, 3, 0, 0, 0]  # a third sentence would need 13 positions
    de_row = [2, *[9, 3] * 5, 0]  # bos + 5 one-word sentences, then a pad
    for row, lang in rows:
        assert row.tolist() == (en_row if lang == "en" else de_row)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_epoch_is_epoch_samples_rounded_up_to_whole_batches_with_any_worker_count(tmp_path, num_workers):
    """As image_text: each worker reads whole batches, so dropping partial ones never shortens an epoch."""
    write_json_shard(tmp_path / "en" / "0.tar", [{"text": "aa b", "lang": "en"}] * 30)
    context = DataContext(tokenizer=WordTokenizer(), training=True)
    stream = text(context, str(tmp_path), batch_size=4, epoch_samples=10, num_workers=num_workers, pack=False)
    sizes = [len(b["tokens"]) for b in batches(stream) if not b.get("empty")]
    assert sizes == [4, 4, 4]


def test_a_text_of_several_lines_is_one_document_row(tmp_path):
    docs = [{"text": "aa b\n\n  ccc \ndddd", "lang": "en"}, {"text": "e\nff", "lang": "en"}] * 10
    write_json_shard(tmp_path / "en" / "0.tar", docs)
    # One document per row (pack: false): its sentences separated by eos, blank lines dropped.
    stream = text(DataContext(tokenizer=WordTokenizer()), str(tmp_path), batch_size=4, epoch_samples=8, pack=False,
                  shuffle_buffer=0)
    rows = [row.tolist() for b in batches(stream) if not b.get("empty") for row in b["tokens"]]
    assert sorted(map(tuple, rows)) == sorted([(2, 7, 6, 3, 8, 3, 9, 3, 0, 0, 0, 0), (2, 6, 3, 7, 3, *[0] * 7)] * 4)
    # Evaluation: one document per row too; packing (training) appends whole documents.
    stream = text(DataContext(tokenizer=WordTokenizer(), training=False), str(tmp_path), batch_size=20)
    assert [b["tokens"].shape for b in batches(stream)] == [(20, 12)]
    # Training splits a document that does not fit between sentences; the rest starts the next row.
    stream = text(DataContext(tokenizer=WordTokenizer()), str(tmp_path), batch_size=3, epoch_samples=3,
                  shuffle_buffer=0, max_length=16)
    packed = [row.tolist() for b in batches(stream) if not b.get("empty") for row in b["tokens"]]
    assert packed == [[2, 7, 6, 3, 8, 3, 9, 3, 6, 3, 7, 3, 7, 6, 3, 0],  # doc 1, doc 2, doc 1's first sentence
                      [2, 8, 3, 9, 3, 6, 3, 7, 3, 7, 6, 3, 8, 3, 9, 3],
                      [2, 6, 3, 7, 3, 7, 6, 3, 8, 3, 9, 3, 6, 3, 7, 3]]
    stream = text(DataContext(tokenizer=WordTokenizer()), str(tmp_path), batch_size=3, epoch_samples=3,
                  shuffle_buffer=0, max_length=6, pack=False)
    unpacked = [row.tolist() for b in batches(stream) if not b.get("empty") for row in b["tokens"]]
    assert unpacked == [[2, 7, 6, 3, 8, 3], [2, 9, 3, 0, 0, 0], [2, 6, 3, 7, 3, 0]]  # one document at most


def test_bad_text_samples_are_skipped_and_counted(tmp_path):
    records = [
        {"text": "good one", "lang": "en", "label": 3},
        b'{"text": "\xff\xfe bad utf-8", "lang": "en"}',
        {"text": "   ", "lang": "en"},
        {"text": "wrong language", "lang": "xx"},
        {"text": "bad label", "lang": "en", "label": "three"},
        [1, 2],
        {"text": "good two", "lang": "en"},
    ]
    write_json_shard(tmp_path / "en" / "0.tar", records)
    stream = text(DataContext(tokenizer=WordTokenizer(), training=False), str(tmp_path), batch_size=8)
    out = batches(stream)
    assert sum(b["skipped"] for b in out) == 5
    keys = sorted(k.rsplit("#", 1)[1] for b in out for k in b["skipped_keys"])
    assert keys == ["000001", "000002", "000003", "000004", "000005"]
    good = [b for b in out if not b.get("empty")]
    assert good[0]["label"].tolist() == [3, -1]


def test_a_language_whose_samples_are_all_bad_fails_instead_of_skipping_forever(tmp_path, monkeypatch):
    import mmptm.data_pipelines.text as text_module

    monkeypatch.setattr(text_module, "MAX_SKIPS_WITHOUT_SAMPLE", 100)
    write_json_shard(tmp_path / "en" / "0.tar", [{"text": "good", "lang": "en"}] * 20)
    write_json_shard(tmp_path / "fr" / "0.tar", [{"text": "", "lang": "fr"}] * 20)
    context = DataContext(tokenizer=WordTokenizer())
    stream = text(context, str(tmp_path), alpha=0.0, batch_size=4, epoch_samples=40, shuffle_buffer=1)
    with pytest.raises(ValueError, match="language 'fr' gave 100 bad samples from all its 1 shard"):
        batches(stream)
    # Many bad samples but a shard not yet seen bad: it may hold good ones, so the stream goes on.
    write_json_shard(tmp_path / "fr" / "0.tar", [{"text": "", "lang": "fr"}] * 150)
    write_json_shard(tmp_path / "fr" / "1.tar", [{"text": "ok", "lang": "fr"}] * 5)
    out = batches(text(context, str(tmp_path), alpha=0.0, batch_size=4, epoch_samples=40, shuffle_buffer=1))
    assert sum(len(b["lang"]) for b in out if not b.get("empty")) == 40

def test_text_options_fail_clearly(tmp_path):
    write_json_shard(tmp_path / "en" / "0.tar", [{"text": "a", "lang": "en"}])
    context = DataContext(tokenizer=WordTokenizer())
    with pytest.raises(FileNotFoundError, match="fr"):
        text(context, str(tmp_path), languages=["en", "fr"])
    with pytest.raises(ValueError, match="tokenizer"):
        text(DataContext(), str(tmp_path))
    with pytest.raises(ValueError, match="max_length"):
        text(context, str(tmp_path), max_length=2)


def test_parallel_text_skips_unknown_languages_and_tokenizes(tmp_path):
    write_json_shard(tmp_path / "p.tar", [
        {"src": "one two", "tgt": "un deux", "src_lang": "en", "tgt_lang": "fr"},
        {"src": "three", "tgt": "drei", "src_lang": "en", "tgt_lang": "de"},
    ])
    context = DataContext(tokenizer=lambda texts: torch.ones(len(texts), 4, dtype=torch.long), training=False)
    out = batches(parallel_text(context, str(tmp_path / "p.tar"), languages=["en", "fr"], tokenize=True,
                                num_workers=0))
    assert sum(b["skipped"] for b in out) == 1
    good = [b for b in out if not b.get("empty")][0]
    assert good["tgt"] == ["un deux"] and good["src_tokens"].shape == good["tgt_tokens"].shape == (1, 4)
    with pytest.raises(ValueError, match="tokenize"):
        parallel_text(DataContext(), str(tmp_path / "p.tar"), tokenize=True)


@pytest.fixture(scope="module")
def corpus() -> Path:
    return ensure_multilingual_demo()


def json_records(path: Path) -> list[dict]:
    with tarfile.open(path) as tar:
        return [json.loads(tar.extractfile(m).read()) for m in tar.getmembers()]


def test_demo_corpus_holds_items_out_of_training(corpus):
    held = [json_records(p) for p in sorted((corpus / "text-val").glob("*/*.tar"))]
    held_texts = {(r["lang"], r["text"]) for records in held for r in records}
    train_texts = {(r["lang"], r["text"]) for p in (corpus / "text-train").glob("*/*.tar") for r in json_records(p)}
    pairs = [r for p in braceexpand(resolve("demo:parallel_train")) for r in json_records(Path(p))]
    train_texts |= {(r["src_lang"], r["src"]) for r in pairs} | {(r["tgt_lang"], r["tgt"]) for r in pairs}
    assert len(held_texts) == 8 * 1110 and not held_texts & train_texts
    # Held-out items appear in every language, in the same order, with their labels.
    per_lang = {records[0]["lang"]: [(r["item"], r.get("label")) for r in records] for records in held}
    assert sorted(per_lang) == sorted(MULTILINGUAL_LANGUAGES)
    assert all(items == per_lang["en"] for items in per_lang.values())
    sizes = json.loads((corpus / "info.json").read_text())["text_train_sentences"]
    assert sizes["en"] > sizes["fr"] > sizes["tr"]


def test_demo_documents_are_runs_of_consecutive_numbers_held_out_apart(corpus):
    by_text = {(lang, item.texts[lang]): int(item.id.split("/")[1])
               for item in demo_items() if item.label is not None for lang in item.texts}
    held = {int(item.id.split("/")[1]) for item in split_items(demo_items(), 0)[1] if item.label is not None}

    def numbers(record):
        return [by_text[record["lang"], line] for line in record["text"].split("\n")]

    train = [numbers(r) for p in sorted((corpus / "docs-train").glob("*/*.tar")) for r in json_records(p)]
    info = json.loads((corpus / "info.json").read_text())
    assert info["document_sentences"] == 4
    assert all(run == list(range(run[0], run[0] + 4)) and held.isdisjoint(run) for run in train)
    counts = Counter(len(json_records(p)) for p in (corpus / "docs-train" / "en").glob("*.tar"))
    assert sum(n * k for n, k in counts.items()) > sum(len(json_records(p)) for p in
                                                        (corpus / "docs-train" / "tr").glob("*.tar")) > 1000
    for lang in MULTILINGUAL_LANGUAGES:
        val = json_records(next((corpus / "docs-val" / lang).glob("*.tar")))
        assert len(val) == len(held) == len({record["text"] for record in val}) == 1000  # one each, no repeats
        for record in val:
            run = numbers(record)
            assert run == list(range(run[0], run[0] + 4)) and int(record["item"].split("/")[1]) in run
    assert resolve("demo:docs_val") == str(corpus / "docs-val")


def test_demo_corpus_names_and_tokenizer(corpus):
    tokenizer = load_tokenizer(resolve("demo:multilingual_tokenizer"))
    assert tokenizer.mask_id == 4
    assert tokenizer.unk_id not in tokenizer.encode("одна тысяча двести тридцать четыре")
    assert resolve("demo:text_train") == str(corpus / "text-train")
    with pytest.raises(ValueError, match="demo:parallel_val"):
        resolve("demo:parallel_value")


def test_demo_split_is_deterministic_and_unique():
    items = demo_items()
    assert len({item.id for item in items}) == len(items)
    first, second = split_items(items, 0), split_items(items, 0)
    assert [i.id for i in first[1]] == [i.id for i in second[1]]
    assert [i.id for i in split_items(items, 1)[1]] != [i.id for i in first[1]]
    assert sum(item.label is not None for item in first[1]) == 1000


def test_data_demo_cli_builds_the_multilingual_corpus(corpus, capsys):
    from mmptm.cli import main

    assert main(["data", "demo", "--corpus", "multilingual", "--root", str(corpus)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"multilingual"}
    assert printed["multilingual"]["root"] == str(corpus)
    assert printed["multilingual"]["languages"] == list(MULTILINGUAL_LANGUAGES)
    assert printed["multilingual"]["num_held_out_items"] > 0
    assert main(["data", "demo", "--root", str(corpus)]) == 2
    assert "--corpus images or --corpus multilingual" in capsys.readouterr().err
