"""ViLBERT: co-attention placement (the image reaches the text stream only through co-attention), its config."""

from __future__ import annotations

import types

import pytest
import torch

import mmptm
from mmptm.objectives import ImageTextMatching, MaskedRegionModelling, VisionLanguageMLM

TOKENIZER = types.SimpleNamespace(vocab_size=50, pad_id=0, eos_id=3, bos_id=2, mask_id=4)
TINY_VIT = {"name": "vit", "image_size": 16, "patch_size": 8, "width": 16, "layers": 1, "heads": 2}


def tiny_vilbert(**options) -> torch.nn.Module:
    config = {
        "name": "vilbert", "text_width": 16, "text_layers": 3, "text_heads": 2, "visual_width": 12,
        "visual_layers": 2, "visual_heads": 2, "coattention_width": 8, "coattention_heads": 2,
        "text_coattention_ids": [2, 3], "visual_coattention_ids": [0, 1], "visual_dim": 10, "max_text_length": 8,
        "region_classes": 5, "vision": TINY_VIT, **options,
    }
    return mmptm.create_model(config, tokenizer=TOKENIZER)


def captions(batch: int) -> torch.Tensor:
    tokens = torch.randint(5, TOKENIZER.vocab_size, (batch, 8), generator=torch.Generator().manual_seed(0))
    tokens[:, 0], tokens[:, 5], tokens[:, 6:] = 2, 3, 0
    return tokens


def test_image_reaches_text_only_after_the_first_coattention_layer():
    model = tiny_vilbert().eval()
    text = captions(2)
    first = model(text, image=torch.randn(2, 3, 16, 16), text_layers=True).text_layers
    second = model(text, image=torch.randn(2, 3, 16, 16), text_layers=True).text_layers
    # Text states: embeddings, then after text layers 1 and 2, co-attention 1, text layer 3, co-attention 2.
    assert len(first) == 6
    before = model.text_coattention_ids[0] + 1  # the embeddings and the text layers before co-attention 1
    for i in range(before):
        torch.testing.assert_close(first[i], second[i], rtol=0, atol=0)
    for i in range(before, len(first)):
        assert not torch.allclose(first[i], second[i]), f"text state {i} ignores the image"


def test_streams_have_their_own_widths_and_img_token():
    model = tiny_vilbert()
    out = model(captions(2), image=torch.randn(2, 3, 16, 16), mlm=True)
    assert out.text.shape == (2, 8, 16) and out.visual.shape == (2, 5, 12)  # [IMG] dropped: class + 4 patches
    assert out.itm_logits.shape == (2, 2) and out.mlm_logits.shape == (2, 8, TOKENIZER.vocab_size)


@pytest.mark.parametrize(
    ("text_ids", "visual_ids", "match"),
    [([2], [0, 1], "same length"), ([3, 2], [0, 1], "non-decreasing"), ([2, 4], [0, 1], "between 0 and 3")],
)
def test_bad_coattention_placement_names_the_field(text_ids, visual_ids, match):
    with pytest.raises(ValueError, match=match):
        tiny_vilbert(text_coattention_ids=text_ids, visual_coattention_ids=visual_ids)


def test_shared_objectives_run_on_vilbert():
    model = tiny_vilbert()
    batch = {"text": captions(4), "image": torch.randn(4, 3, 16, 16), "label": torch.arange(4)}
    for objective in (ImageTextMatching(hard_candidates=2), VisionLanguageMLM(), MaskedRegionModelling()):
        out = objective(model, batch)
        out["loss"].backward()
        assert torch.isfinite(out["loss"])
    assert model.coattention_layers[0].text_attention.key.weight.grad is not None
