"""Clear errors from model building: missing tokenizer values, towers without grad checkpointing, unknown names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import mmptm
from mmptm.config import ConfigError
from mmptm.data_pipelines.tokenizer import load_tokenizer
from mmptm.models import create_model

TINY_TEXT = {"name": "text_transformer", "context_length": 8, "width": 32, "layers": 1, "heads": 2}
TINY_VIT = {"name": "vit", "image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}


@mmptm.register_encoder("test_models_errors_signal")
class SignalEncoder(nn.Module):
    """A user encoder without ``set_grad_checkpointing``, as the README's example."""

    input_key = "signal"

    def __init__(self, embed_dim: int, signal_length: int = 16) -> None:
        super().__init__()
        self.proj = nn.Linear(signal_length, embed_dim)

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        return self.proj(signal)


def test_grad_checkpointing_with_a_tower_lacking_it_names_the_class_and_the_method():
    model = create_model({"name": "clip", "embed_dim": 16, "vision": {"name": "test_models_errors_signal"},
                          "text": TINY_TEXT}, vocab_size=50, eot_id=49)
    with pytest.raises(ConfigError, match=r"model\.vision \(SignalEncoder\).*set_grad_checkpointing\(enable"):
        model.set_grad_checkpointing(True)
    model.set_grad_checkpointing(False)  # nothing to turn off in the user tower: no error
    assert not model.text.transformer.grad_checkpointing


def test_grad_checkpointing_still_reaches_both_builtin_towers():
    model = create_model({"name": "clip", "embed_dim": 16, "vision": TINY_VIT, "text": TINY_TEXT}, vocab_size=50)
    model.set_grad_checkpointing(True)
    assert model.visual.transformer.grad_checkpointing and model.text.transformer.grad_checkpointing


def test_clip_without_a_tokenizer_says_to_pass_one():
    with pytest.raises(ConfigError, match=r"needs 'vocab_size'.*pass tokenizer="):
        create_model("clip")


def test_tokenizer_values_as_keyword_arguments_match_the_tokenizer():
    open_clip = pytest.importorskip("open_clip")
    tokenizer = load_tokenizer(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz")
    config = {"name": "clip", "embed_dim": 16, "vision": TINY_VIT, "text": TINY_TEXT}
    by_tokenizer = create_model(config, tokenizer=tokenizer)
    by_values = create_model(config, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, eot_id=tokenizer.eos_id)
    for name in ("vocab_size", "pad_id", "eot_id"):
        assert getattr(by_values.text, name) == getattr(by_tokenizer.text, name)
    assert create_model(config, tokenizer=tokenizer, vocab_size=77).text.vocab_size == 77
    with pytest.raises(ConfigError, match="filled in at run time"):
        create_model({**config, "vocab_size": 50})


def test_unknown_architecture_in_a_checkpoint_hints_at_imports(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "not_registered_anywhere"}}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"not_registered_anywhere.*imports:"):
        mmptm.load_pretrained(tmp_path)
