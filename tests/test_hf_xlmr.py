"""Hugging Face XLM-R import: a tiny random XLMRobertaForMaskedLM against the multilingual_encoder it becomes."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
import shlex
import shutil
from pathlib import Path

import pytest
import torch

import mmptm
from mmptm.encoders.multilingual import MultilingualEncoder
from mmptm.interop.common import ConversionError
from mmptm.objectives.mlm import concat_pair

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

WORDS = "one two three four five six seven eight nine ten un deux trois quatre cinq eins zwei drei vier fünf"
SENTENCES = ["one two three four", "eins zwei drei vier fünf un deux trois", "cinq", "nine ten un deux"]
PIECES = 40  # sentencepiece pieces; XLM-R's vocabulary adds <pad> and <mask>: 42 ids
HF_OPTIONS = {"vocab_size": PIECES + 2, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 64, "max_position_embeddings": 18, "type_vocab_size": 1, "layer_norm_eps": 1e-5}


def write_sentencepiece(path: Path) -> Path:
    """A tiny sentencepiece model with XLM-R's own ids (<unk>=0, <s>=1, </s>=2, no pad)."""
    rng = random.Random(0)
    corpus = [" ".join(rng.choices(WORDS.split(), k=6)) for _ in range(200)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=PIECES,
                                   model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


def save_hf_xlmr(folder: Path, masked_lm: bool = True, **options) -> torch.nn.Module:
    """A random-initialised XLM-R saved with its tokenizer model, as a Hugging Face folder is."""
    torch.manual_seed(0)
    config = transformers.XLMRobertaConfig(**{**HF_OPTIONS, **options})
    hf_class = transformers.XLMRobertaForMaskedLM if masked_lm else transformers.XLMRobertaModel
    model = hf_class(config).eval()
    with torch.no_grad():  # GELU inputs of size ~1, where the exact GELU and its tanh approximation differ by 1e-4
        for name, weight in model.named_parameters():
            if name.endswith(("intermediate.dense.weight", "lm_head.dense.weight")):
                weight.mul_(10)
    model.save_pretrained(folder)
    write_sentencepiece(folder / "sentencepiece.bpe.model")
    return model


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(the Hugging Face masked-LM model, the mmptm model imported by the CLI, its tokenizer, the folder
    holding ``hf/``, ``mmptm/`` and the CLI's ``report.json``)."""
    from mmptm.cli import main

    root = tmp_path_factory.mktemp("xlmr")
    hf = save_hf_xlmr(root / "hf")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["convert", "hf-xlmr", str(root / "hf"), str(root / "mmptm"), "--languages", "en", "fr", "de",
                     "--context-length", "12"]) == 0
    (root / "report.json").write_text(printed.getvalue())
    model, tokenizer, _ = mmptm.load_pretrained(root / "mmptm")
    return hf, model, tokenizer, root


def test_the_cli_writes_a_checkpoint_that_loads_with_the_tokenizer_and_languages(imported):
    _, model, tokenizer, root = imported
    assert isinstance(model, MultilingualEncoder) and not model.norm_first and model.position_offset == 2
    assert model.languages == ["en", "fr", "de"] and model.language_embedding is None
    assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.mask_id,
            tokenizer.context_length) == (PIECES + 2, 1, 0, 2, PIECES + 1, 12)
    assert (model.pad_id, model.bos_id, model.eos_id, model.mask_id) == (1, 0, 2, PIECES + 1)
    saved = root / "mmptm" / "sentencepiece.bpe.model"
    assert saved.read_bytes() == (root / "hf" / "sentencepiece.bpe.model").read_bytes()


def test_the_printed_overrides_make_a_unicoder_run_whose_model_loads_the_checkpoint(imported):
    from mmptm.config import load_config
    from mmptm.data_pipelines.tokenizer import load_tokenizer
    from mmptm.training.checkpoint import load_weights

    root = imported[3]
    report = json.loads((root / "report.json").read_text())
    assert report["heads_imported"] == ["mlm_head"] and report["dropped"] == []
    config = load_config("unicoder_tiny.yaml", shlex.split(report["train_overrides"]))
    assert config.train.init_from == str(root / "mmptm") and config.tokenizer.path == str(root / "mmptm")
    tokenizer = load_tokenizer(config.tokenizer.path, context_length=config.tokenizer.context_length)
    model = mmptm.create_model(config.model, tokenizer=tokenizer)
    load_weights(model, root / "mmptm" / "model.safetensors")  # strict, as train.init_from loads
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, imported[1].state_dict()[name], rtol=0, atol=0)


