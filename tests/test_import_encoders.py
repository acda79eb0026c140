"""Towers that hold OpenAI / open_clip weights exactly: the modified ResNet and QuickGELU transformers."""

from __future__ import annotations

import copy

import pytest
import torch
from open_clip.modified_resnet import ModifiedResNet as OpenClipModifiedResNet
from open_clip.transformer import QuickGELU as OpenClipQuickGELU
from open_clip.transformer import TextTransformer as OpenClipTextTransformer
from open_clip.transformer import VisionTransformer as OpenClipVisionTransformer
from torch import nn

from mmptm.config import ConfigError, validate_component
from mmptm.encoders import ModifiedResNet, QuickGELU, TextTransformer, VisionTransformer
from mmptm.registry import ENCODERS, build

EMBED_DIM = 32
VOCAB = 100
TINY_RESNET = {"layers": (2, 1, 1, 1), "width": 16, "image_size": 64}  # 8 heads of 64 in the pool
RN50 = {"layers": (3, 4, 6, 3), "width": 64, "image_size": 224}
TINY_VIT = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 2}
TINY_TEXT = {"context_length": 16, "width": 48, "heads": 4, "layers": 2}


def images(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def randomise_batch_norms(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial statistics and affine terms.

    A fresh ResNet has unit running variance, zero running mean and a zero ``bn3`` scale in
    every block, which would let a wrong residual branch go unnoticed.
    """
    generator = torch.Generator().manual_seed(1)
    for norm in model.modules():
        if isinstance(norm, nn.BatchNorm2d):
            channels = norm.num_features
            norm.weight.data = 0.5 + torch.rand(channels, generator=generator)
            norm.bias.data = 0.1 * torch.randn(channels, generator=generator)
            norm.running_mean = 0.1 * torch.randn(channels, generator=generator)
            norm.running_var = 0.5 + torch.rand(channels, generator=generator)


def assert_loads_and_matches(ours: nn.Module, reference: nn.Module, inputs: torch.Tensor, tol: float) -> None:
    """Same state-dict keys in the same order, strict load, same outputs in eval mode."""
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(inputs), reference(inputs), atol=tol, rtol=tol)


# --------------------------------------------------------------------------- modified ResNet


@pytest.mark.parametrize(
    ("config", "output_dim", "batch", "tol"),
    [(TINY_RESNET, EMBED_DIM, 2, 1e-5), (RN50, 1024, 1, 1e-4)],
    ids=["tiny", "rn50"],
)
def test_modified_resnet_matches_open_clip(config, output_dim, batch, tol):
    torch.manual_seed(0)
    # open_clip derives the pool's heads as width * 32 // head_width, head_width 64 for its RN configs.
    reference = OpenClipModifiedResNet(output_dim=output_dim, heads=config["width"] * 32 // 64, **config)
    randomise_batch_norms(reference)
    ours = build(ENCODERS, {"name": "modified_resnet", **config}, embed_dim=output_dim)
    assert isinstance(ours, ModifiedResNet)
    assert_loads_and_matches(ours, reference, images(batch, config["image_size"]), tol)


def test_modified_resnet_exposes_what_a_vision_tower_needs():
    tower = ModifiedResNet(EMBED_DIM, **TINY_RESNET)
    assert tower.input_key == "image" and tower.image_size == 64
    assert len(tower.image_mean) == len(tower.image_std) == 3
    assert tower.attnpool.heads == 8
    assert tower(images(2, 64)).shape == (2, EMBED_DIM)
    with pytest.raises(ValueError, match="64x64"):
        tower(images(2, 32))
    with pytest.raises(ValueError, match="multiple of 32"):
        ModifiedResNet(EMBED_DIM, image_size=100)
    with pytest.raises(ValueError, match="divisible by 'heads'"):
        ModifiedResNet(EMBED_DIM, **TINY_RESNET, heads=7)


def test_gradients_reach_every_resnet_parameter():
    torch.manual_seed(0)
    tower = ModifiedResNet(EMBED_DIM, **TINY_RESNET).train()
    # The zero-initialised bn3 scales would block the gradient to everything else in their blocks.
    for stage in (tower.layer1, tower.layer2, tower.layer3, tower.layer4):
        for block in stage:
            nn.init.ones_(block.bn3.weight)
    tower(images(2, 64)).pow(2).sum().backward()
    missing = [name for name, p in tower.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_resnet_grad_checkpointing_gives_the_same_outputs_gradients_and_statistics():
    torch.manual_seed(0)
    plain = ModifiedResNet(EMBED_DIM, **TINY_RESNET).train()
    randomise_batch_norms(plain)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    for model in (plain, checkpointed):
        model(images(2, 64)).pow(2).sum().backward()
    torch.testing.assert_close(checkpointed.state_dict(), plain.state_dict())  # running statistics moved once
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


# --------------------------------------------------------------------------- QuickGELU transformers


def test_quick_gelu_is_openai_clips_activation():
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(QuickGELU()(x), OpenClipQuickGELU()(x))


def test_vit_with_quick_gelu_matches_open_clip():
    torch.manual_seed(0)
    reference = OpenClipVisionTransformer(**TINY_VIT, mlp_ratio=4.0, output_dim=EMBED_DIM, act_layer=OpenClipQuickGELU)
    ours = VisionTransformer(EMBED_DIM, **TINY_VIT, act="quick_gelu")
    assert_loads_and_matches(ours, reference, images(4, 32), tol=1e-5)
    exact_gelu = VisionTransformer(EMBED_DIM, **TINY_VIT).eval()
    exact_gelu.load_state_dict(reference.state_dict())
    with torch.no_grad():
        assert not torch.allclose(exact_gelu(images(4, 32)), reference(images(4, 32)), atol=1e-5)


def test_text_transformer_with_quick_gelu_matches_open_clip():
    torch.manual_seed(0)
    reference = OpenClipTextTransformer(
        **TINY_TEXT, vocab_size=VOCAB, output_dim=EMBED_DIM, pool_type="argmax", act_layer=OpenClipQuickGELU
    )
    ours = TextTransformer(EMBED_DIM, VOCAB, **TINY_TEXT, act="quick_gelu")
    text = torch.randint(1, VOCAB - 1, (4, TINY_TEXT["context_length"]), generator=torch.Generator().manual_seed(0))
    text[:, -3] = VOCAB - 1  # end-of-text, the highest id, pooled by argmax
    text[:, -2:] = 0
    assert_loads_and_matches(ours, reference, text, tol=1e-5)


@pytest.mark.parametrize("tower", ["vit", "text_transformer"])
def test_unknown_activation_names_the_choices(tower):
    with pytest.raises(ValueError, match=r"'relu'.*choices: 'gelu', 'quick_gelu'"):
        build(ENCODERS, {"name": tower, "act": "relu"}, embed_dim=EMBED_DIM, vocab_size=VOCAB)
    with pytest.raises(ConfigError, match=r"model\.vision\.act.*'gelu' or 'quick_gelu'"):
        validate_component(ENCODERS, {"name": tower, "act": "relu"}, "model.vision", "clip.yaml")
