"""Hugging Face CLIPModel import/export edge cases: sharded weights, transformers-5 folders, eos id 2.

Tiny random-initialised models (width 32, 1-2 layers); every import is checked
against ``transformers.CLIPModel`` on the same inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mmptm
import mmptm.interop
from mmptm.interop.common import ConversionError, write_checkpoint

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

TEXTS = ["a photo of a cat.", "Un chat écrit à la main, 123!", "", "hello   world!! <|endoftext|> ünïcödé"]
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def open_clip_bpe() -> Path:
    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def tiny_hf_clip() -> transformers.CLIPModel:
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={**SMALL, "max_position_embeddings": 24},
        vision_config={**SMALL, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    return transformers.CLIPModel(config).eval()


def assert_same_features(model, reference: transformers.CLIPModel, tokens: torch.Tensor) -> None:
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(images), reference.get_image_features(pixel_values=images).pooler_output,
            atol=1e-5, rtol=0,
        )
        torch.testing.assert_close(
            model.encode_text(tokens), reference.get_text_features(input_ids=tokens).pooler_output,
            atol=1e-5, rtol=0,
        )


def test_sharded_weights_import(tmp_path):
    from mmptm.data_pipelines.tokenizer import load_tokenizer

    reference = tiny_hf_clip()
    reference.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    load_tokenizer(open_clip_bpe()).save(tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model, tokenizer, _ = mmptm.load_pretrained(mmptm.interop.import_hf_clip(tmp_path / "hf", tmp_path / "ckpt"))
    assert_same_features(model, reference, tokenizer(TEXTS))


def test_export_refuses_an_end_of_text_id_of_2(tmp_path):
    """CLIPTextModel pools by argmax over ids when eos_token_id == 2, so such an export would be wrong."""
    import sentencepiece as spm

    from mmptm.data_pipelines.fairseq_spm import FairseqSentencePieceTokenizer
    from mmptm.models import create_model

    corpus = ["the lazy fox jumps over the dog", "le chien brun dort", "a photo of a cat", "zebra xylophone"] * 50
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=32, model_type="unigram",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
    )
    tokenizer = FairseqSentencePieceTokenizer(tmp_path / "sp.model", 16)
    assert tokenizer.eos_id == 2
    config = {"name": "clip", "embed_dim": 16,
              "vision": {"name": "vit", "image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
              "text": {"name": "text_transformer", "context_length": 16, "width": 32, "layers": 1, "heads": 2}}
    checkpoint = write_checkpoint(tmp_path / "ckpt", config, create_model(config, tokenizer=tokenizer).state_dict(),
                                  tokenizer, source="test")
    with pytest.raises(ConversionError, match=r"end-of-text id is 2 .*legacy config"):
        mmptm.interop.export_hf_clip(checkpoint, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def transformers5_folder(path: Path, string_merges: bool = False) -> transformers.CLIPModel:
    """A CLIPModel + CLIPProcessor saved as transformers 5 does: tokenizer.json and processor_config.json only."""
    from mmptm.data_pipelines.tokenizer import load_tokenizer

    load_tokenizer(open_clip_bpe()).save(path / "bpe")
    processor = transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size=32, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]
        ),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(path / "bpe"),
    )
    reference = tiny_hf_clip()
    reference.save_pretrained(path / "hf")
    processor.save_pretrained(path / "hf")
    for name in ("vocab.json", "merges.txt", "preprocessor_config.json"):  # what transformers < 5 would add
        (path / "hf" / name).unlink(missing_ok=True)
    if string_merges:  # tokenizers < 0.20 wrote merges as "a b" strings
        tokenizer_file = path / "hf" / "tokenizer.json"
        data = json.loads(tokenizer_file.read_text(encoding="utf-8"))
        data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]
        tokenizer_file.write_text(json.dumps(data), encoding="utf-8")
    return reference


@pytest.mark.parametrize("string_merges", [False, True])
def test_transformers5_folder_imports_with_its_tokenizer_and_normalisation(tmp_path, string_merges):
    reference = transformers5_folder(tmp_path, string_merges)
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and not (tmp_path / "hf" / "vocab.json").exists()
    model, tokenizer, _ = mmptm.load_pretrained(mmptm.interop.import_hf_clip(tmp_path / "hf", tmp_path / "ckpt"))
    assert model.image_mean == (0.5, 0.4, 0.3) and model.image_std == (0.2, 0.25, 0.3)
    hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp_path / "bpe")
    texts = TEXTS[:2] + ["two  dogs playing", "A PHOTO, of 3 cats; and 1 dog."]
    encoded = hf_tokenizer(texts, padding="max_length", max_length=24, return_tensors="pt")
    tokens = tokenizer(texts)
    assert tokens.shape == (len(texts), 24)
    # Hugging Face pads with <|endoftext|>, mmptm with 0 (pooling reads the first end-of-text).
    torch.testing.assert_close(encoded["input_ids"] * encoded["attention_mask"], tokens, rtol=0, atol=0)
    assert_same_features(model, reference, tokens)


def test_tokenizer_json_that_is_not_a_bpe_is_refused(tmp_path):
    tiny_hf_clip().save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ConversionError, match=r"tokenizer\.json: not a BPE tokenizer"):
        mmptm.interop.import_hf_clip(tmp_path / "hf", tmp_path / "ckpt")
