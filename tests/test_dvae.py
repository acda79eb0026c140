"""Discrete image tokenizers (dVAE, VQ-VAE): relaxation, schedules, losses, codebook, training, token shards."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmptm
from mmptm.cli import main
from mmptm.data_pipelines.context import DataContext, model_data_context
from mmptm.data_pipelines.demo import resolve
from mmptm.data_pipelines.streams import resolve_shards
from mmptm.encoders.dvae import EMACodebook, codebook_statistics, gumbel_softmax, logit_laplace_nll
from mmptm.evaluation import EvalContext
from mmptm.evaluation.image_tokens import dvae_reconstruction
from mmptm.objectives.image_tokens import ImageTokenizerLoss, anneal
from mmptm.registry import DATASETS, build

TINY_MODEL = {"hidden": 8, "num_downsamples": 2, "codebook_size": 32}
# A small run of dvae_tiny.yaml: its data and schedules, a smaller model and batch.
TINY_RUN = [
    "model.hidden=8",
    "model.codebook_size=64",
    "data.train.batch_size=16",
    "data.train.num_workers=0",
    "data.train.shuffle_buffer=64",
    "train.lr=2e-2",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.progress_bar=false",
    "train.tensorboard=false",
    "eval.tasks.0.batch_size=128",
]


def read_metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- Gumbel-softmax


@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0])
def test_gumbel_softmax_samples_lie_on_the_simplex(temperature):
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 3
    samples = gumbel_softmax(logits, temperature)
    assert (samples >= 0).all()
    torch.testing.assert_close(samples.sum(-1), torch.ones(64))
    # Channel-first layout (the encoder's [B, K, h, w] logits) relaxes along dim 1.
    grid = gumbel_softmax(torch.randn(2, 10, 3, 3), temperature, dim=1)
    torch.testing.assert_close(grid.sum(1), torch.ones(2, 3, 3))


def test_gumbel_softmax_becomes_the_one_hot_argmax_as_the_temperature_falls():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(200, 8, generator=generator)
    gumbels = -torch.empty(200, 8).exponential_(generator=generator).log()
    target = F.one_hot((logits + gumbels).argmax(-1), 8).float()
    gaps = [(gumbel_softmax(logits, t, gumbels=gumbels) - target).abs().max() for t in (1.0, 0.1, 1e-3)]
    assert gaps[0] > gaps[1] > gaps[2]
    assert torch.equal(gumbel_softmax(logits, 1e-3, gumbels=gumbels).argmax(-1), target.argmax(-1))
    limit = gumbel_softmax(logits.double(), 1e-7, gumbels=gumbels.double())
    torch.testing.assert_close(limit, target.double(), atol=1e-6, rtol=0)
    # Without noise the limit is the argmax of the logits; drawn noise samples every category.
    zero = torch.zeros_like(logits)
    assert torch.equal(gumbel_softmax(logits, 1e-4, gumbels=zero).argmax(-1), logits.argmax(-1))
    drawn = gumbel_softmax(torch.zeros(4000, 4), 1.0, straight_through=True).argmax(-1)
    assert torch.bincount(drawn, minlength=4).min() > 800  # uniform logits: about 1000 each


def test_straight_through_is_one_hot_forward_with_the_relaxed_gradient():
    logits = torch.randn(5, 6, requires_grad=True)
    gumbels = -torch.empty(5, 6).exponential_().log()
    weights = torch.randn(5, 6)
    hard = gumbel_softmax(logits, 0.5, straight_through=True, gumbels=gumbels)
    assert set(hard.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(hard.sum(-1), torch.ones(5))
    (hard * weights).sum().backward()
    straight_grad = logits.grad.clone()
    logits.grad = None
    (gumbel_softmax(logits, 0.5, gumbels=gumbels) * weights).sum().backward()
    assert straight_grad.abs().sum() > 0
    torch.testing.assert_close(straight_grad, logits.grad)
    with pytest.raises(ValueError, match="temperature"):
        gumbel_softmax(logits, 0.0)


# --------------------------------------------------------------------------- schedules


def test_annealing_schedules_at_given_steps():
    # DALL-E: temperature 1 -> 1/16 over 150,000 updates, cosine.
    assert anneal(0, 1.0, 1 / 16, 150_000, "cosine") == 1.0
    assert anneal(75_000, 1.0, 1 / 16, 150_000, "cosine") == pytest.approx((1 + 1 / 16) / 2)
    quarter = 1 / 16 + (15 / 16) * (1 + math.sqrt(0.5)) / 2
    assert anneal(37_500, 1.0, 1 / 16, 150_000, "cosine") == pytest.approx(quarter)
    assert anneal(150_000, 1.0, 1 / 16, 150_000, "cosine") == pytest.approx(1 / 16)
    assert anneal(10**9, 1.0, 1 / 16, 150_000, "cosine") == pytest.approx(1 / 16)
    # Exponential: geometric interpolation, the geometric mean half way.
    assert anneal(50, 1.0, 1 / 16, 100, "exponential") == pytest.approx(0.25)
    assert anneal(25, 1.0, 1 / 16, 100, "exponential") == pytest.approx(0.5)
    assert anneal(30, 2.0, 5.0, 100, "linear") == pytest.approx(2.9)
    assert anneal(3, 2.0, 5.0, 0, "linear") == 5.0
    with pytest.raises(ValueError, match="positive"):
        anneal(1, 0.0, 6.6, 10, "exponential")


def test_kl_weight_and_temperature_of_the_objective_follow_their_schedules():
    objective = ImageTokenizerLoss()  # the paper's values
    assert objective.kl_weight_at(0) == 0.0
    assert objective.kl_weight_at(2500) == pytest.approx(3.3)
    assert objective.kl_weight_at(5000) == pytest.approx(6.6)
    assert objective.kl_weight_at(20_000) == pytest.approx(6.6)
    assert objective.temperature(150_000) == pytest.approx(1 / 16)
    linear = ImageTokenizerLoss(kl_weight=2.0, kl_warmup_steps=10, kl_schedule="linear",
                                temperature_schedule="exponential", temperature_steps=10)
    assert linear.kl_weight_at(3) == pytest.approx(0.6)
    assert linear.temperature(5) == pytest.approx(0.25)


# --------------------------------------------------------------------------- losses and codebook


def test_logit_laplace_nll_matches_the_density_formula():
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(1000, generator=generator)
    pixels[:2] = torch.tensor([0.0, 1.0])  # the ends are finite after the eps mapping
    mu, log_scale = torch.randn(1000, generator=generator), torch.randn(1000, generator=generator) * 0.5
    eps = 0.1
    y = (1 - 2 * eps) * pixels + eps
    laplace = torch.distributions.Laplace(mu, log_scale.exp())
    # f(y) = Laplace(logit(y); mu, b) * d logit(y) / dy, with d logit(y) / dy = 1 / (y (1 - y)).
    expected = -(laplace.log_prob(torch.log(y / (1 - y))) - torch.log(y * (1 - y)))
    actual = logit_laplace_nll(pixels, mu, log_scale, eps)
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # A density on (0, 1): it integrates to 1.
    grid = torch.linspace(1e-5, 1 - 1e-5, 200_001, dtype=torch.float64)
    density = torch.exp(-logit_laplace_nll((grid - eps) / (1 - 2 * eps), torch.tensor(0.3, dtype=torch.float64),
                                           torch.tensor(-0.5, dtype=torch.float64), eps))
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-3)


def test_vq_ema_update_matches_a_hand_computation():
    codebook = EMACodebook(2, 2, decay=0.5, dead_code_threshold=0.0, eps=0.0)
    codebook.embedding.copy_(torch.tensor([[0.0, 0.0], [4.0, 0.0]]))
    codebook.cluster_size.copy_(torch.tensor([1.0, 1.0]))
    codebook.embed_sum.copy_(torch.tensor([[0.0, 0.0], [4.0, 0.0]]))
    vectors = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 2.0], [0.0, 1.0]])
    indices = codebook.nearest(vectors)
    assert indices.tolist() == [0, 1, 1, 0]
    assert codebook.update(vectors, indices) == 0
    # N = 0.5 * [1, 1] + 0.5 * [2, 2] = [1.5, 1.5]; m0 = 0.5 * (0, 0) + 0.5 * (1, 1) = (0.5, 0.5);
    # m1 = 0.5 * (4, 0) + 0.5 * (8, 2) = (6, 1); e = m / N (no smoothing with eps = 0).
    torch.testing.assert_close(codebook.cluster_size, torch.tensor([1.5, 1.5]))
    torch.testing.assert_close(codebook.embed_sum, torch.tensor([[0.5, 0.5], [6.0, 1.0]]))
    torch.testing.assert_close(codebook.embedding, torch.tensor([[1 / 3, 1 / 3], [4.0, 2 / 3]]))


def test_dead_code_restart_replaces_the_unused_entries_with_batch_vectors():
    torch.manual_seed(0)
    codebook = EMACodebook(4, 3, decay=0.9, dead_code_threshold=1.0, eps=1e-5)
    codebook.embedding.copy_(torch.tensor([[0.0, 0, 0], [50, 50, 50], [-50, 50, 0], [50, -50, 0]]))
    used_before = codebook.embedding[0].clone()
    vectors = torch.randn(16, 3) * 0.1 + 1.0  # all nearest to entry 0
    indices = codebook.nearest(vectors)
    assert indices.eq(0).all()
    assert codebook.update(vectors, indices) == 3
    # Entries 1-3 (EMA count 0.9 < 1) now sit on distinct batch vectors, with count 1.
    for entry in (1, 2, 3):
        assert (codebook.embedding[entry] == vectors).all(-1).sum() == 1
    assert codebook.embedding[1:].unique(dim=0).shape[0] == 3
    torch.testing.assert_close(codebook.cluster_size[1:], torch.ones(3))
    torch.testing.assert_close(codebook.embed_sum[1:], codebook.embedding[1:])
    # The used entry moved towards its vectors by EMA, not restarted.
    assert codebook.cluster_size[0] > 1
    assert not torch.equal(codebook.embedding[0], used_before)
    # The batch now spreads over the restarted entries.
    assert {1, 2, 3} <= set(codebook.nearest(vectors).tolist())


def _ema_codebook_in_rank(rank: int, world_size: int, init_file: str, results_dir: str) -> None:
    """One rank: an EMA update with its half of the vectors (with a restart), saved for the parent to compare."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(rank)  # different restart draws per rank: the broadcast must make them agree
        codebook = _two_cluster_codebook()
        vectors = _two_cluster_vectors()[rank::world_size]
        restarted = codebook.update(vectors, codebook.nearest(vectors))
        torch.save({"state": codebook.state_dict(), "restarted": restarted}, f"{results_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _two_cluster_codebook() -> EMACodebook:
    codebook = EMACodebook(3, 2, decay=0.8, dead_code_threshold=0.9, eps=1e-5)
    codebook.embedding.copy_(torch.tensor([[0.0, 0.0], [5.0, 5.0], [-99.0, 99.0]]))
    codebook.embed_sum.copy_(codebook.embedding)
    return codebook


def _two_cluster_vectors() -> torch.Tensor:
    return torch.cat([torch.randn(6, 2, generator=torch.Generator().manual_seed(0)) * 0.1 + c for c in (0.0, 5.0)])


def test_ema_statistics_are_all_reduced_across_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ema_codebook_in_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _two_cluster_codebook()
    vectors = _two_cluster_vectors()
    assert single.update(vectors, single.nearest(vectors)) == 1 == ranks[0]["restarted"] == ranks[1]["restarted"]
    for name in ("cluster_size", "embed_sum", "embedding"):
        # Every rank holds the same codebook; the used entries are those of one process on the whole batch.
        torch.testing.assert_close(ranks[0]["state"][name], ranks[1]["state"][name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["state"][name][:2], getattr(single, name)[:2])


def test_codebook_statistics():
    perplexity, usage = codebook_statistics(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 8)
    assert perplexity.item() == pytest.approx(4.0) and usage.item() == 0.5
    perplexity, usage = codebook_statistics(torch.zeros(10, dtype=torch.long), 8)
    assert perplexity.item() == pytest.approx(1.0) and usage.item() == 1 / 8


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", ["dvae", "vqvae"])
@pytest.mark.parametrize("reconstruction", ["logit_laplace", "mse"])
def test_encode_decode_shapes_and_pixel_range(name, reconstruction):
    model = mmptm.create_model(name, **TINY_MODEL, reconstruction=reconstruction)
    assert (model.codebook_size, model.grid_size, model.image_size) == (32, 8, 32)
    images = torch.rand(3, 3, 32, 32)
    tokens = model.encode_tokens(images)
    assert tokens.shape == (3, 64) and tokens.dtype == torch.long
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 32
    with torch.no_grad():
        decoded = model.decode_tokens(tokens)
    assert decoded.shape == (3, 3, 32, 32)
    assert 0 <= float(decoded.min()) and float(decoded.max()) <= 1
    # Out-of-range decoder outputs are mapped into [0, 1] too.
    random_tokens = torch.randint(32, (2, 64))
    with torch.no_grad():
        for module in model.decoder.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.bias.fill_(5.0)
        saturated = model.decode_tokens(random_tokens)
    assert 0 <= float(saturated.min()) and float(saturated.max()) <= 1
    # The eval forward uses the same hard tokens.
    model.eval()
    out = model(images)
    assert torch.equal(out.tokens, tokens)
    with pytest.raises(ValueError, match="64"):
        model.decode_tokens(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model.decode_tokens(torch.full((1, 64), 32))
    with pytest.raises(ValueError, match="32, 32"):
        model.encode_tokens(torch.rand(1, 3, 16, 16))


@pytest.mark.parametrize("name", ["dvae", "vqvae"])
def test_tokens_under_a_bf16_autocast_are_the_fp32_tokens(name):
    torch.manual_seed(0)
    model = mmptm.create_model(name, hidden=8, num_downsamples=1, codebook_size=512, image_size=16).eval()
    images = torch.rand(32, 3, 16, 16)
    encoder_dtypes = []
    model.encoder.register_forward_hook(lambda module, inputs, output: encoder_dtypes.append(output.dtype))
    exact = model.encode_tokens(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.encode_tokens(images)
    assert encoder_dtypes == [torch.float32, torch.float32]  # the encoder ran outside the autocast
    assert torch.equal(mixed, exact)


@pytest.mark.parametrize("name", ["dvae", "vqvae"])
def test_a_bf16_tokenizer_encodes_and_decodes_in_bf16(name):
    torch.manual_seed(0)
    model = mmptm.create_model(name, **TINY_MODEL).eval()
    images = torch.rand(2, 3, 32, 32)
    exact_tokens = model.encode_tokens(images)
    fp32_decoded = model.decode_tokens(exact_tokens)
    model.to(torch.bfloat16)
    tokens = model.encode_tokens(images.to(torch.bfloat16))
    assert tokens.shape == (2, 64)
    assert model(images.to(torch.bfloat16)).decoded.dtype == torch.bfloat16
    # The same tokens give the fp32 model's images, to bf16's precision.
    decoded = model.decode_tokens(exact_tokens)
    assert decoded.shape == (2, 3, 32, 32) and (decoded - fp32_decoded).abs().max() < 0.05


def test_objective_trains_both_models_and_reports_its_metrics():
    images = torch.rand(4, 3, 32, 32)
    objective = ImageTokenizerLoss(kl_warmup_steps=4, temperature_steps=4)
    dvae = mmptm.create_model("dvae", **TINY_MODEL)
    out = objective(dvae, {"image": images})
    out["loss"].backward()
    assert {"loss", "recon_loss", "kl", "kl_weight", "temperature", "perplexity", "codebook_usage"} == set(out)
    assert out["kl_weight"] == 0 and out["temperature"] == 1 and int(dvae.step) == 1
    assert all(p.grad is not None for p in dvae.encoder.parameters())
    out = objective(dvae, {"image": images})
    assert out["kl_weight"] == pytest.approx(6.6 * 0.5 * (1 - math.cos(math.pi / 4)))
    vqvae = mmptm.create_model("vqvae", **TINY_MODEL)
    out = objective(vqvae, {"image": images})
    out["loss"].backward()
    assert {"loss", "recon_loss", "commitment", "restarted_codes", "perplexity", "codebook_usage"} == set(out)
    torch.testing.assert_close(out["loss"], out["recon_loss"] + 0.25 * out["commitment"])
    assert all(p.grad is not None for p in vqvae.encoder.parameters())


# --------------------------------------------------------------------------- training runs and token shards


@pytest.fixture(scope="module")
def trained_dvae(tmp_path_factory):
    """dvae_tiny.yaml with a small model, 40 steps (checkpoint at 20), and the untrained model's eval metrics."""
    run = tmp_path_factory.mktemp("dvae") / "run"
    overrides = [*TINY_RUN, "train.max_steps=40", "train.checkpoint_every=20", "train.keep_checkpoints=5"]
    config = mmptm.load_config("dvae_tiny.yaml", overrides)
    torch.manual_seed(config.train.seed)  # the trainer's seed: the model it starts from
    untrained_model = mmptm.create_model(config.model)
    untrained = dvae_reconstruction(
        untrained_model, EvalContext(tokenizer=None, data=model_data_context(untrained_model, training=False)),
        batch_size=128,
    )
    final = mmptm.train(config, output_dir=run)
    return run, {f"eval/{key}": value for key, value in untrained.items()}, final


def test_a_short_run_reconstructs_far_better_than_the_untrained_model(trained_dvae):
    run, untrained, final = trained_dvae
    assert final["eval/dvae_recon_mse"] < 0.5 * untrained["eval/dvae_recon_mse"], (final, untrained)
    assert final["eval/dvae_num_images"] > 300 and final["eval/dvae_skipped_samples"] == 0
    assert 1 <= final["eval/dvae_perplexity"] <= 64 and 0 < final["eval/dvae_codebook_usage"] <= 1
    model, _, preprocess = mmptm.load_pretrained(run)
    assert type(model).__name__ == "DiscreteVAE" and int(model.step) == 40
    from PIL import Image

    pixels = preprocess(Image.new("RGB", (32, 32), (255, 255, 255)))
    torch.testing.assert_close(pixels, torch.ones(3, 32, 32))  # [0, 1] pixels, no normalisation


def test_resume_continues_the_annealing_schedules(trained_dvae, tmp_path):
    run, _, _ = trained_dvae
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(run / "checkpoints" / "step_00000020", resumed / "checkpoints" / "step_00000020")
    overrides = [*TINY_RUN, "train.max_steps=22", "train.checkpoint_every=20"]
    mmptm.train(mmptm.load_config("dvae_tiny.yaml", overrides), output_dir=resumed, resume=True)
    original = {r["step"]: r for r in read_metrics(run) if "train/loss" in r}
    after = [r for r in read_metrics(resumed) if "train/loss" in r]
    assert [r["step"] for r in after] == [21, 22]
    for record in after:
        for key in ("train/image_tokenizer/temperature", "train/image_tokenizer/kl_weight"):
            assert record[key] == pytest.approx(original[record["step"]][key])
    assert after[0]["train/image_tokenizer/kl_weight"] > 0
    assert int(mmptm.load_pretrained(resumed).model.step) == 22


def _tar_members(path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_tokenizer_images_writes_token_shards_that_the_stream_reads_back(trained_dvae, tmp_path, capsys, demo):
    run, _, _ = trained_dvae
    source = [_tar_members(url) for url in resolve_shards(resolve("demo:val"))]
    originals = {key: files for shard in source for key, files in shard.items()}
    # One more shard with a broken image and a sample without a caption: both skipped and counted.
    extra = tmp_path / "extra.tar"
    good = next(iter(originals.values()))
    with tarfile.open(extra, "w") as tar:
        for name, data in [("bad.png", b"not a png"), ("bad.txt", b"a caption"), ("nocap.png", good["png"]),
                           ("ok.png", good["png"]), ("ok.txt", b"a handwritten zero.")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "tokens"
    data = f"{resolve('demo:val')}::{extra}"
    status = main(["tokenizer", "images", "--checkpoint", str(run), "--data", data, "--out", str(out),
                   "--samples-per-shard", "100", "--batch-size", "64", "--num-workers", "0"])
    assert status == 0
    result = json.loads(capsys.readouterr().out)
    expected = len(originals) + 1
    assert result["num_samples"] == expected == demo.num_val + 1
    assert result["num_skipped"] == 2
    assert (result["grid_size"], result["codebook_size"]) == (8, 64)
    assert len(result["shards"]) == math.ceil(expected / 100)
    info = json.loads((out / "info.json").read_text())
    assert info["num_samples"] == expected and info["num_skipped"] == 2

    written = {key: files for shard in result["shards"] for key, files in _tar_members(shard).items()}
    assert set(written) == set(originals) | {"ok"}
    model = mmptm.load_pretrained(run).model
    for key, files in list(originals.items())[:5]:
        assert set(written[key]) == {"tokens.npy", "txt", "json", "cls"}
        for ext in ("txt", "json", "cls"):
            assert written[key][ext] == files[ext]
        grid = np.load(io.BytesIO(written[key]["tokens.npy"]))
        assert grid.dtype == np.int16 and grid.shape == (8, 8)
        from PIL import Image

        image = torch.from_numpy(np.array(Image.open(io.BytesIO(files["png"])).convert("RGB"))).permute(2, 0, 1)
        tokens = model.encode_tokens(image[None].float() / 255)
        assert torch.equal(torch.from_numpy(grid.astype(np.int64)).flatten(), tokens[0])
    assert set(written["ok"]) == {"tokens.npy", "txt"}

    tokenizer = mmptm.load_pretrained(run).tokenizer
    stream = build(DATASETS, {"name": "image_tokens", "shards": str(out), "batch_size": 50, "num_workers": 0,
                              "caption_languages": ["fr"]},
                   context=DataContext(tokenizer=tokenizer, training=False))
    batches = [batch for batch in stream if not batch.get("empty")]
    keys = [key for batch in batches for key in batch["key"]]
    # "ok" has no json captions: its txt caption stands in, as in the image_text stream.
    assert sorted(keys) == sorted([*originals, "ok"])
    assert sum(batch["skipped"] for batch in batches) == 0
    first = batches[0]
    assert first["image_tokens"].shape == (50, 64) and first["image_tokens"].dtype == torch.long
    assert first["text"].shape[0] == 50
    grid = np.load(io.BytesIO(written[first["key"][0]]["tokens.npy"]))
    assert first["image_tokens"][0].tolist() == grid.flatten().tolist()
    french = json.loads(originals[first["key"][0]]["json"])["captions"]["fr"]
    assert first["caption"][0] in french


def test_tokenizer_images_errors_on_a_missing_or_non_dvae_checkpoint(tmp_path, capsys, demo):
    missing = main(["tokenizer", "images", "--checkpoint", str(tmp_path / "nope"), "--data", "demo:val",
                    "--out", str(tmp_path / "out")])
    assert missing == 2
    assert "nope" in capsys.readouterr().err
    clip_run = tmp_path / "clip"
    config = mmptm.load_config(
        "clip_tiny.yaml",
        ["model.embed_dim=32", "model.vision.width=32", "model.vision.layers=1", "model.vision.heads=2",
         "model.text.width=32", "model.text.layers=1", "model.text.heads=2", "data.train.batch_size=8",
         "data.train.num_workers=0", "train.max_steps=1", "train.progress_bar=false", "eval.zeroshot=null"],
    )
    mmptm.train(config, output_dir=clip_run)
    status = main(["tokenizer", "images", "--checkpoint", str(clip_run), "--data", "demo:val",
                   "--out", str(tmp_path / "out")])
    assert status == 2
    error = capsys.readouterr().err
    assert "CLIP" in error and "not an image tokenizer" in error and "dvae" in error
    assert not (tmp_path / "out").exists()


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_tar(path, files: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_image_tokens_stream_skips_malformed_token_files(tmp_path):
    path = tmp_path / "t.tar"
    write_tar(path, [("a.tokens.npy", npy(np.arange(4, dtype=np.int16).reshape(2, 2))), ("a.txt", b"x"),
                     ("b.tokens.npy", npy(np.ones((2, 2), dtype=np.float32))), ("b.txt", b"y"),
                     ("c.tokens.npy", b"garbage"), ("c.txt", b"z"), ("d.txt", b"no tokens")])
    stream = build(DATASETS, {"name": "image_tokens", "shards": str(path), "batch_size": 8, "num_workers": 0},
                   context=DataContext(training=False))
    batches = list(stream)
    good = [b for b in batches if not b.get("empty")]
    assert [b["key"] for b in good] == [["a"]] and good[0]["image_tokens"].tolist() == [[0, 1, 2, 3]]
    assert sum(b["skipped"] for b in batches) == 3


def test_image_tokens_stream_skips_grids_the_model_cannot_read(tmp_path, caplog):
    path = tmp_path / "t.tar"
    grid = np.arange(4, dtype=np.int16).reshape(2, 2)
    write_tar(path, [("good.tokens.npy", npy(grid)), ("good.txt", b"x"),
                     ("big.tokens.npy", npy(np.arange(9, dtype=np.int16).reshape(3, 3))), ("big.txt", b"y"),
                     ("wide.tokens.npy", npy(np.arange(4, dtype=np.int16).reshape(1, 4))), ("wide.txt", b"z"),
                     ("flat.tokens.npy", npy(np.arange(4, dtype=np.int16))), ("flat.txt", b"w"),
                     ("odd.tokens.npy", npy(np.arange(5, dtype=np.int16))), ("odd.txt", b"v"),
                     ("ids.tokens.npy", npy(grid + 5)), ("ids.txt", b"u")])
    decoder = mmptm.create_model("dalle", codebook_size=8, grid_size=2, text_length=4, width=32, layers=1, heads=2)
    context = model_data_context(decoder, training=False)
    assert (context.image_token_grid, context.image_codebook_size) == (2, 8)
    stream = build(DATASETS, {"name": "image_tokens", "shards": str(path), "batch_size": 8, "num_workers": 0},
                   context=context)
    with caplog.at_level("WARNING"):
        batches = list(stream)
    good = [b for b in batches if not b.get("empty")]
    assert [b["key"] for b in good] == [["good", "flat"]]
    assert good[0]["image_tokens"].tolist() == [[0, 1, 2, 3]] * 2
    skipped = [key.split("#")[-1] for b in batches for key in b["skipped_keys"]]
    assert sorted(skipped) == ["big", "ids", "odd", "wide"]
    assert "the model reads 2x2" in caplog.text and "outside the model's codebook of 8" in caplog.text
    assert "must be a square grid" in caplog.text
    # Without the model's geometry any square grid of non-negative ids is read.
    assert model_data_context(mmptm.create_model("dvae", **TINY_MODEL)).image_token_grid is None


def test_the_tokenizer_objective_names_what_a_batch_without_images_holds():
    model = mmptm.create_model("dvae", **TINY_MODEL)
    with pytest.raises(KeyError, match=r"needs 'image' in its batches.*\['image_tokens', 'text'\]"):
        ImageTokenizerLoss()(model, {"image_tokens": torch.zeros(1, 64, dtype=torch.long), "text": torch.zeros(1, 4)})
