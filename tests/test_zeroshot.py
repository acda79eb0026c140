"""Zero-shot classification and retrieval: CLI = Python API = trainer evaluation = clip_benchmark."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from clip_benchmark.datasets.builder import image_captions_collate_fn
from clip_benchmark.metrics import zeroshot_classification as cb_classification
from clip_benchmark.metrics import zeroshot_retrieval as cb_retrieval
from PIL import Image
from test_train import TINY, read_metrics

import mmptm
from mmptm.cli import main
from mmptm.data_pipelines.context import model_data_context
from mmptm.data_pipelines.demo import DEMO_TEMPLATES, demo_classnames
from mmptm.data_pipelines.shards import open_tar_writer
from mmptm.data_pipelines.streams import resolve_shards
from mmptm.evaluation import (
    EvaluationError,
    classification_stream,
    load_prompt_file,
    retrieval_stream,
    zeroshot_classification,
    zeroshot_retrieval,
)

RETRIEVAL = "eval.retrieval={data: 'demo:val', languages: [en], batch_size: 64, num_workers: 0}"


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo) -> Path:
    """A tiny CLIP trained for 30 steps; its final evaluation covers classification (en, fr) and retrieval (en)."""
    run = tmp_path_factory.mktemp("zeroshot") / "run"
    overrides = [*TINY, "train.max_steps=30", "train.lr=2e-3", "data.train.caption_languages=[en]", RETRIEVAL]
    mmptm.train(mmptm.load_config("clip_tiny.yaml", overrides), output_dir=run)
    return run


@pytest.fixture(scope="module")
def pretrained(run):
    return mmptm.load_pretrained(run)


def cli_json(capsys, *args: str) -> dict:
    assert main(["zeroshot", *args]) == 0
    return json.loads(capsys.readouterr().out)


def read_tar(path: str) -> list[dict[str, bytes]]:
    """The samples of a shard in order, as ``{"__key__", ext: bytes}``."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return list(samples.values())


def demo_val_samples() -> list[dict[str, bytes]]:
    return [sample for url in resolve_shards("demo:val") for sample in read_tar(url)]


def open_png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


class ListDataset(torch.utils.data.Dataset):
    """What clip_benchmark's evaluators iterate: items, plus ``classes`` for classification."""

    def __init__(self, items: list, classes: list[str] | None = None) -> None:
        self.items, self.classes = items, classes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


@pytest.fixture
def clip_benchmark_accuracy(monkeypatch):
    """clip_benchmark 1.6's ``accuracy`` as it is, but for ``float()`` of a 1-element array (an error in NumPy 2.4)."""

    def accuracy(output, target, topk=(1,)):
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]

    monkeypatch.setattr(cb_classification, "accuracy", accuracy)


