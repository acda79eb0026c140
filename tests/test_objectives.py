"""Contrastive objectives: equivalence with open_clip, 2-process gloo equivalence, end to end with a fake model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import open_clip.loss
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mmptm.objectives import ContrastiveLoss, SigLipLoss, clip_contrastive_loss, siglip_loss
from mmptm.objectives.contrastive import chunked_contrastive_loss, retrieval_accuracy
from mmptm.registry import OBJECTIVES, build
from mmptm.training.distributed import all_reduce_mean, gather_features, world_info

WORLD_SIZE = 2
LOCAL_BATCH = 4
DIM = 8
# (local_loss, gather_with_grad) combinations of the contrastive loss.
CLIP_MODES = [(False, True), (True, True), (False, False), (True, False)]


def random_features(seed: int, n: int = WORLD_SIZE * LOCAL_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised float64 image and text features of a global batch (float64 keeps tolerances tight)."""
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, DIM, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, DIM, generator=generator, dtype=torch.float64), dim=-1)
    return image, text


def loss_and_grads(loss_fn: Any, image: torch.Tensor, text: torch.Tensor, *scalars: float) -> dict[str, torch.Tensor]:
    """Loss of ``loss_fn(image, text, *scalars)`` and its gradients w.r.t. every input."""
    inputs = [image.clone().requires_grad_(), text.clone().requires_grad_()]
    inputs += [torch.tensor(s, dtype=torch.float64, requires_grad=True) for s in scalars]
    loss = loss_fn(*inputs)
    loss.backward()
    return {"loss": loss.detach(), **{f"grad{i}": x.grad for i, x in enumerate(inputs)}}


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], msg=lambda m, k=key: f"{k}: {m}")


def mmptm_clip(local_loss: bool, gather_with_grad: bool) -> Any:
    return lambda i, t, s: clip_contrastive_loss(i, t, s, local_loss=local_loss, gather_with_grad=gather_with_grad)[0]


def mmptm_siglip(i: torch.Tensor, t: torch.Tensor, s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return siglip_loss(i, t, s, b)[0]


SCALE = 1 / 0.07
BIAS = -10.0
SIGLIP_SCALE = 10.0


# ---------------------------------------------------------------- single process vs open_clip


@pytest.mark.parametrize("local_loss", [False, True])
def test_contrastive_matches_open_clip(local_loss: bool) -> None:
    image, text = random_features(0)
    reference = open_clip.loss.ClipLoss(local_loss=local_loss, gather_with_grad=True)
    assert_same(
        loss_and_grads(mmptm_clip(local_loss, True), image, text, SCALE),
        loss_and_grads(reference, image, text, SCALE),
    )


def test_siglip_matches_open_clip() -> None:
    image, text = random_features(1)
    assert_same(
        loss_and_grads(mmptm_siglip, image, text, SIGLIP_SCALE, BIAS),
        loss_and_grads(open_clip.loss.SigLipLoss(), image, text, SIGLIP_SCALE, BIAS),
    )


def test_single_process_helpers_are_identity() -> None:
    image, text = random_features(2)
    assert world_info() == (0, 1)
    gathered = gather_features(image, text)
    assert gathered[0] is image and gathered[1] is text
    torch.testing.assert_close(all_reduce_mean(image), image)


def test_labels_are_cached_per_size_and_inference_mode() -> None:
    objective = ContrastiveLoss()
    labels = objective.ground_truth(4, torch.device("cpu"))
    assert objective.ground_truth(4, torch.device("cpu")) is labels
    assert torch.equal(objective.ground_truth(6, torch.device("cpu")), torch.arange(6))
    with torch.inference_mode():
        assert objective.ground_truth(4, torch.device("cpu")) is not labels


# ---------------------------------------------------------------- a fake dual encoder


class FakeTower(nn.Module):
    """A linear tower that reads ``input_key`` from the batch."""

    def __init__(self, input_key: str, in_dim: int, embed_dim: int = DIM) -> None:
        super().__init__()
        self.input_key = input_key
        self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class FakeDualEncoder(nn.Module):
    """Returns open_clip's output dict, as mmptm's CLIP does; ``logit_bias`` only when initialised."""

    def __init__(self, init_logit_bias: float | None = None, input_key: str = "image") -> None:
        super().__init__()
        self.visual = FakeTower(input_key, in_dim=12)
        self.text = nn.EmbeddingBag(20, DIM)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.tensor(init_logit_bias))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {
            "image_features": F.normalize(self.visual(image), dim=-1),
            "text_features": F.normalize(self.text(text), dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


def fake_batch(n: int = WORLD_SIZE * LOCAL_BATCH, input_key: str = "image") -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        input_key: torch.randn(n, 12, generator=generator),
        "text": torch.randint(0, 20, (n, 5), generator=generator),
    }


def fake_model(objective: str) -> FakeDualEncoder:
    torch.manual_seed(4)
    return FakeDualEncoder(init_logit_bias=-10.0 if objective == "siglip" else None)


def model_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("objective_name", ["contrastive", "siglip"])
def test_objective_trains_a_fake_model(objective_name: str) -> None:
    model = FakeDualEncoder(init_logit_bias=-10.0 if objective_name == "siglip" else None, input_key="pixels")
    objective = build(OBJECTIVES, {"name": objective_name})
    batch = fake_batch(input_key="pixels")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        out = objective(model, batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].detach())
    assert all(torch.is_tensor(v) and v.ndim == 0 for v in out.values())
    expected_keys = {"loss", "logit_scale", "i2t_acc"} | ({"logit_bias"} if objective_name == "siglip" else {"t2i_acc"})
    assert set(out) == expected_keys
    assert all(p.grad is not None for p in model.parameters())
    assert losses[-1] < losses[0]
    assert 0.0 <= out["i2t_acc"] <= 1.0


