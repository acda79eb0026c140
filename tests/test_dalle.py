"""The DALL-E token decoder: padding and positions, causal masking, loss weights, KV-cache sampling, generate CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import mmptm
from mmptm.cli import main
from mmptm.data_pipelines.tokenizer import pack_rows
from mmptm.encoders.dalle import TokenDecoder
from mmptm.encoders.dvae import DiscreteVAE
from mmptm.generation.pipeline import GenerationError, tokenize_prompts
from mmptm.generation.sampling import (
    SamplingOptions,
    next_image_logits,
    sample_image_tokens,
    top_k_filter,
    top_p_filter,
)
from mmptm.objectives.text_to_image import TextToImageLM, drop_captions
from mmptm.training.checkpoint import save_weights

VOCAB, PAD, TEXT_LENGTH, CODEBOOK, GRID = 20, 0, 6, 16, 3


def tiny_decoder(seed: int = 0, **options) -> TokenDecoder:
    """A decoder of precomputed tokens (no image tokenizer), small enough for exhaustive checks."""
    torch.manual_seed(seed)
    settings = {"codebook_size": CODEBOOK, "grid_size": GRID, "text_length": TEXT_LENGTH, "width": 32,
                "layers": 2, "heads": 2, "vocab_size": VOCAB, "pad_id": PAD, **options}
    return TokenDecoder(**settings).eval()


def captions() -> torch.Tensor:
    return torch.tensor([[2, 5, 6, 3, PAD, PAD], [2, 7, 3, PAD, PAD, PAD]])


# --------------------------------------------------------------------------- inputs


def test_padding_becomes_one_learned_token_per_text_position():
    model = tiny_decoder()
    ids = model.text_ids(torch.tensor([[2, 5, 3, PAD], [2, 3, PAD, PAD]]))  # shorter rows are padded
    assert ids.tolist() == [[2, 5, 3, VOCAB + 3, VOCAB + 4, VOCAB + 5], [2, 3, VOCAB + 2, VOCAB + 3, VOCAB + 4,
                                                                         VOCAB + 5]]
    embedded = model.embed_text(ids)
    expected = model.text_embedding.weight[VOCAB + 3] + model.text_position_embedding[3]
    torch.testing.assert_close(embedded[0, 3], expected)
    # The same pad id at two positions reads two different learned tokens.
    assert not torch.allclose(model.text_embedding.weight[VOCAB + 3], model.text_embedding.weight[VOCAB + 4])
    null = model.text_ids(model.null_text(2))
    assert null.tolist() == [list(range(VOCAB, VOCAB + TEXT_LENGTH))] * 2


def test_text_ids_refuse_rows_too_long_or_outside_the_vocabulary():
    model = tiny_decoder()
    with pytest.raises(ValueError, match="at most model.text_length=6"):
        model.text_ids(torch.ones(1, TEXT_LENGTH + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="not the one the model was built for"):
        model.text_ids(torch.tensor([[2, VOCAB, 3]]))


class BangTokenizer:
    """Words -> ids, with "!" -> the pad id as in CLIP's BPE; rows packed as every mmptm tokenizer packs them."""

    vocab_size, pad_id, bos_id, eos_id = VOCAB, PAD, 2, 3

    def __call__(self, texts: list[str], context_length: int) -> torch.Tensor:
        words = [[PAD if word == "!" else 4 + len(word) for word in text.split()] for text in texts]
        return pack_rows(words, context_length, self.bos_id, self.eos_id, self.pad_id)


