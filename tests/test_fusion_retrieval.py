"""``mmptm zeroshot retrieve`` of fusion models: matching-head scores of every pair, and dual-encoder reranking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_zeroshot import demo_val_samples

from mmptm.cli import main
from mmptm.data_pipelines.context import model_data_context
from mmptm.data_pipelines.demo import demo_classnames
from mmptm.data_pipelines.shards import open_tar_writer
from mmptm.data_pipelines.tokenizer import load_tokenizer
from mmptm.evaluation import EvalContext, itm_retrieval, retrieval_stream, zeroshot_retrieval
from mmptm.interop.common import write_checkpoint
from mmptm.models import create_model, load_pretrained

TINY_VIT = {"name": "vit", "image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}
# Two layers and large initial weights: a random matching head whose rankings differ from image to image
# (with one layer or small weights it ranks every image's captions alike).
FUSION = {"name": "visualbert", "width": 32, "layers": 2, "heads": 2, "visual_dim": 32, "max_text_length": 24,
          "region_classes": 8, "dropout": 0.0, "init_std": 1.0, "vision": TINY_VIT}
CLIP = {"name": "clip", "embed_dim": 32, "vision": TINY_VIT,
        "text": {"name": "text_transformer", "context_length": 24, "width": 32, "layers": 1, "heads": 2}}
TEMPLATE = "a handwritten {}."


def save_random_checkpoint(path: Path, config: dict, tokenizer) -> str:
    torch.manual_seed(0)
    model = create_model(config, tokenizer=tokenizer)
    write_checkpoint(path, config, model.state_dict(), tokenizer, source="test")
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo) -> dict[str, str]:
    """A random visualbert and CLIP, and a shard of one demo image per digit captioned with the one template."""
    root = tmp_path_factory.mktemp("fusion_retrieval")
    tokenizer = load_tokenizer(demo.tokenizer, context_length=24)
    first_of_class = {}
    for sample in demo_val_samples():
        first_of_class.setdefault(int(sample["cls"]), sample)
    names = demo_classnames()["en"]
    (root / "shards").mkdir()
    with open(root / "shards" / "000.tar", "wb") as stream, open_tar_writer(stream) as tar:
        for label, sample in sorted(first_of_class.items()):
            tar.write({"__key__": sample["__key__"], "png": sample["png"], "cls": sample["cls"],
                       "txt": TEMPLATE.format(names[label]).encode()})
    templates = root / "templates.json"
    templates.write_text(json.dumps({"en": [TEMPLATE]}))
    return {"data": str(root / "shards"), "templates": str(templates),
            "fusion": save_random_checkpoint(root / "visualbert", FUSION, tokenizer),
            "clip": save_random_checkpoint(root / "clip", CLIP, tokenizer)}


def retrieve(capsys, setup: dict[str, str], *args: str) -> dict:
    argv = ["zeroshot", "retrieve", "--checkpoint", setup["fusion"], "--data", setup["data"], "--language", "en",
            "--batch-size", "4", "--num-workers", "0", *args]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_all_pairs_equal_the_itm_retrieval_evaluator(setup, capsys):
    # One image per class, captioned with the evaluator's one template: image->text retrieval over the
    # ten captions is the evaluator's classification, and a caption's best image its text->image check.
    cli = retrieve(capsys, setup)
    model, tokenizer, _ = load_pretrained(setup["fusion"])
    context = EvalContext(tokenizer, model_data_context(model, tokenizer=tokenizer, training=False))
    expected = itm_retrieval(model, context, data=setup["data"], templates=setup["templates"], batch_size=4)
    assert cli["num_images"] == cli["num_texts"] == expected["itm_num_images"] == 10
    assert cli["itm_pairs_scored"] == 100 and cli["rerank_top_k"] is None
    assert cli["text_retrieval_recall@1"] == pytest.approx(expected["itm_i2t_r1"])
    assert cli["text_retrieval_recall@5"] == pytest.approx(expected["itm_i2t_r5"])
    assert cli["image_retrieval_recall@1"] == pytest.approx(expected["itm_t2i_r1"])
    assert cli["text_retrieval_recall@10"] == cli["image_retrieval_recall@10"] == 1.0
    assert cli["text_retrieval_recall@5"] != 0.5  # not one ranking for every image


def test_reranking_every_candidate_equals_scoring_every_pair(setup, capsys):
    full = retrieve(capsys, setup)
    reranked = retrieve(capsys, setup, "--rerank-from", setup["clip"], "--top-k", "10")
    assert reranked.pop("rerank_top_k") == 10 and full.pop("rerank_top_k") is None
    assert reranked == full


def test_reranking_one_candidate_keeps_the_dual_encoders_ranking(setup, capsys):
    reranked = retrieve(capsys, setup, "--rerank-from", setup["clip"], "--top-k", "1")
    clip, tokenizer, _ = load_pretrained(setup["clip"])
    stream = retrieval_stream(setup["data"], model_data_context(clip, tokenizer=tokenizer, training=False), ["en"],
                              batch_size=4, num_workers=0)
    dual = zeroshot_retrieval(clip, tokenizer, stream)
    assert reranked["itm_pairs_scored"] <= 20
    assert {k: reranked[k] for k in dual} == dual


def test_rerank_needs_a_fusion_checkpoint(setup, capsys):
    argv = ["zeroshot", "retrieve", "--checkpoint", setup["clip"], "--data", setup["data"], "--rerank-from",
            setup["clip"]]
    assert main(argv) == 2
    assert "visualbert or vilbert checkpoint" in capsys.readouterr().err
