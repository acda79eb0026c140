"""The CLIP towers and model: open_clip equivalence, gradients, checkpointing, masking, timm towers, errors."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CustomTextCLIP
from torch import nn

import mmptm
from mmptm.encoders import CLIP, Attention, TextTransformer, TimmVisionTower, VisionTransformer
from mmptm.registry import ENCODERS, MODELS

EMBED_DIM = 32
VOCAB = 100
VISION = {"name": "vit", "image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 2}
TEXT = {"name": "text_transformer", "context_length": 16, "width": 48, "heads": 4, "layers": 2}
EOT = 3


def tiny_clip(**options) -> CLIP:
    return CLIP(EMBED_DIM, vision=VISION, text=TEXT, vocab_size=VOCAB, **options)


def images(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def tokens(batch: int = 4, seed: int = 0, eot: int = VOCAB - 1) -> torch.Tensor:
    """Captions of different lengths ending in ``eot``, right-padded with 0."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(4, VOCAB - 1, (batch, TEXT["context_length"]), generator=generator)
    for row, length in enumerate(torch.randint(2, TEXT["context_length"], (batch,), generator=generator).tolist()):
        text[row, length] = eot
        text[row, length + 1 :] = 0
    return text


def contrastive_loss(out: dict) -> torch.Tensor:
    """CLIP's symmetric InfoNCE, or SigLIP's pairwise sigmoid loss when the model has a logit bias."""
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    if "logit_bias" in out:
        labels = 2 * torch.eye(len(logits)) - 1
        return -F.logsigmoid(labels * (logits + out["logit_bias"])).mean()
    target = torch.arange(len(logits))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# --------------------------------------------------------------------------- reference equivalence


@pytest.mark.parametrize("eot_id", [None, EOT], ids=["argmax_pool", "eot_pool"])
def test_matches_open_clip_with_the_same_weights(eot_id):
    torch.manual_seed(0)
    text_cfg = {k: v for k, v in TEXT.items() if k != "name"}
    pooling = {"pool_type": "argmax"} if eot_id is None else {"pool_type": "eos", "eos_id": eot_id}
    reference = CustomTextCLIP(
        EMBED_DIM,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        text_cfg={**text_cfg, "vocab_size": VOCAB, **pooling},
        init_logit_bias=-10.0,
        output_dict=True,
    ).eval()
    model = tiny_clip(init_logit_bias=-10.0, eot_id=eot_id).eval()

    assert list(model.state_dict()) == list(reference.state_dict())  # same names, no mapping
    model.load_state_dict(reference.state_dict())
    image, text = images(), tokens(eot=VOCAB - 1 if eot_id is None else eot_id)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(image), reference.encode_image(image))
        torch.testing.assert_close(model.encode_text(text), reference.encode_text(text))
        ours, theirs = model(image, text), reference(image, text)
    for key in ("image_features", "text_features", "logit_scale", "logit_bias"):
        torch.testing.assert_close(ours[key], theirs[key])


def test_attention_matches_multihead_attention():
    torch.manual_seed(0)
    width, heads, batch, length = 64, 4, 3, 10
    ours, reference = Attention(width, heads), nn.MultiheadAttention(width, heads, batch_first=True)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(batch, length, width)
    keep = torch.ones(batch, length, dtype=torch.bool)
    keep[0, 6:] = keep[2, 3:] = False  # right padding
    causal_blocked = torch.ones(length, length, dtype=torch.bool).triu(1)

    def expected(**kwargs):
        return reference(x, x, x, need_weights=False, **kwargs)[0]

    torch.testing.assert_close(ours(x), expected())
    torch.testing.assert_close(ours(x, is_causal=True), expected(attn_mask=causal_blocked))
    torch.testing.assert_close(ours(x, attn_mask=keep), expected(key_padding_mask=~keep))
    torch.testing.assert_close(
        ours(x, attn_mask=keep, is_causal=True), expected(key_padding_mask=~keep, attn_mask=causal_blocked)
    )
    full_mask = torch.rand(batch, length, length) > 0.3
    full_mask[:, :, 0] = True  # every query keeps a key
    torch.testing.assert_close(
        ours(x, attn_mask=full_mask), expected(attn_mask=(~full_mask).repeat_interleave(heads, dim=0))
    )


# --------------------------------------------------------------------------- training behaviour