def hf_states(hf: torch.nn.Module, tokens: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = hf(input_ids=tokens, attention_mask=(tokens != 1).long(), output_hidden_states=True, **kwargs)
    return out.hidden_states[-1], out.logits


def test_states_and_mlm_logits_equal_transformers_on_a_right_padded_batch(imported):
    hf, model, tokenizer, _ = imported
    tokens = tokenizer(SENTENCES)
    real = tokens != tokenizer.pad_id
    assert not real.all() and real[:, 0].all()  # right-padded rows of different lengths
    expected_states, expected_logits = hf_states(hf, tokens)
    with torch.no_grad():
        states = model(tokens)
        logits = model.mlm_logits(states)
        pooled = model.encode_text(tokens)
    # Padding states differ (Hugging Face gives padding position 1), and nothing reads them.
    torch.testing.assert_close(states[real], expected_states[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[real], expected_logits[real], atol=1e-5, rtol=1e-5)
    mean = (expected_states * real[..., None]).sum(1) / real.sum(1, keepdim=True)
    torch.testing.assert_close(pooled, mean, atol=1e-5, rtol=1e-5)


def test_tlm_pairs_restart_positions_at_the_offset_and_clwr_embeddings_go_through_the_embedding_norm(imported):
    hf, model, tokenizer, _ = imported
    src, tgt = tokenizer(SENTENCES[:2], context_length=8), tokenizer(SENTENCES[2:], context_length=6)
    no_language = torch.zeros(2, dtype=torch.long)
    pair = concat_pair(src, tgt, no_language, no_language)
    real = pair.tokens != tokenizer.pad_id
    # fairseq's positions of each half: 2, 3, ...
    expected, _ = hf_states(hf, pair.tokens, position_ids=pair.positions + 2)
    with torch.no_grad():
        states = model(pair.tokens, languages=pair.languages, positions=pair.positions)
        embedded = model(src, inputs_embeds=model.token_embedding(src) * 0.5)
    torch.testing.assert_close(states[real], expected[real], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        expected_embedded = hf.roberta(inputs_embeds=hf.roberta.embeddings.word_embeddings(src) * 0.5,
                                       attention_mask=(src != 1).long()).last_hidden_state
    keep = src != tokenizer.pad_id
    torch.testing.assert_close(embedded[keep], expected_embedded[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["mmlm", "tlm", "clwr", "clpc"])
def test_objectives_train_the_imported_model(imported, name):
    model, tokenizer = copy.deepcopy(imported[1]).train(), imported[2]  # with XLM-R's dropout
    model.zero_grad(set_to_none=True)
    src, tgt = tokenizer(SENTENCES), tokenizer(SENTENCES[::-1])
    batch = {"tokens": src, "lang": ["en", "fr", "de", "en"], "src_tokens": src, "tgt_tokens": tgt,
             "src_lang": ["en"] * 4, "tgt_lang": ["fr"] * 4}
    objective = mmptm.registry.build(mmptm.registry.OBJECTIVES, {"name": name})
    torch.manual_seed(1)
    loss = objective(model, batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    trained = [n for n, g in grads.items() if g is not None and g.abs().sum() > 0]
    # Every imported tensor is trained by the MLM-headed objectives; CLPC trains the encoder without that head.
    encoder = [n for n in grads if not n.startswith(("mlm_head.", "word_recovery.", "pair_classifier."))]
    assert set(encoder) <= set(trained), sorted(set(encoder) - set(trained))
    if name != "clpc":
        assert {"mlm_head.dense.weight", "mlm_head.norm.weight", "mlm_head.bias"} <= set(trained)
    assert ("word_recovery.weight" in trained) == (name == "clwr")


def test_gradient_checkpointing_and_layer_outputs_in_the_post_norm_layout(imported):
    _, model, tokenizer, _ = imported
    tokens = tokenizer(SENTENCES)

    def gradients(checkpointing: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        model(tokens).square().mean().backward()
        return [p.grad.clone() for p in model.layers.parameters()]

    for plain, checkpointed in zip(gradients(False), gradients(True), strict=True):
        torch.testing.assert_close(plain, checkpointed)
    model.set_grad_checkpointing(False)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        first = model(tokens, layer=1)
        expected = model.layers[0](model.embedding_norm(model.token_embedding(tokens)
                                   + model.position_embedding(torch.arange(12) + 2)), tokens != 1)
        torch.testing.assert_close(first, expected)
        torch.testing.assert_close(model.encode_text(tokens, layer=2), model.encode_text(tokens))


def test_a_sharded_bare_xlm_roberta_model_keeps_mmptms_mlm_head_and_drops_the_pooler(tmp_path):
    from mmptm.interop.xlmr import import_hf_xlmr

    hf = save_hf_xlmr(tmp_path / "hf", masked_lm=False)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="50KB")  # large models are saved in shards
    (tmp_path / "hf" / "model.safetensors").unlink()
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    result = import_hf_xlmr(tmp_path / "hf", tmp_path / "out")
    assert result.heads_imported == [] and result.dropped == ["pooler.dense.bias", "pooler.dense.weight"]
    model, tokenizer, _ = mmptm.load_pretrained(result.output_dir)
    assert tokenizer.context_length == 16  # every position by default
    tokens = tokenizer(SENTENCES)
    with torch.no_grad():
        expected = hf(input_ids=tokens, attention_mask=(tokens != 1).long()).last_hidden_state
        states = model(tokens)
    real = tokens != 1
    torch.testing.assert_close(states[real], expected[real], atol=1e-5, rtol=1e-5)


def test_a_pytorch_model_bin_folder_imports_the_same_model(tmp_path, imported):
    from mmptm.interop.xlmr import import_hf_xlmr

    hf = save_hf_xlmr(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")  # the tied decoder weight included
    model, _, _ = mmptm.load_pretrained(import_hf_xlmr(tmp_path / "hf", tmp_path / "out").output_dir)
    expected = imported[1].state_dict()
    for name, tensor in model.state_dict().items():
        if not name.startswith(("word_recovery.", "pair_classifier.")):  # fresh in both
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"position_embedding_type": "relative_key"},
         r"position_embedding_type='relative_key' is not supported .*accepted: 'absolute'"),
        ({"hidden_act": "gelu_new"}, r"hidden_act='gelu_new' is not supported .*accepted: 'gelu'"),
        ({"pad_token_id": 0}, r"pad_token_id=0 is not supported .*accepted: 1"),
        ({"model_type": "xlm-roberta-xl"}, r"model_type 'xlm-roberta-xl' is not supported \(XLM-R XL/XXL are pre-norm"),
        ({"model_type": "bert"}, r"model_type 'bert' is not supported; accepted: 'xlm-roberta'"),
    ],
)
def test_unsupported_config_values_name_the_key_and_the_accepted_values(tmp_path, change, message):
    from mmptm.interop.xlmr import import_hf_xlmr

    save_hf_xlmr(tmp_path / "hf")
    edit_config(tmp_path / "hf", **change)
    with pytest.raises(ConversionError, match=message):
        import_hf_xlmr(tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_files_and_misfits_name_the_file_or_key(tmp_path):
    from mmptm.interop.xlmr import import_hf_xlmr

    hf = tmp_path / "hf"
    with pytest.raises(ConversionError, match="no config.json"):
        import_hf_xlmr(hf, tmp_path / "out")
    two_types = save_hf_xlmr(hf, type_vocab_size=2)
    with pytest.raises(ConversionError, match=r"type_vocab_size=2 with distinct rows .*accepted: 1"):
        import_hf_xlmr(hf, tmp_path / "out")
    with torch.no_grad():  # a second token type equal to the first cannot change any output: accepted
        two_types.roberta.embeddings.token_type_embeddings.weight[1] = 0.0
        two_types.roberta.embeddings.token_type_embeddings.weight[0] = 0.0
    two_types.save_pretrained(hf)
    assert import_hf_xlmr(hf, tmp_path / "equal_types").heads_imported == ["mlm_head"]
    shutil.rmtree(hf)
    save_hf_xlmr(hf)
    with pytest.raises(ConversionError, match="context length 17 exceeds the checkpoint's 16 positions"):
        import_hf_xlmr(hf, tmp_path / "out", context_length=17)
    model_file = (hf / "sentencepiece.bpe.model").rename(tmp_path / "sentencepiece.bpe.model")
    with pytest.raises(ConversionError, match="no 'sentencepiece.bpe.model' in .*pass --tokenizer"):
        import_hf_xlmr(hf, tmp_path / "out")
    assert import_hf_xlmr(hf, tmp_path / "out", tokenizer=model_file).heads_imported == ["mlm_head"]
    edit_config(hf, vocab_size=50)
    with pytest.raises(ConversionError, match="the tokenizer has 42 ids but the checkpoint's vocab_size is 50"):
        import_hf_xlmr(hf, tmp_path / "out2", tokenizer=model_file)
    (hf / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match="no weights file"):
        import_hf_xlmr(hf, tmp_path / "out3", tokenizer=model_file)


def test_default_options_keep_the_pre_norm_model_and_its_state_dict_names():
    model = MultilingualEncoder(width=16, layers=1, heads=2, max_positions=8, languages=["en"], vocab_size=20)
    names = set(model.state_dict())
    assert {"transformer.resblocks.0.ln_1.weight", "ln_final.weight", "position_embedding.weight"} <= names
    assert not any(n.startswith(("layers.", "embedding_norm.")) for n in names)
    assert model.ln_final.eps == model.transformer.resblocks[0].ln_1.eps == 1e-5 and model.mlm_head.norm.eps == 1e-12
    with pytest.raises(ValueError, match=r"multilingual_encoder: dropout must be a probability in \[0, 1\], got 1.5"):
        MultilingualEncoder(width=16, layers=1, heads=2, language_embeddings=False, dropout=1.5)
    with pytest.raises(ValueError, match="act 'quick_gelu' needs norm_first=true"):
        MultilingualEncoder(width=16, layers=1, heads=2, language_embeddings=False, norm_first=False, act="quick_gelu")


@pytest.mark.parametrize("norm_first", [True, False])
def test_dropout_acts_in_training_only_on_both_layouts(norm_first):
    tokens = torch.randint(1, 20, (3, 7), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    plain = MultilingualEncoder(width=16, layers=2, heads=2, language_embeddings=False, norm_first=norm_first,
                                vocab_size=20, pad_id=0).eval()
    torch.manual_seed(0)
    model = MultilingualEncoder(width=16, layers=2, heads=2, language_embeddings=False, norm_first=norm_first,
                                vocab_size=20, pad_id=0, dropout=0.3).eval()
    torch.testing.assert_close(model(tokens), plain(tokens), rtol=0, atol=0)
    model.train()
    first, second = model(tokens), model(tokens)
    assert not torch.equal(first, second) and not torch.allclose(first, plain(tokens))
    # With dropout 1 every residual branch and the embeddings are dropped: the states no longer depend on the input.
    model.dropout = 1.0
    for module in model.modules():
        if module is not model and hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = 1.0
    if norm_first:
        states = model(tokens)
        torch.testing.assert_close(states, model.ln_final(torch.zeros_like(states)).expand_as(states))
    first.sum().backward()
    assert all(p.grad is not None for p in model.token_embedding.parameters())


def test_an_m_clip_text_tower_starts_from_the_imported_xlmr(imported):
    """M-CLIP (Carlsson et al. 2022): XLM-R's mean-pooled states under a new projection as CLIP's text tower."""
    import yaml

    hf, _, tokenizer, root = imported
    encoder = yaml.safe_load((root / "mmptm" / "config.yaml").read_text())["model"]
    keys = ("width", "layers", "heads", "mlp_ratio", "max_positions", "norm_first", "layer_norm_eps",
            "position_offset", "dropout")
    text = {"name": "multilingual_text", **{key: encoder[key] for key in keys}, "init_from": str(root / "mmptm")}
    vision = {"name": "vit", "image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "heads": 2}
    clip = mmptm.create_model({"name": "clip", "embed_dim": 16, "vision": vision, "text": text}, tokenizer=tokenizer)
    clip.init_towers()
    clip.eval()
    tokens = tokenizer(SENTENCES)
    real = (tokens != tokenizer.pad_id)[..., None]
    states, _ = hf_states(hf, tokens)
    expected = ((states * real).sum(1) / real.sum(1)) @ clip.text.text_projection
    with torch.no_grad():
        torch.testing.assert_close(clip.text(tokens), expected, atol=1e-5, rtol=1e-5)