def test_siglip_without_logit_bias_explains_the_fix() -> None:
    with pytest.raises(ValueError, match=r"model\.init_logit_bias: -10.*model\.init_logit_scale: 2\.302585"):
        SigLipLoss()(FakeDualEncoder(init_logit_bias=None), fake_batch())


@pytest.mark.parametrize(("n", "chunk_size"), [(37, 8), (37, 1), (12, 100)])
def test_chunked_contrastive_equals_the_full_logits_loss(n: int, chunk_size: int) -> None:
    image, text = random_features(5, n)
    full = loss_and_grads(mmptm_clip(False, True), image, text, SCALE)
    chunked = loss_and_grads(lambda i, t, s: chunked_contrastive_loss(i, t, s, chunk_size)[0], image, text, SCALE)
    assert_same(chunked, full)
    _, logits_per_image, logits_per_text = clip_contrastive_loss(image, text, torch.tensor(SCALE, dtype=torch.float64))
    labels = torch.arange(n)
    _, i2t, t2i = chunked_contrastive_loss(image, text, torch.tensor(SCALE, dtype=torch.float64), chunk_size)
    assert i2t == retrieval_accuracy(logits_per_image, labels) and t2i == retrieval_accuracy(logits_per_text, labels)


def test_chunked_contrastive_objective_gives_the_same_gradients() -> None:
    grads = []
    for options in ({"name": "contrastive"}, {"name": "contrastive", "chunk_size": 3}):
        model = fake_model("contrastive")
        out = build(OBJECTIVES, options)(model, fake_batch())
        out["loss"].backward()
        grads.append({"loss": out["loss"].detach(), **model_grads(model)})
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cannot be combined with local_loss"):
        build(OBJECTIVES, {"name": "contrastive", "chunk_size": 3, "local_loss": True})