def test_cli_classify_prints_the_trainers_final_zeroshot_accuracy(run):
    args = ["--checkpoint", str(run), "--data", "demo:val", "--classnames", "demo:classnames",
            "--templates", "demo:templates"]
    proc = subprocess.run([sys.executable, "-m", "mmptm.cli", "zeroshot", "classify", *args],
                          capture_output=True, text=True, env=os.environ, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # stdout is exactly one JSON object
    final = [r for r in read_metrics(run) if "eval/zeroshot_top1" in r][-1]
    assert result["top1"] == final["eval/zeroshot_top1"]
    assert result["top5"] == final["eval/zeroshot_top5"]
    assert result["mean_per_class_recall"] == final["eval/zeroshot_mean_per_class_recall"]
    assert result["num_images"] == final["eval/num_images"] == 359
    assert result["primary_language"] == "en" and len(result["per_language"]) == 10
    for lang in ("en", "fr"):
        assert result["per_language"][lang]["top1"] == final[f"eval/zeroshot_top1/{lang}"]


def test_classification_matches_clip_benchmark(run, pretrained, capsys, clip_benchmark_accuracy):
    model, tokenizer, preprocess = pretrained
    classnames = load_prompt_file("demo:classnames", "classnames")["en"]
    templates = load_prompt_file("demo:templates", "templates")["en"]
    items = [(preprocess(open_png(s["png"])), int(s["cls"])) for s in demo_val_samples()]
    loader = torch.utils.data.DataLoader(ListDataset(items, classnames), batch_size=64)
    reference = cb_classification.evaluate(
        model, loader, tokenizer, classnames, [t.replace("{}", "{c}") for t in templates], "cpu", amp=False
    )
    stream = classification_stream("demo:val", model_data_context(model, tokenizer=tokenizer, training=False),
                                   batch_size=64, num_workers=0)
    ours = zeroshot_classification(model, tokenizer, stream, classnames, templates)
    assert ours["num_images"] == len(items)
    assert ours["top1"] == pytest.approx(reference["acc1"], abs=1e-6)
    assert ours["top5"] == pytest.approx(reference["acc5"], abs=1e-6)
    assert ours["mean_per_class_recall"] == pytest.approx(reference["mean_per_class_recall"], abs=1e-6)
    cli = cli_json(capsys, "classify", "--checkpoint", str(run), "--data", "demo:val", "--classnames",
                   "demo:classnames", "--templates", "demo:templates", "--language", "en", "--per-class")
    assert {k: cli[k] for k in ("top1", "top5", "mean_per_class_recall")} == {
        k: ours[k] for k in ("top1", "top5", "mean_per_class_recall")
    }
    assert list(cli["per_class_recall"]) == classnames
    assert sum(cli["per_class_recall"].values()) / 10 == pytest.approx(cli["mean_per_class_recall"])


def test_image_folder_classification_matches_clip_benchmark(run, pretrained, tmp_path, capsys,
                                                            clip_benchmark_accuracy):
    from torchvision.datasets import ImageFolder

    model, tokenizer, preprocess = pretrained
    names = demo_classnames()["en"][:5]
    counts = dict.fromkeys(names, 0)
    for sample in demo_val_samples():
        name = demo_classnames()["en"][int(sample["cls"])]
        if counts.get(name, 4) < 4:
            counts[name] += 1
            (tmp_path / "data" / name).mkdir(parents=True, exist_ok=True)
            (tmp_path / "data" / name / f"{sample['__key__']}.png").write_bytes(sample["png"])
    (tmp_path / "templates.txt").write_text("\n".join(DEMO_TEMPLATES["en"]) + "\n")
    folder = ImageFolder(str(tmp_path / "data"), transform=preprocess)
    reference = cb_classification.evaluate(
        model, torch.utils.data.DataLoader(folder, batch_size=8), tokenizer, folder.classes,
        [t.replace("{}", "{c}") for t in DEMO_TEMPLATES["en"]], "cpu", amp=False,
    )
    (tmp_path / "data" / names[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    args = ["classify", "--checkpoint", str(run), "--data", str(tmp_path / "data"),
            "--templates", str(tmp_path / "templates.txt"), "--num-workers", "0"]
    result = cli_json(capsys, *args)  # no --classnames: the folder names are the class names
    assert result["num_images"] == 20 and result["skipped_samples"] == 1
    assert result["per_language"].keys() == {"default"}
    assert result["top1"] == pytest.approx(reference["acc1"], abs=1e-6)
    assert result["top5"] == pytest.approx(reference["acc5"], abs=1e-6)
    assert result["mean_per_class_recall"] == pytest.approx(reference["mean_per_class_recall"], abs=1e-6)


def write_unique_caption_shard(path: Path, samples: list[dict[str, bytes]]) -> list[list[str]]:
    """Demo images with 1 to 3 captions each, all distinct (retrieval ranks have no ties)."""
    captions = []
    with open(path, "wb") as stream, open_tar_writer(stream) as tar:
        for i, sample in enumerate(samples):
            english = json.loads(sample["json"])["captions"]["en"]
            captions.append([f"{english[j]} {i}" for j in range(1 + i % 3)])
            meta = {"captions": {"en": captions[-1], "fr": [f"légende {i}"]}}
            tar.write({"__key__": sample["__key__"], "png": sample["png"], "json": json.dumps(meta).encode()})
    return captions


def test_retrieval_matches_clip_benchmark(run, pretrained, tmp_path, capsys):
    model, tokenizer, preprocess = pretrained
    samples = demo_val_samples()[:90]
    captions = write_unique_caption_shard(tmp_path / "000.tar", samples)
    items = [(preprocess(open_png(s["png"])), texts) for s, texts in zip(samples, captions, strict=True)]
    loader = torch.utils.data.DataLoader(ListDataset(items), batch_size=32, collate_fn=image_captions_collate_fn)
    reference = cb_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    stream = retrieval_stream(str(tmp_path), model_data_context(model, tokenizer=tokenizer, training=False),
                              ["en"], batch_size=32, num_workers=0)
    ours = zeroshot_retrieval(model, tokenizer, stream)
    assert ours["num_images"] == 90 and ours["num_texts"] == sum(map(len, captions)) == 180
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    cli = cli_json(capsys, "retrieve", "--checkpoint", str(run), "--data", str(tmp_path), "--language", "en",
                   "--batch-size", "32", "--num-workers", "2")
    assert {k: cli[k] for k in reference} == pytest.approx(reference, abs=1e-6)
    both = cli_json(capsys, "retrieve", "--checkpoint", str(run), "--data", str(tmp_path), "--num-workers", "0")
    assert both["num_texts"] == 270  # default: the captions of every language


def test_trainer_retrieval_metrics_equal_the_cli(run, capsys):
    final = [r for r in read_metrics(run) if "eval/i2t_r1" in r][-1]
    result = cli_json(capsys, "retrieve", "--checkpoint", str(run), "--data", "demo:val", "--language", "en",
                      "--batch-size", "64", "--num-workers", "0")
    assert result["num_images"] == final["eval/retrieval_num_images"] == 359
    assert result["num_texts"] == 5 * 359
    for k in (1, 5, 10):
        assert result[f"text_retrieval_recall@{k}"] == final[f"eval/i2t_r{k}"]
        assert result[f"image_retrieval_recall@{k}"] == final[f"eval/t2i_r{k}"]


def write_parallel_shard(path: Path) -> dict[str, list[tuple[str, str]]]:
    """The demo prompts filled with every digit, English paired with French and with German."""
    names, pairs = demo_classnames(), {"en-fr": [], "en-de": []}
    with open(path, "wb") as stream, open_tar_writer(stream) as tar:
        for t, template in enumerate(DEMO_TEMPLATES["en"]):
            for digit in range(10):
                for tgt_lang in ("fr", "de"):
                    src = template.format(names["en"][digit])
                    tgt = DEMO_TEMPLATES[tgt_lang][t].format(names[tgt_lang][digit])
                    pairs[f"en-{tgt_lang}"].append((src, tgt))
                    meta = {"src": src, "tgt": tgt, "src_lang": "en", "tgt_lang": tgt_lang}
                    tar.write({"__key__": f"{t}{digit}{tgt_lang}", "json": json.dumps(meta).encode()})
    return pairs


def test_crosslingual_retrieval_is_tatoeba_accuracy(run, pretrained, tmp_path, capsys):
    model, tokenizer, _ = pretrained
    pairs = write_parallel_shard(tmp_path / "000.tar")
    args = ["retrieve", "--parallel", "--checkpoint", str(run), "--data", str(tmp_path / "000.tar")]
    result = cli_json(capsys, *args, "--batch-size", "16", "--num-workers", "0")
    with torch.no_grad():
        for name, group in pairs.items():
            src = model.encode_text(tokenizer([s for s, _ in group]), normalize=True)
            tgt = model.encode_text(tokenizer([t for _, t in group]), normalize=True)
            similarity = src @ tgt.T
            expected = {
                "src_to_tgt_accuracy@1": (similarity.argmax(1) == torch.arange(50)).float().mean().item(),
                "tgt_to_src_accuracy@1": (similarity.argmax(0) == torch.arange(50)).float().mean().item(),
            }
            assert result["per_pair"][name]["num_pairs"] == 50
            for key, value in expected.items():
                assert result["per_pair"][name][key] == pytest.approx(value, abs=1e-6)
    assert result["num_pairs"] == 100
    assert result["src_to_tgt_accuracy@1"] == pytest.approx(
        sum(m["src_to_tgt_accuracy@1"] for m in result["per_pair"].values()) / 2
    )
    only_german = cli_json(capsys, *args, "--language", "de", "--num-workers", "0")
    assert list(only_german["per_pair"]) == ["en-de"]
    assert only_german["per_pair"]["en-de"] == result["per_pair"]["en-de"]


@pytest.mark.parametrize("case", ["template without {}", "empty folder", "missing checkpoint", "unknown language",
                                  "unknown parallel language", "unknown architecture"])
def test_bad_inputs_fail_with_a_message_and_exit_code_2(run, tmp_path, capsys, case):
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na photo without a placeholder.\n")
    (tmp_path / "empty").mkdir()
    write_parallel_shard(tmp_path / "pairs.tar")
    checkpoint, data, extra = str(run), "demo:val", ["--classnames", "demo:classnames", "--templates", "demo:templates"]
    command = "classify"
    if case == "template without {}":
        extra[-1] = str(tmp_path / "templates.txt")
        expected = "'a photo without a placeholder.' has no '{}' placeholder"
    elif case == "empty folder":
        data, extra = str(tmp_path / "empty"), ["--templates", "demo:templates"]
        expected = "has no class subfolders"
    elif case == "missing checkpoint":
        checkpoint, expected = str(tmp_path / "nowhere"), "is neither a checkpoint"
    elif case == "unknown architecture":
        (tmp_path / "alien").mkdir()
        (tmp_path / "alien" / "config.yaml").write_text("model: {name: vilbert_xl}\n")
        (tmp_path / "alien" / "model.safetensors").write_bytes(b"")
        checkpoint, expected = str(tmp_path / "alien"), "an architecture this mmptm cannot build"
    elif case == "unknown language":
        extra += ["--language", "en,xx"]
        expected = "unknown language 'xx'; the prompts cover: en, fr, de"
    else:
        command, data, extra = "retrieve", str(tmp_path / "pairs.tar"), ["--parallel", "--language", "xx"]
        expected = "no sentence pair in languages ['xx']; the data has ['de', 'en', 'fr']"
    code = main(["zeroshot", command, "--checkpoint", checkpoint, "--data", data, *extra, "--num-workers", "0"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("mmptm: error: ") and expected in err and "Traceback" not in err


def test_api_rejects_bad_prompts_before_encoding_images(pretrained):
    model, tokenizer, _ = pretrained

    def batches():
        raise AssertionError("the stream must not be read")
        yield

    with pytest.raises(EvaluationError, match="different numbers of class names"):
        zeroshot_classification(model, tokenizer, batches(), {"en": ["a", "b"], "fr": ["a"]}, ["{}"])
    for template, error in [("a {} of a {}", "IndexError"), ("a {name}", "KeyError"), ("a { {}", "ValueError")]:
        with pytest.raises(EvaluationError, match=f"template '{re.escape(template)}' cannot be filled .*{error}"):
            zeroshot_classification(model, tokenizer, batches(), ["a"], ["{}", template])
    with pytest.raises(EvaluationError, match="primary language 'fr'"):
        zeroshot_classification(model, tokenizer, batches(), {"en": ["a"], "fr": ["b"]}, ["{}"], languages=["en"],
                                primary_language="fr")
