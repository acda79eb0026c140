"""VisualBERT: visual inputs (ViT, frozen timm, regions), the shared objectives, the ITM evaluator, the tiny configs."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import mmptm
from mmptm.config import ConfigError
from mmptm.encoders.fusion import MissingVisualInputError
from mmptm.encoders.visual_inputs import box_location, grid_boxes
from mmptm.objectives import ImageTextMatching, MaskedRegionModelling, VisionLanguageMLM
from mmptm.objectives.itm import negative_candidates
from mmptm.objectives.mrm import OnlineKMeans, choose_regions, masked_visual_inputs, zero_token_pixels

TOKENIZER = types.SimpleNamespace(vocab_size=50, pad_id=0, eos_id=3, bos_id=2, mask_id=4)
TINY_VIT = {"name": "vit", "image_size": 16, "patch_size": 8, "width": 16, "layers": 1, "heads": 2}
# Overrides that shrink the bundled fusion configs for tests.
TINY_RUN = [
    "data.train.batch_size=8",
    "data.train.num_workers=0",
    "train.log_every=1",
    "train.warmup_steps=0",
    "train.progress_bar=false",
    "train.tensorboard=false",
    "eval.tasks.0.num_workers=0",
]


def tiny_visualbert(**options) -> torch.nn.Module:
    config = {"name": "visualbert", "width": 16, "layers": 1, "heads": 2, "visual_dim": 12, "max_text_length": 8,
              "region_classes": 5, "dropout": 0.0, "init_std": 0.2, "vision": TINY_VIT, **options}
    return mmptm.create_model(config, tokenizer=TOKENIZER)


def captions(batch: int, length: int = 8, seed: int = 0) -> torch.Tensor:
    """Random ``bos ... eos pad`` captions of distinct words."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, TOKENIZER.vocab_size, (batch, length), generator=generator)
    tokens[:, 0], tokens[:, 5], tokens[:, 6:] = 2, 3, 0
    return tokens


def region_batch(batch: int = 3, regions: int = 6, dim: int = 12) -> dict[str, torch.Tensor]:
    mask = torch.arange(regions)[None] < torch.tensor([regions, 4, 2])[:batch, None]
    return {"text": captions(batch), "regions": torch.randn(batch, regions, dim),
            "boxes": torch.rand(batch, regions, 4), "region_mask": mask}