@pytest.mark.parametrize("logit_bias", [None, -10.0], ids=["clip_loss", "siglip_loss"])
def test_gradients_reach_every_parameter(logit_bias):
    model = tiny_clip(init_logit_bias=logit_bias, eot_id=EOT).train()
    contrastive_loss(model(images(), tokens(eot=EOT))).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_grad_checkpointing_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = tiny_clip().train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    assert checkpointed.visual.transformer.grad_checkpointing and checkpointed.text.transformer.grad_checkpointing

    image, text = images(), tokens()
    outputs = []
    for model in (plain, checkpointed):
        out = model(image, text)
        contrastive_loss(out).backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1])
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_uint8_pixels_are_normalised_with_the_towers_mean_and_std():
    from mmptm.data_pipelines.transforms import normalize_pixels

    torch.manual_seed(0)
    model = tiny_clip()
    pixels = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    floats = normalize_pixels(pixels, model.image_mean, model.image_std)
    expected = (pixels.float() / 255 - torch.tensor(model.image_mean).view(3, 1, 1)) / torch.tensor(
        model.image_std).view(3, 1, 1)
    torch.testing.assert_close(floats, expected)
    assert torch.equal(model.encode_image(pixels), model.encode_image(floats))
    text = tokens()
    for sub_batch in (None, 2):  # GradCache's chunks too; the loss and every gradient as with float input
        grads = []
        for image in (pixels, floats):
            model.zero_grad()
            contrastive_loss(model(image, text, sub_batch=sub_batch)).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_logit_scale_is_clamped_at_max_logit_scale():
    model = tiny_clip(init_logit_scale=10.0, max_logit_scale=100.0)
    assert model(text=tokens())["logit_scale"].item() == pytest.approx(100.0)
    assert model(text=tokens())["image_features"] is None


# --------------------------------------------------------------------------- text tower


def test_text_tower_drops_the_columns_after_the_last_end_of_text_token_exactly():
    """Features and every gradient equal open_clip's, which runs all 16 positions; ours runs 10."""
    torch.manual_seed(0)
    text_cfg = {k: v for k, v in TEXT.items() if k != "name"}
    reference = CustomTextCLIP(
        EMBED_DIM,
        vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        text_cfg={**text_cfg, "vocab_size": VOCAB, "pool_type": "argmax"},
        output_dict=True,
    ).double()  # float64: the two sum the gradients in different orders
    model = tiny_clip().double()
    model.load_state_dict(reference.state_dict())
    text = tokens()[:, :10].clone()
    text[:, -1] = torch.where(text.max(dim=1).values == VOCAB - 1, text[:, -1], VOCAB - 1)
    text = torch.cat([text, torch.zeros(4, 6, dtype=torch.long)], dim=1)  # 6 columns of padding only
    lengths = []
    model.text.transformer.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    ours, theirs = model.encode_text(text), reference.encode_text(text)
    torch.testing.assert_close(ours, theirs)
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    assert lengths == [int(model.text.eot_positions(text).max()) + 1] and lengths[0] <= 10
    for (name, mine), (_, ref) in zip(model.text.named_parameters(), reference.text.named_parameters(), strict=True):
        torch.testing.assert_close(mine.grad, ref.grad, msg=lambda m, name=name: f"{name}: {m}")
    assert model.encode_text(text[:0]).shape == (0, EMBED_DIM)  # an empty batch has nothing to trim


def test_text_transformer_is_causal():
    torch.manual_seed(0)
    tower = TextTransformer(EMBED_DIM, VOCAB, context_length=16, width=32, heads=2, layers=2).eval()
    hidden = []
    tower.transformer.register_forward_hook(lambda module, inputs, output: hidden.append(output))
    text = torch.randint(4, VOCAB - 2, (4, 16), generator=torch.Generator().manual_seed(0))
    text[:, -1] = VOCAB - 1  # no padding: all 16 positions run
    changed = text.clone()
    changed[:, 8] = (changed[:, 8] + 1) % VOCAB
    with torch.no_grad():
        tower(text), tower(changed)
    torch.testing.assert_close(hidden[0][:, :8], hidden[1][:, :8])
    assert not torch.allclose(hidden[0][:, 8], hidden[1][:, 8])