def tiny_clip() -> nn.Module:
    from mmptm.encoders import CLIP

    torch.manual_seed(5)
    vision = {"name": "vit", "image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}
    text = {"name": "text_transformer", "context_length": 8, "width": 32, "layers": 1, "heads": 2}
    return CLIP(16, vision=vision, text=text, vocab_size=30).train()


def clip_batch(n: int = 10) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(6)
    return {"image": torch.randn(n, 3, 16, 16, generator=generator),
            "text": torch.randint(1, 30, (n, 8), generator=generator)}


def saved_bytes_and_grads(options: dict[str, Any]) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes autograd keeps for backward after the forward (outside checkpointed regions); loss and grads."""
    model, saved = tiny_clip(), []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = build(OBJECTIVES, options)(model, clip_batch())
    out["loss"].backward()
    return sum(saved), {"loss": out["loss"].detach(), **model_grads(model)}


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_grad_cache_gives_the_naive_gradients_and_keeps_no_encoder_graph(chunk_size: int | None) -> None:
    naive_saved, naive = saved_bytes_and_grads({"name": "contrastive"})
    cached_saved, cached = saved_bytes_and_grads(
        {"name": "contrastive", "grad_cache_chunk": 3, "chunk_size": chunk_size}
    )
    torch.testing.assert_close(cached, naive, rtol=0, atol=1e-5)
    # Only the sub-batches' inputs and the features stay saved, not the towers' activations.
    assert cached_saved < naive_saved / 5


def test_grad_cache_needs_a_model_that_takes_sub_batch() -> None:
    with pytest.raises(TypeError, match="FakeDualEncoder.forward does not"):
        build(OBJECTIVES, {"name": "contrastive", "grad_cache_chunk": 2})(fake_model("contrastive"), fake_batch())
    with pytest.raises(ValueError, match="grad_cache_chunk must be >= 1"):
        build(OBJECTIVES, {"name": "contrastive", "grad_cache_chunk": 0})


# ---------------------------------------------------------------- two processes over gloo


def _distributed_worker(rank: int, world_size: int, init_file: str, results_dir: str) -> None:
    """One rank: losses and gradients on its half of the global batch, saved for the parent to compare."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results: dict[str, Any] = {"world_info": world_info()}

        def run(key: str, loss_fn: Any, image: torch.Tensor, text: torch.Tensor, *scalars: float) -> None:
            out = loss_and_grads(loss_fn, image[local], text[local], *scalars)
            # DDP averages gradients over ranks: feature gradients reach the parameters
            # divided by the world size, scalar parameters' gradients are averaged.
            results[key] = {
                "loss": out["loss"],
                "mean_loss": all_reduce_mean(out["loss"]),
                "grad0": out["grad0"] / world_size,
                "grad1": out["grad1"] / world_size,
                **{f"grad{i}": all_reduce_mean(out[f"grad{i}"]) for i in range(2, 2 + len(scalars))},
            }

        image, text = random_features(10)
        for local_loss, gather_with_grad in CLIP_MODES:
            run(f"clip{local_loss, gather_with_grad}", mmptm_clip(local_loss, gather_with_grad), image, text, SCALE)
            reference = open_clip.loss.ClipLoss(
                local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world_size
            )
            run(f"open_clip{local_loss, gather_with_grad}", reference, image, text, SCALE)
        image, text = random_features(11)
        run("siglip", mmptm_siglip, image, text, SIGLIP_SCALE, BIAS)
        reference = open_clip.loss.SigLipLoss(rank=rank, world_size=world_size, dist_impl="bidir")
        run("open_clip_siglip", reference, image, text, SIGLIP_SCALE, BIAS)

        # End to end: the objective on a DDP-wrapped model (attribute access through the wrapper).
        batch = {k: v[local] for k, v in fake_batch().items()}
        for name in ("contrastive", "siglip"):
            model = DistributedDataParallel(fake_model(name))
            out = build(OBJECTIVES, {"name": name})(model, batch)
            out["loss"].backward()
            results[f"ddp_{name}"] = {"mean_loss": all_reduce_mean(out["loss"]), **model_grads(model.module)}
        torch.save(results, Path(results_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Run :func:`_distributed_worker` once on 2 gloo processes; one result dict per rank."""
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(_distributed_worker, args=(WORLD_SIZE, str(tmp / "init"), str(tmp)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


def gathered(results: list[dict[str, Any]], key: str) -> dict[str, torch.Tensor]:
    """The ranks' results for ``key`` as one process would see them: features concatenated, scalars averaged."""
    first = results[0][key]
    return {
        name: torch.cat([r[key][name] for r in results]) if first[name].ndim else first[name]
        for name in first
        if name != "loss"
    }


def single_process(loss_fn: Any, image: torch.Tensor, text: torch.Tensor, *scalars: float) -> dict[str, torch.Tensor]:
    out = loss_and_grads(loss_fn, image, text, *scalars)
    return {"mean_loss": out.pop("loss"), **out}


def test_world_info_in_each_rank(distributed_results: list[dict[str, Any]]) -> None:
    assert [r["world_info"] for r in distributed_results] == [(0, 2), (1, 2)]


@pytest.mark.parametrize("local_loss", [False, True])
def test_distributed_contrastive_equals_full_batch(distributed_results: list[dict[str, Any]], local_loss: bool) -> None:
    image, text = random_features(10)
    key = f"clip{local_loss, True}"
    assert_same(gathered(distributed_results, key), single_process(mmptm_clip(local_loss, True), image, text, SCALE))
    if not local_loss:  # every rank computes the whole global loss
        for result in distributed_results:
            torch.testing.assert_close(result[key]["loss"], result[key]["mean_loss"])


@pytest.mark.parametrize(("local_loss", "gather_with_grad"), CLIP_MODES)
def test_distributed_contrastive_matches_open_clip(
    distributed_results: list[dict[str, Any]], local_loss: bool, gather_with_grad: bool
) -> None:
    for result in distributed_results:
        assert_same(result[f"clip{local_loss, gather_with_grad}"], result[f"open_clip{local_loss, gather_with_grad}"])


def test_distributed_siglip_equals_full_batch_and_open_clip(distributed_results: list[dict[str, Any]]) -> None:
    image, text = random_features(11)
    assert_same(gathered(distributed_results, "siglip"), single_process(mmptm_siglip, image, text, SIGLIP_SCALE, BIAS))
    for result in distributed_results:
        assert_same(result["siglip"], result["open_clip_siglip"])


@pytest.mark.parametrize("objective_name", ["contrastive", "siglip"])
def test_ddp_objective_equals_single_process(distributed_results: list[dict[str, Any]], objective_name: str) -> None:
    model = fake_model(objective_name)
    out = build(OBJECTIVES, {"name": objective_name})(model, fake_batch())
    out["loss"].backward()
    expected = {"mean_loss": out["loss"].detach(), **model_grads(model)}
    for result in distributed_results:  # DDP leaves the same averaged gradients on every rank
        torch.testing.assert_close(result[f"ddp_{objective_name}"], expected, rtol=1e-5, atol=1e-6)