def test_a_pad_id_before_the_end_of_text_is_a_word_of_the_caption():
    section = {"name": "dalle", "codebook_size": CODEBOOK, "grid_size": GRID, "text_length": TEXT_LENGTH,
               "width": 32, "layers": 1, "heads": 2}
    model = mmptm.create_model(section, tokenizer=BangTokenizer()).eval()
    assert model.eot_id == 3  # filled in from the tokenizer, as vocab_size and pad_id
    text = tokenize_prompts(model, BangTokenizer(), ["a ! bc d"])  # fits exactly: bos, 4 words, eos
    assert text.tolist() == [[2, 5, PAD, 6, 5, 3]]
    assert model.text_ids(text).tolist() == [[2, 5, PAD, 6, 5, 3]]
    assert model.text_ids(text[:, :4]).tolist() == [[2, 5, VOCAB + 2, 6, VOCAB + 4, VOCAB + 5]]  # no eos: all padding
    rows = torch.tensor([[2, 5, PAD, 3, PAD, PAD]])
    assert model.text_ids(rows).tolist() == [[2, 5, PAD, 3, VOCAB + 4, VOCAB + 5]]
    # The empty caption has no end-of-text token: all padding. Without eot_id every pad id is padding.
    assert model.text_ids(model.null_text(1)).tolist() == [list(range(VOCAB, VOCAB + TEXT_LENGTH))]
    assert tiny_decoder().text_ids(rows).tolist() == [[2, 5, VOCAB + 2, 3, VOCAB + 4, VOCAB + 5]]
    # Training's text targets read the caption as sampling does.
    image = torch.randint(0, CODEBOOK, (1, GRID * GRID))
    with torch.no_grad():
        assert torch.equal(model(rows, image).text_ids, model.text_ids(rows))


def test_caption_dropout_refuses_rows_longer_than_the_model_reads():
    model = tiny_decoder().train()
    too_long = torch.tensor([[2, 5, 6, 7, 8, 9, 10, 3]])
    with pytest.raises(ValueError, match="at most model.text_length=6"):
        drop_captions(model, too_long, 0.5)
    with pytest.raises(ValueError, match="at most model.text_length=6"):
        TextToImageLM(text_dropout=0.1).train()(model, {"text": too_long,
                                                        "image_tokens": torch.zeros(1, GRID * GRID, dtype=torch.long)})


@settings(max_examples=25, deadline=None)
@given(start=st.integers(0, GRID * GRID - 1), data=st.data())
def test_image_positions_are_row_and_column_embeddings(start, data):
    model = tiny_decoder()
    length = data.draw(st.integers(1, GRID * GRID - start))
    tokens = torch.randint(0, CODEBOOK, (2, length))
    embedded = model.embed_image(tokens, start)
    for i in range(length):
        row, column = divmod(start + i, GRID)
        expected = (model.image_embedding.weight[tokens[:, i]] + model.image_row_embedding[row]
                    + model.image_column_embedding[column])
        torch.testing.assert_close(embedded[:, i], expected)


# --------------------------------------------------------------------------- the transformer