def test_grid_boxes_and_location():
    boxes = grid_boxes(2, 2, prefix=1)
    torch.testing.assert_close(boxes[0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(boxes[4], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(box_location(boxes)[1:, 4], torch.full((4,), 0.25))


@pytest.mark.parametrize("vision", ["vit", "timm_frozen", "regions"])
def test_visual_inputs_and_heads(vision):
    if vision == "vit":
        model, visual = tiny_visualbert(), {"image": torch.randn(3, 3, 16, 16)}
        tokens = 1 + 4
    elif vision == "timm_frozen":
        pytest.importorskip("timm")
        model = tiny_visualbert(vision={"timm_model": "resnet18", "image_size": 64}, freeze_vision=True)
        visual, tokens = {"image": torch.randn(3, 3, 64, 64)}, 4  # a 2x2 map
    else:
        model = tiny_visualbert(vision=None)
        batch = region_batch()
        visual, tokens = {k: batch[k] for k in ("regions", "boxes", "region_mask")}, 6
    text = captions(3)
    out = model(text, **visual, mlm=True)
    assert out.text.shape == (3, 8, 16) and out.visual.shape == (3, tokens, 16)
    assert out.itm_logits.shape == (3, 2) and out.mlm_logits.shape == (3, 8, TOKENIZER.vocab_size)
    out.mlm_logits.sum().backward()
    if vision == "timm_frozen":
        model.train()
        assert not model.visual.training
        assert all(p.grad is None for p in model.visual.parameters())
        assert model.visual_projection.weight.grad is not None



def test_a_frozen_tower_is_in_eval_mode_from_construction():
    # Before any train()/eval() call: a frozen timm tower's BatchNorm statistics must not move.
    pytest.importorskip("timm")
    model = tiny_visualbert(vision={"timm_model": "resnet18", "image_size": 64}, freeze_vision=True)
    assert model.training and not model.visual.training
    norm = next(m for m in model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = norm.running_mean.clone()
    model(captions(2), image=torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(norm.running_mean, before, rtol=0, atol=0)
    assert tiny_visualbert().visual.training  # a trained tower trains


# CLIP BPE-like ids: the pad id 0 is also the symbol "!".
BPE_TOKENIZER = types.SimpleNamespace(vocab_size=50, pad_id=0, eos_id=49, bos_id=48, mask_id=None)
TINY_FUSION = {
    "visualbert": {"name": "visualbert", "width": 16, "layers": 1, "heads": 2},
    "vilbert": {"name": "vilbert", "text_width": 16, "text_layers": 1, "text_heads": 2, "visual_width": 8,
                "visual_layers": 1, "visual_heads": 2, "coattention_width": 16, "coattention_heads": 2,
                "text_coattention_ids": [1], "visual_coattention_ids": [1]},
}


@pytest.mark.parametrize("name", list(TINY_FUSION))
def test_a_pad_id_inside_the_caption_is_a_word_and_padding_after_eot_is_not(name):
    torch.manual_seed(0)
    model = mmptm.create_model({**TINY_FUSION[name], "visual_dim": 12, "max_text_length": 8, "dropout": 0.0,
                                "init_std": 0.2, "vision": None}, tokenizer=BPE_TOKENIZER).eval()
    regions, boxes = torch.randn(1, 3, 12), torch.rand(1, 3, 4)
    exclaimed = torch.tensor([[48, 10, 0, 11, 49, 0, 0]])  # "<sot> wow ! cat <eot> <pad> <pad>"
    plain = torch.tensor([[48, 10, 12, 11, 49, 0, 0]])  # "<sot> wow so cat <eot> <pad> <pad>"
    with torch.no_grad():
        before = {k: model(t, regions=regions, boxes=boxes) for k, t in (("!", exclaimed), ("plain", plain))}
        model.embeddings.word_embeddings.weight[0] += 5 * torch.randn(16)  # another "!" (and padding)
        after = {k: model(t, regions=regions, boxes=boxes) for k, t in (("!", exclaimed), ("plain", plain))}
        shorter = model(plain[:, :5], regions=regions, boxes=boxes)
    # "!" before the end-of-text token is seen by [CLS] and the ITM head.
    assert (before["!"].text[0, 0] - after["!"].text[0, 0]).abs().max() > 1e-3
    assert (before["!"].itm_logits - after["!"].itm_logits).abs().max() > 1e-4
    # Padding after it is not: the caption's and the regions' states ignore its embedding and its length.
    for out in (after["plain"], shorter):
        torch.testing.assert_close(out.text[:, :5], before["plain"].text[:, :5], rtol=0, atol=1e-6)
        torch.testing.assert_close(out.visual, before["plain"].visual, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.itm_logits, before["plain"].itm_logits, rtol=0, atol=1e-6)
    # And "!" trains: its embedding row gets a gradient.
    model.train()
    model(exclaimed, regions=regions, boxes=boxes).itm_logits.sum().backward()
    assert model.embeddings.word_embeddings.weight.grad[0].abs().sum() > 0

def test_pair_index_scores_texts_against_one_encoding():
    model = tiny_visualbert().eval()
    images, text = torch.randn(2, 3, 16, 16), captions(2)
    separate = torch.cat([model(text[[j]], image=images[[i]]).itm_logits for i in range(2) for j in range(2)])
    paired = model(text[[0, 1, 0, 1]], image=images, pair_index=torch.tensor([0, 0, 1, 1])).itm_logits
    torch.testing.assert_close(paired, separate, atol=1e-5, rtol=1e-4)


def test_negative_candidates_exclude_equal_captions_and_labels():
    text = captions(6)
    text[3] = text[0]  # a duplicate caption of sample 0
    labels = torch.tensor([0, 1, 2, 5, 1, 3])  # sample 4 shares sample 1's label
    indices, valid = negative_candidates(text, labels, text, labels, count=6)
    for row in range(6):
        allowed = {j for j in range(6) if not torch.equal(text[j], text[row]) and labels[j] != labels[row]}
        assert set(indices[row][valid[row]].tolist()) == allowed


def test_choose_regions_masks_at_least_one_real_region_per_image():
    valid = torch.tensor([[True] * 5, [True, True, False, False, False]])
    for seed in range(20):
        chosen = choose_regions(valid, 0.01, torch.Generator().manual_seed(seed))
        assert (chosen.sum(dim=1) >= 1).all() and not (chosen & ~valid).any()


def test_online_kmeans_separates_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(4)[:2] * 5
    features = torch.cat([centres[0] + 0.1 * torch.randn(50, 4, generator=generator),
                          centres[1] + 0.1 * torch.randn(50, 4, generator=generator)])
    kmeans = OnlineKMeans(codes=2, momentum=0.5)
    torch.manual_seed(1)
    for _ in range(5):
        codes = kmeans.assign_and_update(features)
    assert codes[:50].unique().numel() == 1 and codes[50:].unique().numel() == 1 and codes[0] != codes[50]



def _kmeans_worker(rank: int, init_file: str, results_dir: str) -> None:
    """One of 2 gloo ranks: a codebook initialised and updated from this rank's own batches."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(1234)  # the same global seed on every rank, as the trainer sets it
        data = torch.Generator().manual_seed(100 + rank)  # each rank reads its own samples
        probe = torch.randn(64, 16, generator=torch.Generator().manual_seed(7))  # the same on both ranks
        kmeans = OnlineKMeans(codes=8, momentum=0.9)
        kmeans.assign_and_update(torch.randn(32, 16, generator=data))
        results = {"init": (kmeans.assign_and_update(probe, training=False), kmeans.centroids.clone())}
        for _ in range(10):
            kmeans.assign_and_update(torch.randn(32, 16, generator=data))
        results["updated"] = (kmeans.assign_and_update(probe, training=False), kmeans.centroids.clone())
        torch.save(results, Path(results_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_online_kmeans_ranks_share_one_codebook(tmp_path):
    mp.spawn(_kmeans_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for stage in ("init", "updated"):
        torch.testing.assert_close(first[stage][1], second[stage][1], rtol=0, atol=0, msg=stage)
        assert torch.equal(first[stage][0], second[stage][0]), stage  # identical features, identical codes
    assert first["init"][0].unique().numel() > 1  # a codebook in use, not one code for everything

def test_itm_learns_a_fixed_batch():
    torch.manual_seed(0)
    model = tiny_visualbert()
    batch = {"text": captions(4), "image": torch.randn(4, 3, 16, 16), "label": torch.arange(4)}
    objective = ImageTextMatching(hard_fraction=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        loss = objective(model, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), losses


@pytest.mark.parametrize("inputs", ["pixels", "regions"])
def test_mlm_and_mrm_train_the_model(inputs):
    torch.manual_seed(0)
    if inputs == "pixels":
        model = tiny_visualbert()
        batch = {"text": captions(4), "image": torch.randn(4, 3, 16, 16)}
    else:
        model = tiny_visualbert(vision=None)
        batch = region_batch()
    mlm, mrm = VisionLanguageMLM(mask_prob=0.3), MaskedRegionModelling()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history: dict[str, list[float]] = {"mlm": [], "regression": []}
    for _ in range(30):
        mlm_out, mrm_out = mlm(model, batch), mrm(model, batch)
        optimizer.zero_grad()
        (mlm_out["loss"] + mrm_out["loss"]).backward()
        optimizer.step()
        history["mlm"].append(mlm_out["loss"].item())
        history["regression"].append(mrm_out["regression_loss"].item())
    if inputs == "pixels":
        del history["regression"]  # its target is the trainable tower's output, which moves
    for name, values in history.items():  # a fixed batch is learnt (the masks change every step: compare means)
        assert sum(values[-5:]) < 0.9 * sum(values[:5]), (name, values)



def test_mrm_hides_masked_patches_from_the_vit_tower_and_takes_targets_from_the_whole_image():
    torch.manual_seed(0)
    model = tiny_visualbert(visual_dim=16).eval()
    image = torch.randn(2, 3, 16, 16, requires_grad=True)
    seen, targets, masked = masked_visual_inputs(model, {"image": image}, mask_prob=0.5)
    torch.testing.assert_close(targets.features, model.visual_inputs(image=image).features, rtol=0, atol=0)
    assert not targets.features.requires_grad and seen.features.requires_grad
    # What the fusion layers see (masked tokens are zeroed in the forward pass) depends on no masked pixel.
    (grad,) = torch.autograd.grad(seen.features[~masked].pow(2).sum(), image)
    cells = masked[:, 1:].view(2, 2, 2).repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)  # 8-pixel patches
    assert cells.any() and (~cells).any()
    assert grad.abs().sum(dim=1)[cells].max() == 0 and grad.abs().sum(dim=1)[~cells].min() > 0
    # A masked class token (its box: the whole image) hides no pixels.
    everything = torch.ones(2, 5, dtype=torch.bool)
    only_class = everything.clone()
    only_class[:, 1:] = False
    torch.testing.assert_close(zero_token_pixels(image, targets.boxes, only_class), image, rtol=0, atol=0)
    assert not zero_token_pixels(image, targets.boxes, everything).any()

def test_detector_distribution_target_uses_kl():
    model = tiny_visualbert(vision=None)
    batch = region_batch()
    batch["region_classes"] = torch.softmax(torch.randn(3, 6, 5), dim=-1)
    out = MaskedRegionModelling(target="detector")(model, batch)
    assert out["classification_loss"] >= 0
    with pytest.raises(KeyError, match="region_classes"):
        MaskedRegionModelling(target="detector")(model, region_batch())


def test_missing_visual_input_names_the_keys_and_config_field():
    with pytest.raises(MissingVisualInputError, match=r"lacks \['regions', 'boxes'\].*region_features"):
        VisionLanguageMLM()(tiny_visualbert(vision=None), {"text": captions(2), "image": torch.randn(2, 3, 16, 16)})
    with pytest.raises(MissingVisualInputError, match="model.vision is set.*'image'"):
        ImageTextMatching()(tiny_visualbert(), region_batch())


def test_mlm_needs_a_mask_token():
    model = mmptm.create_model(
        {"name": "visualbert", "width": 16, "layers": 1, "heads": 2, "visual_dim": 12, "vision": TINY_VIT},
        tokenizer=types.SimpleNamespace(vocab_size=50, pad_id=0, eos_id=3, bos_id=2, mask_id=None),
    )
    with pytest.raises(ValueError, match="<mask>"):
        VisionLanguageMLM()(model, {"text": captions(2), "image": torch.randn(2, 3, 16, 16)})


def test_config_validates_an_optional_tower():
    config = mmptm.load_config("visualbert_tiny.yaml", ["model.vision=null"])
    assert config.model["vision"] is None
    with pytest.raises(ConfigError, match="did you mean 'patch_size'"):
        mmptm.load_config("visualbert_tiny.yaml", ["model.vision.patch_sise=4"])


@pytest.mark.parametrize("name", ["visualbert_tiny.yaml", "vilbert_tiny.yaml"])
def test_shared_fusion_options_are_config_options_of_each_model(name):
    # FusionModel's keyword-only options reach each model's signature (and its type checks) without being
    # repeated in it; a model's own default wins (ViLBERT's visual_dim: the paper's 2048 region features).
    config = mmptm.load_config(name, ["model.freeze_vision=true", "model.region_classes=7"])
    assert config.model["freeze_vision"] is True and config.model["region_classes"] == 7
    with pytest.raises(ConfigError, match="region_classes"):
        mmptm.load_config(name, ["model.region_classes=many"])
    with pytest.raises(ConfigError, match="did you mean 'freeze_vision'"):
        mmptm.load_config(name, ["model.freeze_visoin=true"])
    from mmptm.registry import MODELS, accepted_parameters

    params = accepted_parameters(MODELS.get(name.split("_")[0]))
    assert {"vision", "freeze_vision", "visual_dim", "region_classes", "mask_id"} <= set(params)
    assert params["visual_dim"].default == (2048 if name.startswith("vilbert") else 768)


def one_template(tmp_path: Path) -> str:
    path = tmp_path / "templates.json"
    path.write_text(json.dumps({"en": ["a handwritten {}."]}))
    return str(path)


@pytest.mark.parametrize("name", ["visualbert_tiny.yaml", "vilbert_tiny.yaml"])
def test_tiny_configs_train_and_report_itm_retrieval(tmp_path, demo, name):
    run = tmp_path / "run"
    config = mmptm.load_config(
        name, [*TINY_RUN, "train.max_steps=2", f"eval.tasks.0.templates={one_template(tmp_path)}"]
    )
    final = mmptm.train(config, output_dir=run)
    assert {"eval/itm_i2t_r1", "eval/itm_i2t_r5", "eval/itm_t2i_r1", "eval/mlm_acc"} <= set(final)
    assert final["eval/itm_num_images"] > 300 and 0 <= final["eval/itm_i2t_r1"] <= 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"train/itm/loss", "train/vl_mlm/accuracy", "train/mrm/regression_loss"} <= set(records[0])
    model, tokenizer, _ = mmptm.load_pretrained(run)
    assert model.mask_id == tokenizer.mask_id == 4


def write_bert_vocab(path: Path, size: int) -> Path:
    """A BERT-layout vocab.txt of ``size`` pieces: [PAD] [UNK] [CLS] [SEP] [MASK], then words and ``##`` pieces."""
    words = ["a", "hand", "##written", "seven", ".", ",", "the", "##s"]
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    pieces += [f"w{i}" for i in range(size - len(pieces))]
    path.write_text("\n".join(pieces) + "\n", encoding="utf-8")
    return path


def test_wordpiece_tokenizer_gives_bert_tokenizer_ids(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mmptm.data_pipelines.tokenizer import load_tokenizer

    vocab = write_bert_vocab(tmp_path / "vocab.txt", 40)
    ours = load_tokenizer(tmp_path, context_length=8)
    theirs = transformers.BertTokenizer(str(vocab), do_lower_case=True)
    texts = ["A handwritten Seven.", "the hands, THE w3 w30 ünknown"]
    expected = theirs(texts, padding="max_length", max_length=8, truncation=True, return_tensors="pt").input_ids
    torch.testing.assert_close(ours(texts), expected)
    assert (ours.pad_id, ours.bos_id, ours.eos_id, ours.mask_id, ours.vocab_size) == (0, 2, 3, 4, 40)
    assert ours.decode(ours("a handwritten seven.")[0]) == "a handwritten seven."
    saved = load_tokenizer(ours.save(tmp_path / "saved"), context_length=8)
    torch.testing.assert_close(saved(texts), expected)


@pytest.mark.parametrize("size", ["small", "default"])
def test_hf_visualbert_import_via_the_cli_gives_equal_states_and_head_logits(tmp_path, capsys, size):
    transformers = pytest.importorskip("transformers")
    from mmptm.cli import main

    options = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
               "visual_embedding_dim": 24, "vocab_size": 50} if size == "small" else {}
    hf_config = transformers.VisualBertConfig(**options)
    torch.manual_seed(0)
    hf = transformers.VisualBertForPreTraining(hf_config).eval()
    hf.save_pretrained(tmp_path / "hf")
    vocab = write_bert_vocab(tmp_path / "vocab.txt", hf_config.vocab_size)
    assert main(["convert", "hf-visualbert", str(tmp_path / "hf"), str(tmp_path / "mmptm"),
                 "--tokenizer", str(vocab), "--context-length", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["heads_imported"] == ["mlm_head", "itm_head"]
    model, tokenizer, _ = mmptm.load_pretrained(tmp_path / "mmptm")
    assert tokenizer.vocab_size == hf_config.vocab_size and tokenizer.context_length == 16
    text = torch.randint(5, hf_config.vocab_size, (2, 9))
    text[:, 0], text[:, 6], text[1, 7:] = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    visual = torch.randn(2, 5, hf_config.visual_embedding_dim)
    with torch.no_grad():
        expected = hf(input_ids=text, attention_mask=(text != 0).long(), visual_embeds=visual,
                      visual_attention_mask=torch.ones(2, 5, dtype=torch.long), output_hidden_states=True)
        out = model(text, regions=visual, boxes=torch.zeros(2, 5, 4), mlm=True)
    real = torch.cat([text != 0, torch.ones(2, 5, dtype=torch.bool)], dim=1)  # padding states are not compared
    actual = torch.cat([out.text, out.visual], dim=1)
    torch.testing.assert_close(actual[real], expected.hidden_states[-1][real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.mlm_logits[text != 0], expected.prediction_logits[:, :9][text != 0],
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.itm_logits, expected.seq_relationship_logits, atol=1e-4, rtol=1e-4)


def test_hf_visualbert_import_errors_name_the_fix(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mmptm.interop.common import ConversionError
    from mmptm.interop.visualbert import import_hf_visualbert

    hf_config = transformers.VisualBertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                              intermediate_size=32, visual_embedding_dim=8, vocab_size=30)
    transformers.VisualBertModel(hf_config).save_pretrained(tmp_path / "hf")
    with pytest.raises(ConversionError, match="pass --tokenizer with BERT's vocab.txt"):
        import_hf_visualbert(tmp_path / "hf", tmp_path / "out")
    with pytest.raises(ConversionError, match="the tokenizer has 40 ids but the checkpoint's word embeddings 30"):
        import_hf_visualbert(tmp_path / "hf", tmp_path / "out", write_bert_vocab(tmp_path / "vocab.txt", 40))
    # A bare VisualBertModel: the encoder is imported, the heads keep mmptm's initialisation.
    _, heads = import_hf_visualbert(tmp_path / "hf", tmp_path / "out", write_bert_vocab(tmp_path / "vocab.txt", 30))
    assert heads == []


@pytest.mark.parametrize("name", ["visualbert_base.yaml", "vilbert_base.yaml"])
def test_base_configs_build_and_step(tmp_path, demo, monkeypatch, name):
    # BERT-base fusion layers as configured; a one-layer tower at the demo images' size, and no checkpoint
    # (gigabytes of weights and optimizer state, tested with the tiny configs) keep the test cheap.
    from mmptm.training.trainer import Trainer

    monkeypatch.setattr(Trainer, "save", lambda self: None)
    overrides = [*TINY_RUN, "train.max_steps=2", "data.train.batch_size=2", "data.train.shuffle_buffer=4",
                 "model.vision.image_size=32", "model.vision.layers=1", "eval.tasks=[]"]
    config = mmptm.load_config(name, overrides)
    mmptm.train(config, output_dir=tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "train/loss" in r] == [1, 2]
    assert {"train/itm/loss", "train/vl_mlm/loss", "train/mrm/loss"} <= set(logged[-1])


@pytest.fixture(scope="module")
def dvae_checkpoints(tmp_path_factory, demo) -> dict[int, str]:
    """Random tiny dVAEs on 16-pixel images, saved as checkpoints, by token grid side (4, 2, 1)."""
    from mmptm.data_pipelines.tokenizer import load_tokenizer
    from mmptm.interop.common import write_checkpoint

    root = tmp_path_factory.mktemp("dvae")
    tokenizer = load_tokenizer(demo.tokenizer, context_length=8)
    out = {}
    for downsamples in (2, 3, 4):
        config = {"name": "dvae", "image_size": 16, "num_downsamples": downsamples, "hidden": 8, "codebook_size": 8}
        torch.manual_seed(downsamples)
        model = mmptm.create_model(config)
        out[16 // 2**downsamples] = str(write_checkpoint(root / str(downsamples), config, model.state_dict(),
                                                         tokenizer, source="test"))
    return out


@pytest.mark.parametrize("grid", [4, 2, 1], ids=["dvae finer", "same grid", "patches finer"])
def test_dvae_targets_are_the_tokens_of_each_patchs_cells(dvae_checkpoints, grid):
    from mmptm.objectives.mrm import DVAETargets

    torch.manual_seed(0)
    model = tiny_visualbert(region_classes=8).eval()
    images = torch.randn(2, 3, 16, 16)
    targets_of = DVAETargets(dvae_checkpoints[grid])
    targets, has_target = targets_of(model, images, model.visual_inputs(image=images))
    assert has_target.tolist() == [False, True, True, True, True]  # the class token covers the whole image
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.visual.image_mean, model.visual.image_std))
    tokens = targets_of.dvae(torch.device("cpu")).encode_tokens((images * std + mean).clamp(0, 1))
    tokens = tokens.view(2, grid, grid)
    for patch in range(4):
        row, col = divmod(patch, 2)
        if grid >= 2:  # the patch covers a (grid / 2)-sided block of cells
            side = grid // 2
            block = tokens[:, row * side:(row + 1) * side, col * side:(col + 1) * side].flatten(1)
        else:  # the patch lies inside the one cell
            block = tokens[:, :1, :1].flatten(1)
        expected = F.one_hot(block, 8).float().mean(dim=1)
        torch.testing.assert_close(targets[:, 1 + patch], expected)


def test_mrm_with_dvae_targets_learns_and_checks_its_inputs(dvae_checkpoints):
    torch.manual_seed(0)
    model = tiny_visualbert(region_classes=8)
    batch = {"text": captions(4), "image": torch.randn(4, 3, 16, 16)}
    objective = MaskedRegionModelling(mask_prob=0.5, regression_weight=0.0, dvae=dvae_checkpoints[2])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = objective(model, batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["classification_loss"].item())
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
    with pytest.raises(ValueError, match="the dVAE has 8 tokens but model.region_classes is 5"):
        MaskedRegionModelling(target="dvae", dvae=dvae_checkpoints[2])(tiny_visualbert(), batch)
    with pytest.raises(ValueError, match="reads region features"):
        MaskedRegionModelling(target="dvae", dvae=dvae_checkpoints[2])(tiny_visualbert(vision=None, region_classes=8),
                                                                      region_batch())
    three_by_three = tiny_visualbert(region_classes=8, vision={**TINY_VIT, "image_size": 24})
    with pytest.raises(ValueError, match="3x3 patch grid and the dVAE's 2x2 token grid"):
        MaskedRegionModelling(dvae=dvae_checkpoints[2])(three_by_three, {**batch, "image": torch.randn(4, 3, 24, 24)})
    with pytest.raises(ValueError, match="target dvae needs the dvae option"):
        MaskedRegionModelling(target="dvae")
