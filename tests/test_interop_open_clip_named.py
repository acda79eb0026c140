"""open_clip imports with ``--model``: open_clip's head-count rules, and refusal of feature-changing options.

Tiny random-initialised models registered as open_clip model configs; imports
must give open_clip's image and text features (1e-5).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mmptm
import mmptm.interop
from mmptm.interop.common import ConversionError

open_clip = pytest.importorskip("open_clip")

TEXTS = ["a photo of a cat.", "two dogs", ""]
TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 64, "layers": 1}  # no heads: open_clip's 8
VIT_CFG = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1}


def register(tmp_path: Path, name: str, vision_cfg: dict, text_cfg: dict) -> str:
    """Register an open_clip model config named ``name`` (unique per test: open_clip's registry is global)."""
    folder = tmp_path / "configs"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({"embed_dim": 32, "vision_cfg": vision_cfg, "text_cfg": text_cfg}))
    open_clip.add_model_config(folder)
    return name


def save_reference(tmp_path: Path, name: str) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    reference = open_clip.create_model(name, pretrained=None).eval()
    with torch.no_grad():
        for module in reference.visual.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # fresh BatchNorms are the identity
                module.weight.uniform_(0.5, 1.5)
        if hasattr(reference.visual, "attnpool"):  # sharpen attention so the head split shows
            reference.visual.attnpool.q_proj.weight.mul_(20)
            reference.visual.attnpool.k_proj.weight.mul_(20)
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    return reference, tmp_path / "w.pt"


def test_modified_resnet_heads_follow_open_clips_rule(tmp_path):
    """ModifiedResNet: width * 32 // head_width attention-pool heads; text: open_clip's default of 8 heads."""
    name = register(tmp_path, "mmptm-test-RN-hw32",
                    {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32}, TEXT_CFG)
    reference, weights = save_reference(tmp_path, name)
    model, tokenizer, _ = mmptm.load_pretrained(mmptm.interop.import_open_clip(weights, tmp_path / "ck", name))
    assert model.visual.attnpool.heads == reference.visual.attnpool.num_heads == 16
    assert model.text.transformer.resblocks[0].attn.heads == 8
    images, tokens = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)), tokenizer(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(tokens), reference.encode_text(tokens), atol=1e-5, rtol=0)


def test_vit_heads_with_head_width(tmp_path):
    name = register(tmp_path, "mmptm-test-ViT-hw16", {**VIT_CFG, "head_width": 16}, {**TEXT_CFG, "heads": 4})
    reference, weights = save_reference(tmp_path, name)
    model, tokenizer, _ = mmptm.load_pretrained(mmptm.interop.import_open_clip(weights, tmp_path / "ck", name))
    assert model.visual.transformer.resblocks[0].attn.heads == 4
    images, tokens = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), tokenizer(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(tokens), reference.encode_text(tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("vision_extra", "text_extra", "message"),
    [
        ({"pool_type": "avg"}, {}, r"vision_cfg\.pool_type = 'avg'.*accepted: 'tok'"),
        ({"pool_type": "avg", "final_ln_after_pool": True}, {}, r"vision_cfg\.pool_type = 'avg'"),
        ({}, {"no_causal_mask": True}, r"text_cfg\.no_causal_mask = True.*accepted: False"),
        ({}, {"pool_type": "last"}, r"text_cfg\.pool_type = 'last'.*accepted: 'argmax' or 'eos'"),
        ({}, {"pool_type": "eos"}, r"text_cfg\.pool_type 'eos' pools at eos_id 2.*end-of-text id 49407"),
        ({"norm_kwargs": {"eps": 1e-6}}, {}, r"vision_cfg\.norm_kwargs"),
    ],
)
def test_feature_changing_options_are_refused_with_model(tmp_path, vision_extra, text_extra, message):
    key = "-".join(f"{k}{v}" for k, v in {**vision_extra, **text_extra}.items() if not isinstance(v, dict))
    name = register(tmp_path, f"mmptm-test-opt-{key or 'norm'}", {**VIT_CFG, **vision_extra},
                    {**TEXT_CFG, **text_extra})
    _, weights = save_reference(tmp_path, name)
    with pytest.raises(ConversionError, match=message):
        mmptm.interop.import_open_clip(weights, tmp_path / "ck", name)
    assert not (tmp_path / "ck").exists()


def test_neutral_options_are_accepted(tmp_path):
    """final_ln_after_pool with single-token pooling, and 'eos' pooling at CLIP's end-of-text id: same features."""
    name = register(tmp_path, "mmptm-test-neutral", {**VIT_CFG, "final_ln_after_pool": True},
                    {**TEXT_CFG, "final_ln_after_pool": True, "pool_type": "eos", "eos_id": 49407})
    reference, weights = save_reference(tmp_path, name)
    model, tokenizer, _ = mmptm.load_pretrained(mmptm.interop.import_open_clip(weights, tmp_path / "ck", name))
    images, tokens = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), tokenizer(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(tokens), reference.encode_text(tokens), atol=1e-5, rtol=0)


def test_open_clips_own_openai_architecture_configs_pass_the_check():
    from mmptm.interop.open_clip import check_named_options

    for name in ("ViT-B-32", "ViT-B-16", "RN50", "RN50-quickgelu", "ViT-L-14"):
        check_named_options(open_clip.get_model_config(name), name)
