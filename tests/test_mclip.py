"""Multilingual CLIP: objective sampling, a text tower shared by two objectives, tower init/freezing, distillation."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import mmptm
from mmptm.config import ConfigError, load_config
from mmptm.data_pipelines.context import DataContext
from mmptm.data_pipelines.demo import resolve
from mmptm.data_pipelines.number_pairs import NumberPairs
from mmptm.data_pipelines.tokenizer import load_tokenizer
from mmptm.objectives.distillation import MultilingualDistillation
from mmptm.training.checkpoint import save_checkpoint
from mmptm.training.objective_sampling import objectives_for_draw
from mmptm.training.trainer import DataStream, Trainer

TINY_CLIP = {
    "name": "clip",
    "embed_dim": 32,
    "vision": {"name": "vit", "image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "heads": 2},
    "text": {"name": "text_transformer", "context_length": 16, "width": 32, "layers": 1, "heads": 2},
}


def run_config(tmp_path, **train) -> dict:
    """Two objectives sharing the text tower: image-caption contrastive and translation-pair alignment."""
    return {
        "model": TINY_CLIP,
        "tokenizer": {"path": "demo:tokenizer", "context_length": 16},
        "objectives": [
            {"name": "contrastive", "data": "captions", "weight": 0.7},
            {"name": "text_alignment", "data": "pairs", "weight": 1.9},
        ],
        "data": {
            "captions": {"name": "image_text", "shards": "demo:train", "caption_languages": ["en", "de"],
                         "batch_size": 8, "num_workers": 0, "shuffle_buffer": 0},
            "pairs": {"name": "number_pairs", "languages": ["en", "fr", "de"], "batch_size": 8, "epoch_samples": 64},
        },
        "train": {"max_steps": 4, "warmup_steps": 0, "grad_clip": None, "log_every": 1, "progress_bar": False,
                  "tensorboard": False, "output_dir": str(tmp_path / "run"), **train},
        "eval": {"zeroshot": None},
    }


def tokenizer():
    return load_tokenizer(resolve("demo:tokenizer"), context_length=16)


def save_model(model: torch.nn.Module, folder, model_section: dict) -> str:
    config = yaml.safe_dump({"model": model_section, "tokenizer": {"path": "demo:tokenizer", "context_length": 16}})
    return str(save_checkpoint(folder, 1, model, config, tokenizer()))


# --------------------------------------------------------------------------- objective sampling


def test_objective_sampling_all_round_robin_and_proportional():
    assert objectives_for_draw("all", [1, 1, 1], seed=0, draw=5) == [0, 1, 2]
    assert [objectives_for_draw("round_robin", [1, 1, 1], 0, d)[0] for d in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    draws = [objectives_for_draw("proportional", [3, 1], seed=4, draw=d)[0] for d in range(4000)]
    assert draws == [objectives_for_draw("proportional", [3, 1], seed=4, draw=d)[0] for d in range(4000)]
    assert abs(draws.count(0) / len(draws) - 0.75) < 0.03
    assert draws != [objectives_for_draw("proportional", [3, 1], seed=5, draw=d)[0] for d in range(4000)]
    with pytest.raises(ValueError, match="round_robin"):
        objectives_for_draw("random", [1, 1], 0, 0)


def test_a_bad_ratio_is_rejected_naming_the_key(tmp_path, demo):
    config = run_config(tmp_path, objective_sampling="proportional")
    config["objectives"][1]["ratio"] = 0
    with pytest.raises(ConfigError, match=r"objectives\.1\.ratio"):
        load_config(config)


# --------------------------------------------------------------------------- one step, two objectives


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # optimizer.step is captured
def test_shared_text_tower_gets_both_objectives_gradients_with_their_weights(tmp_path, demo):
    trainer = Trainer(load_config(run_config(tmp_path, grad_accum_steps=2)))
    batches = {name: [stream.next_batch() for _ in range(2)] for name, stream in trainer.streams.items()}
    trainer.streams = {name: DataStream(name, fixed) for name, fixed in batches.items()}
    model = trainer.model

    def gradients(objective_index: int, stream: str) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        for batch in batches[stream]:  # the accumulation micro-steps, each a half of the step's loss
            (trainer.objectives[objective_index](model, batch)["loss"] / 2).backward()
        return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}

    contrastive, alignment = gradients(0, "captions"), gradients(1, "pairs")
    model.zero_grad(set_to_none=True)
    stepped = {}

    def capture(*_args, **_kwargs):
        stepped.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    trainer.optimizer.step = capture
    totals, samples = trainer._train_step()

    assert samples == 4 * 8
    assert {"train/contrastive/loss", "train/text_alignment/loss", "train/loss"} <= set(totals)
    text_params = [n for n, _ in model.named_parameters() if n.startswith("text.")]
    for name in text_params:
        torch.testing.assert_close(stepped[name], 0.7 * contrastive[name] + 1.9 * alignment[name], rtol=1e-3, atol=1e-5)
    # Both objectives reach the text tower (else the check above could not tell the weights apart).
    assert all(contrastive[n].abs().sum() > 0 and alignment[n].abs().sum() > 0 for n in ["text.text_projection"])
    # The image tower learns from the image-text objective only.
    torch.testing.assert_close(stepped["visual.proj"], 0.7 * contrastive["visual.proj"], rtol=1e-3, atol=1e-5)
    assert alignment["visual.proj"].abs().sum() == 0


def test_round_robin_logs_each_objective_only_on_the_steps_it_ran(tmp_path, demo):
    trainer = Trainer(load_config(run_config(tmp_path, objective_sampling="round_robin")))
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ran = [{key.split("/")[1] for key in record if key.endswith("/loss") and key != "train/loss"} for record in records]
    assert ran == [{"contrastive"}, {"text_alignment"}, {"contrastive"}, {"text_alignment"}]
    assert trainer.streams["captions"].batches_in_epoch == 2


# --------------------------------------------------------------------------- tower init and freezing


def test_text_tower_starts_from_a_clip_checkpoint_and_a_wrong_shape_is_named(tmp_path, demo):
    source = mmptm.create_model(TINY_CLIP, tokenizer=tokenizer())
    checkpoint = save_model(source, tmp_path / "source", TINY_CLIP)
    section = {**TINY_CLIP, "text": {**TINY_CLIP["text"], "init_from": checkpoint}}
    model = mmptm.create_model(section, tokenizer=tokenizer())
    model.init_towers()
    for name, value in source.text.state_dict().items():
        torch.testing.assert_close(model.text.state_dict()[name], value)
    assert not torch.equal(model.visual.proj, source.visual.proj)  # only the text tower is loaded

    wider = {**TINY_CLIP, "text": {**TINY_CLIP["text"], "width": 64, "init_from": checkpoint}}
    shapes = r"model\.text\.init_from=.*parameter 'ln_final\.bias' of its 'text' tower has shape \(32,\).* but \(64,\)"
    with pytest.raises(ValueError, match=shapes):
        mmptm.create_model(wider, tokenizer=tokenizer()).init_towers()
    with pytest.raises(ValueError, match=r"model\.text\.init_from=.*neither a checkpoint"):
        mmptm.create_model({**section, "text": {**section["text"], "init_from": str(tmp_path / "none")}},
                           tokenizer=tokenizer()).init_towers()


def test_a_multilingual_encoder_checkpoint_loads_under_a_new_projection(tmp_path, demo):
    encoder = {"name": "multilingual_encoder", "width": 32, "layers": 1, "heads": 2, "max_positions": 16,
               "language_embeddings": False}
    source = mmptm.create_model(encoder, tokenizer=tokenizer())
    checkpoint = save_model(source, tmp_path / "xlmr", encoder)
    text = {"name": "multilingual_text", "width": 32, "layers": 1, "heads": 2, "max_positions": 16,
            "init_from": checkpoint}
    model = mmptm.create_model({**TINY_CLIP, "text": text}, tokenizer=tokenizer())
    model.init_towers()
    for name, value in source.state_dict().items():
        torch.testing.assert_close(model.text.encoder.state_dict()[name], value)
    assert model.encode_text(tokenizer()(["sieben", "seven"])).shape == (2, 32)

    with_languages = {**encoder, "language_embeddings": True, "languages": ["en", "de"]}
    xlm = save_model(mmptm.create_model(with_languages, tokenizer=tokenizer()), tmp_path / "xlm", with_languages)
    with pytest.raises(ValueError, match="unexpected.*language_embedding.weight"):
        mmptm.create_model({**TINY_CLIP, "text": {**text, "init_from": xlm}}, tokenizer=tokenizer()).init_towers()


def test_tower_options_are_validated(tmp_path, demo):
    config = run_config(tmp_path)
    config["model"] = {**TINY_CLIP, "vision": {**TINY_CLIP["vision"], "unfreeze_at_step": 3}}
    with pytest.raises(ConfigError, match=r"model\.vision\.unfreeze_at_step' needs 'model\.vision\.frozen: true'"):
        load_config(config)
    config["model"] = {**TINY_CLIP, "vision": {**TINY_CLIP["vision"], "frozen": "maybe"}}
    with pytest.raises(ConfigError, match=r"model\.vision\.frozen"):
        load_config(config)


def test_lit_frozen_image_tower_unfreezes_on_schedule(tmp_path, demo):
    config = run_config(tmp_path)
    config["model"] = {**TINY_CLIP, "vision": {**TINY_CLIP["vision"], "frozen": True, "unfreeze_at_step": 2}}
    trainer = Trainer(load_config(config))
    model = trainer.model

    def snapshot(tower: torch.nn.Module) -> list[torch.Tensor]:
        return [p.detach().clone() for p in tower.parameters()]

    vision, text = snapshot(model.visual), snapshot(model.text)
    trainer._update_frozen_towers(0)
    trainer._train_step()
    assert all(torch.equal(a, b) for a, b in zip(vision, snapshot(model.visual), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(text, snapshot(model.text), strict=True))
    assert not model.visual.training and model.text.training

    trainer._update_frozen_towers(2)
    trainer._train_step()
    assert not all(torch.equal(a, b) for a, b in zip(vision, snapshot(model.visual), strict=True))
    assert model.visual.training


# --------------------------------------------------------------------------- M-CLIP distillation


def test_mclip_distillation_student_learns_the_frozen_teachers_embeddings(tmp_path, demo):
    torch.manual_seed(0)
    teacher = mmptm.create_model(TINY_CLIP, tokenizer=tokenizer())
    objective = MultilingualDistillation(teacher=save_model(teacher, tmp_path / "teacher", TINY_CLIP))
    student = mmptm.create_model(TINY_CLIP, tokenizer=tokenizer())
    pairs = NumberPairs(DataContext(tokenizer=tokenizer()), ["en", "fr", "de", "es"], max_number=31, batch_size=32,
                        epoch_samples=32)
    batch = next(iter(pairs))

    target = teacher.encode_text(tokenizer()(batch["src"]), normalize=True)
    translation = student.encode_text(batch["tgt_tokens"], normalize=True)
    source = student.encode_text(batch["src_tokens"], normalize=True)
    expected = (((translation - target) ** 2).sum(-1).mean() + ((source - target) ** 2).sum(-1).mean()) / 2
    first = objective(student, batch)
    torch.testing.assert_close(first["loss"], expected)

    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    for _ in range(60):
        optimizer.zero_grad()
        objective(student, batch)["loss"].backward()
        optimizer.step()
    last = objective(student, batch)
    assert last["loss"] < 0.2 * first["loss"] and last["cosine"] > 0.9
    assert all(not p.requires_grad for p in objective._teacher[0].parameters())
    assert list(objective.parameters()) == []  # nothing of the teacher is trained or checkpointed

    narrow = mmptm.create_model({**TINY_CLIP, "embed_dim": 16}, tokenizer=tokenizer())
    with pytest.raises(ValueError, match="teacher embeds into 32 dimensions, the student into 16"):
        objective(narrow, batch)


# --------------------------------------------------------------------------- data and misuse


def test_number_pairs_are_translations_with_distinct_numbers_per_batch(demo):
    from num2words import num2words

    context = DataContext(tokenizer=tokenizer(), seed=3)
    pairs = NumberPairs(context, ["en", "nl", "pl", "tr"], max_number=40, batch_size=41, epoch_samples=82)
    batches = list(pairs)
    assert len(batches) == 2
    for batch in batches:
        assert sorted(map(int, batch["key"])) == list(range(41))
        assert set(batch["src_lang"]) == {"en"} and "en" not in batch["tgt_lang"]
        for key, tgt, lang in zip(batch["key"], batch["tgt"], batch["tgt_lang"], strict=True):
            assert tgt == num2words(int(key), lang=lang)
        torch.testing.assert_close(batch["tgt_tokens"], tokenizer()(batch["tgt"]))
    assert [b["tgt"] for b in batches] == [b["tgt"] for b in NumberPairs(context, ["en", "nl", "pl", "tr"],
                                                                         max_number=40, batch_size=41,
                                                                         epoch_samples=82)]
    with pytest.raises(ValueError, match="no language 'xx'"):
        NumberPairs(context, ["en", "xx"])
    with pytest.raises(ValueError, match="at most the count of numbers"):
        NumberPairs(context, ["en", "fr"], max_number=9, batch_size=16)


def test_clpc_on_a_clip_model_points_to_text_alignment(demo):
    from mmptm.objectives.clpc import CrossLingualParaphraseClassification

    model = mmptm.create_model(TINY_CLIP, tokenizer=tokenizer())
    batch = next(iter(NumberPairs(DataContext(tokenizer=tokenizer()), ["en", "fr"], batch_size=4, epoch_samples=4)))
    with pytest.raises(ValueError, match="no multilingual encoder.*text_alignment"):
        CrossLingualParaphraseClassification(mode="dual")(model, batch)


def test_bundled_mclip_configs_validate_and_the_tiny_one_trains(tmp_path, demo):
    for name in ("mclip_base.yaml", "mclip_tiny_noparallel.yaml"):
        load_config(name)
    config = load_config("mclip_tiny.yaml", [
        "train.max_steps=2", "train.log_every=1", "train.progress_bar=false", "train.tensorboard=false",
        f"train.output_dir={tmp_path / 'run'}", "data.captions.batch_size=8", "data.captions.num_workers=0",
        "data.captions.shuffle_buffer=0", "data.parallel.batch_size=8", "eval.zeroshot.languages=[en,fr,nl]",
        "eval.zeroshot.num_workers=0",
    ])
    metrics = Trainer(config).fit()
    assert {"eval/zeroshot_top1/en", "eval/zeroshot_top1/fr", "eval/zeroshot_top1/nl"} <= set(metrics)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train/contrastive/loss", "train/text_alignment/loss", "train/text_alignment/acc"} <= set(first)