@pytest.mark.parametrize("changed", [("text", 3), ("image", 0), ("image", 4), ("image", GRID * GRID - 2)])
def test_changing_a_later_token_leaves_every_earlier_prediction_unchanged(changed):
    model = tiny_decoder()
    text, image = captions(), torch.randint(0, CODEBOOK, (2, GRID * GRID), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(text, image)
        kind, position = changed
        if kind == "text":
            text = text.clone()
            text[:, position] = 9
        else:
            image = image.clone()
            image[:, position] = (image[:, position] + 1) % CODEBOOK
        after = model(text, image)
    # Logits at sequence position p predict p + 1 and read positions <= p.
    changed_at = position if kind == "text" else TEXT_LENGTH + position
    earlier_text = min(changed_at, TEXT_LENGTH - 1)
    torch.testing.assert_close(after.text_logits[:, :earlier_text], before.text_logits[:, :earlier_text])
    earlier_image = max(changed_at - (TEXT_LENGTH - 1), 0)
    torch.testing.assert_close(after.image_logits[:, :earlier_image], before.image_logits[:, :earlier_image])
    assert not torch.allclose(after.image_logits[:, earlier_image:], before.image_logits[:, earlier_image:])


def test_loss_weights_text_one_eighth_and_image_seven_eighths():
    model = tiny_decoder()
    image = torch.randint(0, CODEBOOK, (2, GRID * GRID))
    out = TextToImageLM()(model, {"text": captions(), "image_tokens": image})
    torch.testing.assert_close(out["loss"], out["text_loss"] / 8 + 7 * out["image_loss"] / 8)
    logits = model(captions(), image)
    text_ce = torch.nn.functional.cross_entropy(logits.text_logits.flatten(0, 1), logits.text_ids[:, 1:].flatten())
    image_ce = torch.nn.functional.cross_entropy(logits.image_logits.flatten(0, 1), image.flatten())
    torch.testing.assert_close(out["text_loss"], text_ce)
    torch.testing.assert_close(out["image_loss"], image_ce)
    text_only = TextToImageLM(text_weight=1.0, image_weight=0.0)(model, {"text": captions(), "image_tokens": image})
    torch.testing.assert_close(text_only["loss"], text_ce)


def test_caption_dropout_replaces_rows_by_the_empty_caption_and_leaves_them_out_of_the_text_loss():
    model = tiny_decoder()
    torch.manual_seed(0)
    text = captions().repeat(1000, 1)
    dropped_text, dropped = drop_captions(model, text, 0.3)
    assert 0.25 < dropped.float().mean() < 0.35
    assert (dropped_text[dropped] == PAD).all()
    assert torch.equal(dropped_text[~dropped], text[~dropped])

    objective = TextToImageLM(text_dropout=0.5)
    image = torch.randint(0, CODEBOOK, (2, GRID * GRID))
    torch.manual_seed(0)  # draws (dropped, kept) for the two rows
    out = objective(model, {"text": captions(), "image_tokens": image})
    torch.manual_seed(0)
    _, mask = drop_captions(model, captions(), 0.5)
    assert mask.tolist() == [True, False]
    kept_only = TextToImageLM()(model, {"text": captions()[1:], "image_tokens": image[1:]})
    torch.testing.assert_close(out["text_loss"], kept_only["text_loss"])
    objective.eval()  # no dropout outside training
    torch.testing.assert_close(objective(model, {"text": captions(), "image_tokens": image})["loss"],
                               TextToImageLM()(model, {"text": captions(), "image_tokens": image})["loss"])


def test_the_decoder_learns_text_conditioned_image_tokens():
    model = tiny_decoder(layers=1).train()
    objective = TextToImageLM()
    text = captions()
    image = torch.randint(0, CODEBOOK, (2, GRID * GRID), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        out = objective(model, {"text": text, "image_tokens": image})
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out["image_loss"].item())
    assert losses[0] > 0.9 * math.log(CODEBOOK)
    assert losses[-1] < 0.2, losses  # each caption's image memorised
    model.eval()
    sampled = sample_image_tokens(model, text, SamplingOptions(temperature=0))
    assert torch.equal(sampled, image)


# --------------------------------------------------------------------------- sampling


def test_top_k_and_top_p_filter_fixed_logits():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    inf = float("-inf")
    assert top_k_filter(logits, 2).tolist() == [[3.0, inf, 2.0, inf], [inf, inf, 5.0, 1.0]]
    assert torch.equal(top_k_filter(logits, 4), logits)
    probs = torch.tensor([[0.5, 0.1, 0.3, 0.1]]).log()  # sorted: 0.5, 0.3, 0.1, 0.1
    kept = lambda p: torch.isfinite(top_p_filter(probs, p))[0].tolist()  # noqa: E731
    assert kept(0.45) == [True, False, False, False]
    assert kept(0.6) == [True, False, True, False]
    assert kept(0.75) == [True, False, True, False]
    assert kept(0.85) in ([True, True, True, False], [True, False, True, True])  # one of the tied 0.1s
    assert kept(0.95) == [True] * 4
    assert kept(1.0) == [True] * 4
    assert kept(0.01) == [True, False, False, False]  # the most likely token always stays


@pytest.mark.parametrize(
    "options",
    [SamplingOptions(), SamplingOptions(temperature=0.7, top_k=5, top_p=0.9), SamplingOptions(guidance_scale=3.0)],
)
def test_cached_sampling_gives_exactly_the_tokens_of_full_recomputation(options):
    model = tiny_decoder()
    cached = sample_image_tokens(model, captions(), options, torch.Generator().manual_seed(5))
    full = sample_image_tokens(model, captions(), options, torch.Generator().manual_seed(5), use_cache=False)
    assert torch.equal(cached, full)
    assert cached.shape == (2, GRID * GRID) and 0 <= cached.min() and cached.max() < CODEBOOK
    # ... because every step's logits agree.
    text_ids, cache = model.text_ids(captions()), model.new_cache(2)
    with torch.no_grad():
        for n in range(GRID * GRID):
            torch.testing.assert_close(
                next_image_logits(model, text_ids, cached[:, :n], cache),
                next_image_logits(model, text_ids, cached[:, :n], None),
                rtol=1e-5, atol=1e-5,
            )


def test_sampling_is_reproducible_for_a_seed():
    model = tiny_decoder()
    text = captions().repeat(4, 1)
    first = sample_image_tokens(model, text, generator=torch.Generator().manual_seed(11))
    again = sample_image_tokens(model, text, generator=torch.Generator().manual_seed(11))
    other = sample_image_tokens(model, text, generator=torch.Generator().manual_seed(12))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert len({tuple(row) for row in first.tolist()}) > 1  # a batch of the same caption gives different images


def test_guidance_scale_one_equals_plain_conditional_sampling():
    model = tiny_decoder()
    plain = sample_image_tokens(model, captions(), generator=torch.Generator().manual_seed(2))
    guided = sample_image_tokens(model, captions(), SamplingOptions(guidance_scale=1.0),
                                 torch.Generator().manual_seed(2))
    assert torch.equal(plain, guided)


# --------------------------------------------------------------------------- checkpoints and the generate command


def write_checkpoint(directory, model: torch.nn.Module, model_section: dict, tokenizer_path: str, length: int):
    directory.mkdir(parents=True)
    config = {"model": model_section, "tokenizer": {"path": tokenizer_path, "context_length": length}}
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    save_weights(model, directory / "model.safetensors")
    (directory / "tokenizer.model").write_bytes(open(tokenizer_path, "rb").read())
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, demo):
    """A tiny dVAE, a token decoder reading it (captions in en and fr) and a tiny CLIP, as checkpoint folders."""
    root = tmp_path_factory.mktemp("dalle")
    tokenizer = str(demo.tokenizer)
    torch.manual_seed(0)
    dvae_section = {"name": "dvae", "image_size": 32, "num_downsamples": 2, "hidden": 4, "codebook_size": 16}
    dvae = write_checkpoint(root / "dvae", mmptm.create_model(dvae_section), dvae_section, tokenizer, 16)
    decoder_section = {"name": "dalle", "dvae": str(dvae), "text_length": 16, "width": 32, "layers": 1, "heads": 2,
                       "languages": ["en", "fr"]}
    tok = mmptm.load_pretrained(dvae).tokenizer
    decoder = write_checkpoint(root / "dalle", mmptm.create_model(decoder_section, tokenizer=tok), decoder_section,
                               tokenizer, 16)
    # The same architecture built for a 500-id tokenizer, stored with the 1000-id demo tokenizer.
    mismatched_tokenizer = type("Tok", (), {"vocab_size": 500, "pad_id": 0, "eos_id": 3})()
    mismatch = write_checkpoint(root / "mismatch", mmptm.create_model(decoder_section, tokenizer=mismatched_tokenizer),
                                decoder_section, tokenizer, 16)
    clip_section = {"name": "clip", "embed_dim": 16,
                    "vision": {"name": "vit", "image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
                    "text": {"name": "text_transformer", "context_length": 16, "width": 32, "layers": 1, "heads": 2}}
    clip = write_checkpoint(root / "clip", mmptm.create_model(clip_section, tokenizer=tok), clip_section, tokenizer, 16)
    return {"dvae": dvae, "dalle": decoder, "mismatch": mismatch, "clip": clip}


def test_loaded_decoder_tokenises_images_with_its_frozen_dvae(checkpoints):
    model, tokenizer, preprocess = mmptm.load_pretrained(checkpoints["dalle"])
    assert isinstance(model, TokenDecoder) and isinstance(model.dvae, DiscreteVAE)
    assert (model.codebook_size, model.grid_size, model.vocab_size) == (16, 8, tokenizer.vocab_size)
    assert not any(p.requires_grad for p in model.dvae.parameters())
    model.train()
    assert model.training and not model.dvae.training
    image = preprocess(Image.new("RGB", (32, 32), "white"))[None]
    assert float(image.min()) == 1.0  # the dVAE's [0, 1] pixels, not CLIP's normalisation
    tokens = model.encode_images(image)
    assert torch.equal(tokens, model.dvae.encode_tokens(image)) and tokens.shape == (1, 64)
    out = TextToImageLM()(model, {"text": tokenizer(["a handwritten seven."]), "image": image})
    assert torch.isfinite(out["loss"])
    with pytest.raises(GenerationError, match="longer than the 16 caption tokens"):
        tokenize_prompts(model, tokenizer, ["a handwritten seven. " * 10])


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["generate", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_writes_a_grid_and_the_reranked_images(checkpoints, tmp_path, capsys):
    code, out, err = run(capsys, "--checkpoint", checkpoints["dalle"], "--prompt", "a handwritten seven.",
                         "--lang", "en", "--num", 5, "--out", tmp_path / "grid.png", "--out-dir", tmp_path / "best",
                         "--rerank", checkpoints["clip"], "--keep", 3, "--seed", 1, "--top-k", 8)
    assert code == 0, err
    result = json.loads(out)
    assert (result["num_generated"], result["num_kept"]) == (5, 3)
    assert result["clip_scores"] == sorted(result["clip_scores"], reverse=True)
    assert Image.open(tmp_path / "grid.png").size == (2 + 2 * 34, 2 + 2 * 34)  # 2x2 cells of 32 px, 2 px gutters
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["000.png", "001.png", "002.png"]
    assert Image.open(tmp_path / "best" / "000.png").size == (32, 32)
    # The same seed gives the same images.
    run(capsys, "--checkpoint", checkpoints["dalle"], "--prompt", "a handwritten seven.", "--num", 5,
        "--out", tmp_path / "again.png", "--rerank", checkpoints["clip"], "--keep", 3, "--seed", 1, "--top-k", 8)
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "grid.png").read_bytes()


def test_generate_evaluate_reports_the_clip_accuracy_of_class_prompts(checkpoints, tmp_path, capsys):
    code, out, err = run(capsys, "--checkpoint", checkpoints["dalle"], "--evaluate", checkpoints["clip"],
                         "--num", 2, "--out", tmp_path / "eval.png")
    assert code == 0, err
    result = json.loads(out)
    assert result["eval/gen_num_images"] == 2 * 10 * 2  # the model's two languages x ten digits x 2 samples
    assert result["prompts"][:2] == ["a handwritten zero.", "a handwritten one."]
    assert result["prompts"][10] == "le chiffre zéro écrit à la main."
    for key in ("eval/gen_clip_acc", "eval/gen_clip_acc_reranked", "eval/gen_clip_acc/fr"):
        assert 0 <= result[key] <= 1
    assert Image.open(tmp_path / "eval.png").size == (2 + 10 * 34, 2 + 2 * 34)  # a row of ten per language


@pytest.mark.parametrize(
    ("which", "args", "message"),
    [
        ("dalle", ["--prompt", "  "], "the prompt is empty"),
        ("dalle", ["--prompt", "a handwritten one.", "--lang", "xx"], "unknown language 'xx'; this model was "
                                                                      "trained on captions in: en, fr"),
        ("dalle", ["--evaluate", "CLIP", "--lang", "en,de"], "unknown language 'de'"),
        ("mismatch", ["--prompt", "a handwritten one."], "tokenizer stored with it must be the one"),
        ("clip", ["--prompt", "a handwritten one."], "holds a CLIP model; generating images needs a token decoder"),
        ("missing", ["--prompt", "a handwritten one."], "neither a checkpoint"),
        ("dalle", ["--prompt", "a handwritten one.", "--rerank", "DVAE"], "holds a DiscreteVAE model; reranking"),
        ("dalle", ["--prompt", "a handwritten one.", "--keep", "2"], "--keep needs --rerank"),
        ("dalle", ["--prompt", "a handwritten one.", "--top-p", "1.5"], "top_p must be in"),
    ],
)
def test_generate_fails_clearly_on_bad_input(checkpoints, tmp_path, capsys, which, args, message):
    path = checkpoints.get(which, tmp_path / "nothing-here")
    args = [str(checkpoints["clip"]) if a == "CLIP" else str(checkpoints["dvae"]) if a == "DVAE" else a for a in args]
    code, out, err = run(capsys, "--checkpoint", path, *args, "--out", tmp_path / "x.png", "--num", 1)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert out == "" and not (tmp_path / "x.png").exists()


def test_dalle_configs_train_a_step_with_a_dvae(checkpoints, tmp_path):
    for name in ("dalle_tiny.yaml", "dalle_base.yaml"):
        overrides = [f"model.dvae={checkpoints['dvae']}", "train.max_steps=2", "data.train.batch_size=4",
                     "data.train.num_workers=0", "train.progress_bar=false", "train.log_every=1"]
        mmptm.train(mmptm.load_config(name, overrides), output_dir=tmp_path / name)
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
        assert {"train/dalle/text_loss", "train/dalle/image_loss"} <= set(records[-1])
        model = mmptm.load_pretrained(tmp_path / name).model
        assert isinstance(model, TokenDecoder) and model.grid_size == 8
    # The checkpoint holds the image tokenizer: it loads without the tokenizer's folder.
    saved = yaml.safe_load(next((tmp_path / name / "checkpoints").glob("step_*/config.yaml")).read_text())
    assert saved["model"]["dvae"]["name"] == "dvae"
    moved = tmp_path / "dvae_moved"
    checkpoints["dvae"].rename(moved)
    try:
        again = mmptm.load_pretrained(tmp_path / name).model
    finally:
        moved.rename(checkpoints["dvae"])
    tokens = torch.randint(0, model.codebook_size, (1, model.num_image_tokens))
    assert torch.equal(again.decode_images(tokens), model.decode_images(tokens))


def test_fsdp_is_refused_before_training_naming_ddp(checkpoints, tmp_path):
    from mmptm.config import ConfigError
    from mmptm.training.sharding import shard_model

    message = r"distributed.strategy=fsdp cannot train a TokenDecoder model: .*use distributed.strategy=ddp"
    with pytest.raises(ConfigError, match=message):
        shard_model(tiny_decoder(), "fp32")  # refused before anything is sharded: no process group needed
    overrides = [f"model.dvae={checkpoints['dvae']}", "train.max_steps=1", "data.train.num_workers=0",
                 "train.progress_bar=false", "distributed.strategy=fsdp"]
    with pytest.raises(ConfigError, match=message):  # a single process too, before the first step
        mmptm.train(mmptm.load_config("dalle_tiny.yaml", overrides), output_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_dalle_trains_on_precomputed_token_shards(checkpoints, tmp_path):
    from mmptm.config import resolve_config_path
    from mmptm.data_pipelines.image_tokens import tokenize_image_shards

    tokenize_image_shards(checkpoints["dvae"], "demo:val", tmp_path / "tokens", num_workers=0)
    config = yaml.safe_load(resolve_config_path("dalle_tiny.yaml").read_text())
    config["data"]["train"] = {"name": "image_tokens", "shards": str(tmp_path / "tokens"), "batch_size": 4,
                               "num_workers": 0, "caption_languages": ["en", "fr"]}
    overrides = [f"model.dvae={checkpoints['dvae']}", "train.max_steps=2", "train.progress_bar=false",
                 "train.log_every=1", "model.width=32", "model.layers=1", "model.heads=2"]
    mmptm.train(mmptm.load_config(config, overrides), output_dir=tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/dalle/image_loss" in r] == [1, 2]
