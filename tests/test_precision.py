"""Training-speed pieces: bf16 GEMMs through fp32 kernels on CPUs without bf16 ones, the fused AdamW."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mmptm.encoders import CLIP
from mmptm.training.optim import build_optimizer
from mmptm.training.precision import Bf16MatmulsInFp32, cpu_bf16_gemms


def bf16_autocast() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_linear_is_the_bf16_product_computed_with_fp32_kernels() -> None:
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((16, 64), (32, 64), (32,)))
    with bf16_autocast(), Bf16MatmulsInFp32():
        ours = F.linear(x, weight, bias)
    with bf16_autocast():
        native = F.linear(x, weight, bias)
    rounded = [t.to(torch.bfloat16).float() for t in (x, weight, bias)]
    expected = F.linear(*rounded).to(torch.bfloat16)
    assert ours.dtype == native.dtype == torch.bfloat16
    assert torch.equal(ours, expected)
    torch.testing.assert_close(ours, native)  # bf16 tolerances: at most an ulp apart
    with Bf16MatmulsInFp32():  # outside autocast: untouched fp32
        assert torch.equal(F.linear(x, weight, bias), x @ weight.T + bias) or (x @ weight.T).dtype == torch.float32
        assert F.linear(x, weight, bias).dtype == torch.float32


def tiny_clip() -> CLIP:
    torch.manual_seed(0)
    vision = {"name": "vit", "image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}
    text = {"name": "text_transformer", "context_length": 8, "width": 32, "layers": 1, "heads": 2}
    return CLIP(16, vision=vision, text=text, vocab_size=30).train()


def bf16_step(model: CLIP, emulate: bool, sub_batch: int | None = None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(6, 3, 16, 16, generator=generator)
    text = torch.randint(1, 30, (6, 8), generator=generator)
    with cpu_bf16_gemms(torch.device("cpu"), "bf16" if emulate else "fp32"):
        with bf16_autocast():
            out = model(image, text, sub_batch=sub_batch)
            logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
            loss = F.cross_entropy(logits.float(), torch.arange(6))
        loss.backward()  # GradCache recomputes the towers here, with the forward's kernels
    return {"loss": loss.detach(), **{name: p.grad for name, p in model.named_parameters()}}


@pytest.mark.parametrize("sub_batch", [None, 4])
def test_a_bf16_training_step_matches_native_bf16_autocast(sub_batch: int | None) -> None:
    model = tiny_clip()
    native = bf16_step(model, emulate=False)
    ours = bf16_step(copy.deepcopy(model), emulate=True, sub_batch=sub_batch)
    for name, grad in native.items():  # bf16 rounding noise only
        assert (ours[name] - grad).norm() <= 2e-2 * grad.norm() + 1e-6, name


def test_fp32_runs_have_no_mode() -> None:
    with cpu_bf16_gemms(torch.device("cpu"), "fp32"):
        assert not torch.overrides._get_current_function_mode_stack()


def test_optimizer_is_fused_and_steps_like_the_reference_adamw() -> None:
    model = tiny_clip()
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(model.named_parameters(), 1e-3, 0.1, (0.9, 0.98), 1e-6)
    assert optimizer.defaults["fused"]
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    by_id = dict(zip(map(id, model.parameters()), reference.parameters(), strict=True))
    expected = torch.optim.AdamW(
        [{**g, "params": [by_id[id(p)] for p in g["params"]]} for g in groups], lr=1e-3, betas=(0.9, 0.98), eps=1e-6
    )
    for _ in range(2):
        for m in (model, reference):
            m.zero_grad()
            out = m(torch.ones(2, 3, 16, 16), torch.ones(2, 8, dtype=torch.long))
            (out["image_features"] * out["text_features"]).sum().backward()
        optimizer.step()
        expected.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        # atol: the key bias gets only rounding-noise gradients (it cannot change a softmax)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def _bf16_gradients(model: torch.nn.Module, run, checkpointing: bool) -> list[torch.Tensor]:
    """Gradients of a bf16 (fp32-kernel) forward whose backward runs outside the GEMM mode, as a user's would."""
    model = copy.deepcopy(model)
    model.set_grad_checkpointing(checkpointing)
    with cpu_bf16_gemms(torch.device("cpu"), "bf16"), bf16_autocast():
        loss = run(model).float().square().mean()
    loss.backward()  # recomputation (checkpointing) must bring the forward's GEMM mode back by itself
    return [p.grad for p in model.parameters()]


def test_checkpointed_bert_and_dalle_blocks_recompute_under_the_forwards_gemm_mode() -> None:
    from mmptm.encoders.bert import BertLayer, run_layer
    from mmptm.encoders.dalle import TokenDecoder

    class Stack(torch.nn.Module):  # a BERT layer as VisualBERT / ViLBERT run it (run_layer)
        def __init__(self) -> None:
            super().__init__()
            self.layer, self.grad_checkpointing = BertLayer(32, 2, dropout=0.0), False

        def set_grad_checkpointing(self, enable: bool) -> None:
            self.grad_checkpointing = enable

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return run_layer(self.layer, self.grad_checkpointing, x)

    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    decoder = TokenDecoder(codebook_size=16, grid_size=2, text_length=4, width=32, layers=2, heads=2,
                           vocab_size=20, pad_id=0)
    text, tokens = torch.tensor([[2, 5, 3, 0], [2, 7, 8, 3]]), torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    for model, run in ((Stack(), lambda m: m(x)), (decoder, lambda m: m(text, tokens).image_logits)):
        plain, checkpointed = _bf16_gradients(model, run, False), _bf16_gradients(model, run, True)
        for a, b in zip(plain, checkpointed, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
