"""Checkpoint import/export: OpenCLIP (ViT-B-32, ViT-B-16, RN50) and Hugging Face CLIPModel, random-initialised.

Each imported model must give the reference's image and text embeddings on the
same inputs (1e-4 max abs difference) and carry its logit scale over.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmptm
import mmptm.interop
from mmptm.interop.common import ConversionError

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")


def open_clip_bpe() -> Path:
    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


TEXTS = ["a photo of a cat.", "Un chat écrit à la main, 123!", ""]


def reference_inputs(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, image_size, image_size, generator=generator), open_clip.tokenize(TEXTS)


def assert_same_embeddings(ours, reference_image, reference_text, images, tokens) -> None:
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), reference_image(images), atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.encode_text(tokens), reference_text(tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("name", "suffix"), [("ViT-B-32", ".pt"), ("ViT-B-16", ".safetensors"), ("RN50", ".bin")]
)
def test_open_clip_import_gives_the_same_embeddings(tmp_path, name, suffix):
    torch.manual_seed(0)
    reference = open_clip.create_model(name, pretrained=None).eval()
    with torch.no_grad():
        reference.logit_scale.fill_(3.21)
        if name == "RN50":  # fresh BatchNorms are the identity and zeroed bn3 scales mute the residual branches
            for module in reference.visual.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.weight.uniform_(0.5, 1.5)
                    module.running_mean.normal_(0, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
    weights = tmp_path / f"weights{suffix}"
    state = reference.state_dict()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    else:  # an open_clip training checkpoint, DDP prefixes and all
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, weights)

    out = mmptm.interop.import_open_clip(weights, tmp_path / "ckpt", model_name=name)
    model, tokenizer, preprocess = mmptm.load_pretrained(out)
    images, tokens = reference_inputs(224)
    torch.testing.assert_close(tokenizer(TEXTS), tokens, rtol=0, atol=0)
    assert_same_embeddings(model, reference.encode_image, reference.encode_text, images, tokens)
    assert model.logit_scale.item() == pytest.approx(3.21)
    assert model.visual.image_size == 224


def test_quick_gelu_comes_from_the_model_name(tmp_path):
    reference = open_clip.create_model("RN50-quickgelu", pretrained=None).eval()
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    model, _, _ = mmptm.load_pretrained(
        mmptm.interop.import_open_clip(tmp_path / "w.pt", tmp_path / "ckpt", model_name="RN50-quickgelu")
    )
    assert model.text.transformer.act == "quick_gelu"
    tokens = open_clip.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), reference.encode_text(tokens), atol=1e-4, rtol=0)


def hf_clip_folder(path: Path) -> transformers.CLIPModel:
    """A default-config CLIPModel (ViT-B/32, QuickGELU) with random weights, saved with a CLIP BPE tokenizer."""
    from mmptm.data_pipelines.tokenizer import load_tokenizer

    torch.manual_seed(0)
    reference = transformers.CLIPModel(transformers.CLIPConfig()).eval()
    reference.save_pretrained(path)
    load_tokenizer(open_clip_bpe()).save(path)
    return reference


def hf_features(reference: transformers.CLIPModel):
    def image(x):
        return reference.get_image_features(pixel_values=x).pooler_output

    def text(t):
        return reference.get_text_features(input_ids=t).pooler_output

    return image, text


def test_hugging_face_import_gives_the_same_embeddings(tmp_path):
    reference = hf_clip_folder(tmp_path / "hf")
    model, tokenizer, _ = mmptm.load_pretrained(mmptm.interop.import_hf_clip(tmp_path / "hf", tmp_path / "ckpt"))
    images, tokens = reference_inputs(224)
    torch.testing.assert_close(tokenizer(TEXTS), tokens, rtol=0, atol=0)
    assert_same_embeddings(model, *hf_features(reference), images, tokens)
    assert model.logit_scale.item() == pytest.approx(reference.logit_scale.item())
    assert model.text.transformer.act == "quick_gelu"


def test_round_trip_through_hugging_face_is_exact(tmp_path):
    hf_clip_folder(tmp_path / "hf")
    first = mmptm.interop.import_hf_clip(tmp_path / "hf", tmp_path / "a")
    exported = mmptm.interop.export_hf_clip(first, tmp_path / "exported")
    reloaded = transformers.CLIPModel.from_pretrained(exported).eval()
    second = mmptm.interop.import_hf_clip(exported, tmp_path / "b")
    a, b = mmptm.load_pretrained(first).model, mmptm.load_pretrained(second).model
    for (key, x), (key_b, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert key == key_b
        assert torch.equal(x, y), key
    images, tokens = reference_inputs(224)
    assert_same_embeddings(a, *hf_features(reloaded), images, tokens)
    hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(exported)
    encoded = hf_tokenizer(TEXTS[:2], padding="max_length", max_length=77, return_tensors="pt")
    # Hugging Face pads with <|endoftext|>, open_clip and mmptm with 0; pooling reads the first end-of-text.
    torch.testing.assert_close(encoded["input_ids"] * encoded["attention_mask"], tokens[:2], rtol=0, atol=0)


def test_a_trained_mmptm_clip_exports_to_hugging_face(tmp_path, demo):
    run = tmp_path / "run"
    config = mmptm.load_config(
        "clip_tiny.yaml",
        ["model.embed_dim=32", "model.vision.width=32", "model.vision.layers=1", "model.vision.heads=2",
         "model.text.width=32", "model.text.layers=1", "model.text.heads=2", "data.train.batch_size=16",
         "data.train.num_workers=0", "train.max_steps=2", "train.progress_bar=false", "eval.zeroshot=null"],
    )
    mmptm.train(config, output_dir=run)
    model, tokenizer, _ = mmptm.load_pretrained(run)
    exported = mmptm.interop.export_hf_clip(run, tmp_path / "hf")
    reference = transformers.CLIPModel.from_pretrained(exported).eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = tokenizer(["a handwritten seven.", "un sept écrit à la main."])
    assert_same_embeddings(model, *hf_features(reference), images, tokens)


def test_unknown_architectures_are_rejected_clearly(tmp_path):
    timm_like = {"visual.trunk.stem.0.weight": torch.zeros(8, 3, 3, 3), "text.text_projection": torch.zeros(8, 4),
                 "text.token_embedding.weight": torch.zeros(10, 8), "text.ln_final.weight": torch.zeros(8),
                 "text.positional_embedding": torch.zeros(5, 8),
                 "text.transformer.resblocks.0.mlp.c_fc.weight": torch.zeros(32, 8)}
    torch.save(timm_like, tmp_path / "timm.pt")
    with pytest.raises(ConversionError, match=r"unknown image tower .*visual\.\{trunk\}"):
        mmptm.interop.import_open_clip(tmp_path / "timm.pt", tmp_path / "out", tokenizer=open_clip_bpe())
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pt")
    proc = subprocess.run(
        [sys.executable, "-m", "mmptm.cli", "convert", "open_clip", str(tmp_path / "other.pt"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "no CLIP text transformer" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConversionError, match="model_type 'bert' is not supported"):
        mmptm.interop.import_hf_clip(tmp_path / "bert", tmp_path / "out2")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_training_starts_from_an_imported_checkpoint(tmp_path, demo):
    import yaml

    from mmptm.config import ConfigError
    from mmptm.data_pipelines.tokenizer import load_tokenizer
    from mmptm.training.trainer import Trainer

    hf_dir = tmp_path / "hf"
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = transformers.CLIPConfig(
        text_config={**small, "max_position_embeddings": 24},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    transformers.CLIPModel(config).save_pretrained(hf_dir)
    load_tokenizer(open_clip_bpe()).save(hf_dir)
    checkpoint = mmptm.interop.import_hf_clip(hf_dir, tmp_path / "ckpt")

    run_config = yaml.safe_load(Path(mmptm.config.resolve_config_path("clip_tiny.yaml")).read_text())
    run_config["model"] = yaml.safe_load((checkpoint / "config.yaml").read_text())["model"]
    run_config["tokenizer"] = {"path": str(checkpoint), "context_length": 24}
    run_config["train"].update(init_from=str(checkpoint), max_steps=3, progress_bar=False, log_every=1)
    run_config["data"]["train"].update(batch_size=16, num_workers=0)
    run_config["eval"]["zeroshot"].update(languages=["en"], num_workers=0)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config))

    trainer = Trainer(mmptm.load_config(tmp_path / "run.yaml"), output_dir=tmp_path / "run")
    imported = mmptm.load_pretrained(checkpoint).model.state_dict()
    assert all(torch.equal(v, imported[k]) for k, v in trainer.model.state_dict().items())
    metrics = trainer.fit()
    assert 0 <= metrics["eval/zeroshot_top1"] <= 1
    model, tokenizer, _ = mmptm.load_pretrained(tmp_path / "run")
    assert type(tokenizer).__name__ == "ClipBPETokenizer" and tokenizer.vocab_size == 49408

    with pytest.raises(ConfigError, match="train.init_from"):
        Trainer(mmptm.load_config(tmp_path / "run.yaml", ["model.embed_dim=8"]), output_dir=tmp_path / "run2")


def test_openai_torchscript_archives_import_with_quick_gelu(tmp_path):
    """OpenAI's original files are TorchScript archives of QuickGELU models with 64-wide heads."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    reference = CLIP(
        32,
        CLIPVisionCfg(layers=1, width=128, patch_size=8, image_size=32),
        CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
        quick_gelu=True,
    ).eval()
    torch.jit.save(torch.jit.script(reference), tmp_path / "ViT-tiny.pt")
    model, _, _ = mmptm.load_pretrained(mmptm.interop.import_open_clip(tmp_path / "ViT-tiny.pt", tmp_path / "ckpt"))
    assert model.visual.transformer.act == model.text.transformer.act == "quick_gelu"
    images, tokens = reference_inputs(32)
    assert_same_embeddings(model, reference.encode_image, reference.encode_text, images, tokens)