def test_eot_pooling_ignores_padding_and_handles_a_missing_eot():
    torch.manual_seed(0)
    tower = TextTransformer(EMBED_DIM, VOCAB, context_length=16, width=32, heads=2, layers=1, eot_id=EOT).eval()
    text = torch.tensor([[5, 6, EOT, 0, 0, 0], [5, 6, 7, 8, EOT, 0], [5, 6, 7, 0, 0, 0]])
    assert tower.eot_positions(text).tolist() == [2, 4, 2]  # the last row lost its eot: last real token
    garbage_after_eot = text.clone()
    garbage_after_eot[:2, 5] = 42
    with torch.no_grad():
        torch.testing.assert_close(tower(text)[:2], tower(garbage_after_eot)[:2])
        torch.testing.assert_close(tower(text), tower(text[:, :5]))


# --------------------------------------------------------------------------- timm towers


@pytest.mark.parametrize(("timm_model", "proj"), [("test_vit", "linear"), ("test_resnet", "mlp")])
def test_timm_tower(timm_model, proj):
    tower = TimmVisionTower(EMBED_DIM, timm_model=timm_model, image_size=32, proj=proj)
    assert tower.image_size == 32
    assert tower.image_mean == (0.5, 0.5, 0.5)  # timm's pretrained_cfg for these models
    tower.set_grad_checkpointing(True)
    features = tower(images(2))
    assert features.shape == (2, EMBED_DIM)
    features.sum().backward()
    assert all(p.grad is not None for p in tower.head.parameters())


def test_clip_picks_the_timm_tower_from_a_timm_model_key():
    model = CLIP(EMBED_DIM, vision={"timm_model": "test_vit", "image_size": 32}, text=TEXT, vocab_size=VOCAB)
    assert isinstance(model.visual, TimmVisionTower)
    assert (model.image_size, model.image_mean, model.image_std) == (32, (0.5,) * 3, (0.5,) * 3)
    out = model(images(2), tokens(2))
    assert out["image_features"].shape == out["text_features"].shape == (2, EMBED_DIM)


def test_unknown_timm_model_suggests_a_name():
    with pytest.raises(ValueError, match="unknown 'timm_model' 'test_vitt'; did you mean 'test_vit"):
        TimmVisionTower(EMBED_DIM, timm_model="test_vitt")


# --------------------------------------------------------------------------- construction and errors


def test_create_model_builds_clip_from_config_with_tokenizer_values():
    assert {"vit", "timm", "text_transformer"} <= set(ENCODERS.names()) and "clip" in MODELS
    tokenizer = types.SimpleNamespace(vocab_size=VOCAB, pad_id=0, eos_id=EOT)
    config = {"name": "clip", "embed_dim": EMBED_DIM, "vision": VISION, "text": TEXT}
    model = mmptm.create_model(config, tokenizer=tokenizer)
    assert isinstance(model.visual, VisionTransformer) and model.visual.input_key == "image"
    assert (model.text.vocab_size, model.text.pad_id, model.text.eot_id) == (VOCAB, 0, EOT)
    assert model.text.input_key == "text"
    assert model.image_size == 32 and len(model.image_mean) == len(model.image_std) == 3


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: VisionTransformer(EMBED_DIM, image_size=30, patch_size=8), r"'image_size' \(30\).*'patch_size' \(8\)"),
        (lambda: VisionTransformer(EMBED_DIM, width=30, heads=4), r"'width' \(30\).*'heads' \(4\)"),
        (lambda: CLIP(EMBED_DIM, vision={**VISION, "patch_size": 5}, text=TEXT, vocab_size=VOCAB), "model.vision:"),
        (lambda: CLIP(EMBED_DIM, vision=VISION, text={**TEXT, "layers": 0}, vocab_size=VOCAB), "model.text:.*'layers'"),
        (lambda: tiny_clip().encode_image(torch.zeros(1, 3, 64, 64)), "expected 32x32 images"),
        (lambda: tiny_clip().encode_text(torch.zeros(1, 17, dtype=torch.long)), r"'context_length' \(16\)"),
        (lambda: Attention(8, 2)(torch.zeros(1, 3, 8), attn_mask=torch.zeros(1, 3)), "must be boolean"),
    ],
    ids=["image_size", "heads", "clip_vision", "clip_text", "image_shape", "text_length", "mask_dtype"],
)
def test_bad_options_raise_value_error_naming_the_option(build, match):
    with pytest.raises(ValueError, match=match):
        build()
