"""Importing Hugging Face mBART folders: logits, greedy/beam decoding, the denoising data path, the CLI, bad inputs."""

from __future__ import annotations

import copy
import io
import json
import math
import shlex
import shutil
import tarfile
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import yaml

transformers = pytest.importorskip("transformers")

import mmptm  # noqa: E402
from mmptm.cli import main  # noqa: E402
from mmptm.config import load_config  # noqa: E402
from mmptm.data_pipelines.context import DataContext  # noqa: E402
from mmptm.data_pipelines.text import text  # noqa: E402
from mmptm.data_pipelines.tokenizer import load_tokenizer  # noqa: E402
from mmptm.evaluation.common import EvalContext  # noqa: E402
from mmptm.evaluation.denoising import denoise  # noqa: E402
from mmptm.interop.common import ConversionError  # noqa: E402
from mmptm.interop.mbart import import_hf_mbart  # noqa: E402
from mmptm.objectives.denoising import MultilingualDenoising  # noqa: E402
from mmptm.objectives.masking import IGNORE_INDEX  # noqa: E402
from mmptm.training.checkpoint import load_weights  # noqa: E402

BOS, PAD, EOS = 0, 1, 2  # fairseq's ids
PIECES = 40  # the tiny sentencepiece model's size
CC25_CODES = 25  # MBartTokenizer's language codes: ids PIECES + 1 ...
VOCAB = PIECES + 1 + CC25_CODES + 1  # + <mask>
EN_XX, FR_XX = PIECES + 1 + 3, PIECES + 1 + 7  # en_XX and fr_XX, 4th and 8th of the cc25 codes
DOCUMENTS = {
    "en": ["the cat sat on the mat", "a dog runs in the park\nthe cat sat in the park", "the dog sat on a mat"],
    "fr": ["le chat est sur le tapis", "un chien court dans le parc\nle chat est dans le parc"],
}
# More text for the sentencepiece model's pieces.
CORPUS = ["der hund schläft im garten", "die katze sitzt auf der matte", "un chat dort sur le lit",
          "the quick brown fox jumps over the lazy dog", "quelques mots de plus pour le vocabulaire"]
MAX_NEW_TOKENS = 10
EOS_PUSH = 1.5  # the decoder output bias towards </s>: some rows end early, others at the length limit


def write_tiny_hf_mbart(folder: Path) -> transformers.MBartForConditionalGeneration:
    """A random MBartForConditionalGeneration (scaled embeddings) saved with a tiny fairseq-layout tokenizer."""
    folder.mkdir(parents=True)
    corpus = folder / "corpus.txt"
    lines = [line for docs in DOCUMENTS.values() for doc in docs for line in doc.split("\n")] + CORPUS
    corpus.write_text("\n".join(lines * 20))
    # fairseq's sentencepiece layout, as mBART's sentence.bpe.model: <unk>=0, <s>=1, </s>=2, no <pad>.
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "sp"), vocab_size=PIECES,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (folder / "sp.model").rename(folder / "sentencepiece.bpe.model")
    for name in ("sp.vocab", "corpus.txt"):
        (folder / name).unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "MBartTokenizer"}))
    config = transformers.MBartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=40,
        scale_embedding=True, dropout=0.0,
    )
    torch.manual_seed(0)
    model = transformers.MBartForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Wide weights make an untrained model's outputs vary; a push towards </s> ends some rows early.
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2:
                parameter.normal_(0, 1.0)
            elif "layer_norm" in name or "layernorm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
        eos = model.model.shared.weight[EOS]
        model.model.decoder.layer_norm.bias.copy_(EOS_PUSH * eos / eos.norm())
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf_mbart") / "hf"
    write_tiny_hf_mbart(folder)
    return folder


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    """``(transformers model, mmptm model, mmptm tokenizer)`` of the same checkpoint."""
    output = import_hf_mbart(hf_dir, tmp_path_factory.mktemp("mmptm") / "mbart", languages=["en=en_XX", "fr=fr_XX"])
    model, tokenizer, _ = mmptm.load_pretrained(output)
    return transformers.MBartForConditionalGeneration.from_pretrained(hf_dir).eval(), model, tokenizer


def right_padded(rows: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), PAD)
    for index, row in enumerate(rows):
        out[index, : len(row)] = torch.tensor(row)
    return out


def sources(count: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """``count`` random right-padded ``X </s> <lang>`` rows and their languages."""
    generator = torch.Generator().manual_seed(seed)
    languages = ["en", "fr"] * (count // 2)
    rows = [[*torch.randint(4, PIECES, (length,), generator=generator).tolist(), EOS, EN_XX if lang == "en" else FR_XX]
            for length, lang in zip(range(count + 2, 2, -1), languages, strict=False)]
    return right_padded(rows), languages


def test_config_and_tokenizer_of_the_import(imported):
    _, model, tokenizer = imported
    assert model.embedding_scale == math.sqrt(32) and model.max_positions == 40
    assert (tokenizer.bos_id, tokenizer.pad_id, tokenizer.eos_id, tokenizer.vocab_size) == (BOS, PAD, EOS, VOCAB)
    assert (model.pad_id, model.bos_id, model.eos_id, model.mask_id) == (PAD, BOS, EOS, VOCAB - 1)
    assert model.language_token_id["en"] == tokenizer.language_token_ids["en_XX"] == EN_XX
    assert model.language_token_id["fr"] == FR_XX
    # Every other code stays a language of the model (never generated), under its own name.
    assert len(model.languages) == CC25_CODES and model.language_token_id["de_DE"] == PIECES + 1 + 2


def test_teacher_forced_logits_equal_transformers(imported):
    hf, model, _ = imported
    source, languages = sources(4)
    targets = right_padded([[model.language_token_id[lang], *row[row != PAD][:-2].tolist()]
                            for row, lang in zip(source, languages, strict=True)])
    with torch.no_grad():
        expected = hf(input_ids=source, attention_mask=(source != PAD).long(), decoder_input_ids=targets).logits
        torch.testing.assert_close(model(source, targets), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("beam_size", "length_penalty"), [(1, 1.0), (3, 1.0), (4, 0.5)])
def test_decoding_equals_transformers_generate(imported, beam_size, length_penalty):
    """Greedy and beam search give transformers' tokens, with the language id as the decoder start.

    mmptm never generates pad, <s>, <mask> or a language id: transformers gets the same ids as
    ``suppress_tokens`` (and renormalises, as mmptm does, so that beam scores are comparable);
    ``forced_eos_token_id`` (a </s> forced at the length limit) is off, as mmptm forces none.
    Beam search follows fairseq's rule (transformers' ``early_stopping=True``); at the length limit
    a row's ended and open hypotheses are ranked together, in both.
    """
    hf, model, _ = imported
    source, languages = sources(8, seed=1)
    start = model.language_tokens(languages)
    with torch.no_grad():
        expected = hf.generate(
            input_ids=source, attention_mask=(source != PAD).long(), decoder_start_token_id=start,
            num_beams=beam_size, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, early_stopping=True,
            length_penalty=length_penalty, suppress_tokens=model.never_generated.tolist(), forced_eos_token_id=None,
            renormalize_logits=True,
        )[:, 1:]
    got = model.generate(source, languages, max_length=MAX_NEW_TOKENS, beam_size=beam_size,
                         length_penalty=length_penalty).tokens
    got = torch.nn.functional.pad(got, (0, expected.shape[1] - got.shape[1]), value=PAD)
    early = ((got[:, :-1] == EOS) | (expected[:, :-1] == EOS)).any(dim=1)  # either ends before the limit
    assert 2 <= early.sum() < len(early)  # some rows stop at </s>, others run to the length limit
    assert got.tolist() == expected.tolist()


def write_text_shards(folder: Path) -> Path:
    """One ``text`` shard per language: ``{"text", "lang"}`` json samples, a document's sentences on lines."""
    for lang, documents in DOCUMENTS.items():
        (folder / lang).mkdir(parents=True)
        with tarfile.open(folder / lang / "shard-000000.tar", "w") as tar:
            for index, document in enumerate(documents):
                data = json.dumps({"text": document, "lang": lang}).encode()
                info = tarfile.TarInfo(f"{lang}{index:04d}.json")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder


def test_denoising_data_path_builds_mbart_tokenizer_layout_and_trains(imported, hf_dir, tmp_path):
    """``text`` rows -> the denoising objective -> transformers' MBartTokenizer layout with the imported ids.

    Source ``X </s> <lang>`` (X noised), decoder input ``<lang> X`` and target ``X </s>``: the
    tokenizer's ``input_ids`` of X are ``X </s> <lang>``, ``shift_tokens_right`` of them
    ``<lang> X </s>`` (whose last prediction, ``<lang>`` after ``</s>``, mmptm's target leaves out).
    A document's sentences are separated by ``</s>``, as in fairseq's mBART documents.
    """
    from transformers.models.mbart.modeling_mbart import shift_tokens_right

    _, model, tokenizer = imported
    hf_tokenizer = transformers.MBartTokenizer.from_pretrained(hf_dir)
    shards = write_text_shards(tmp_path / "text")
    stream = text(DataContext(tokenizer=tokenizer, training=False), str(shards), batch_size=8, max_length=40)
    batch = next(iter(stream))
    inputs = MultilingualDenoising().corrupt(model, batch, torch.Generator().manual_seed(0))
    assert len(batch["lang"]) == sum(map(len, DOCUMENTS.values()))  # evaluation: one document per row
    for row, lang in enumerate(batch["lang"]):
        document = DOCUMENTS[lang][row - batch["lang"].index(lang)]
        code = {"en": "en_XX", "fr": "fr_XX"}[lang]
        hf_tokenizer.src_lang = code
        sentences = [hf_tokenizer(line, add_special_tokens=False)["input_ids"] for line in document.split("\n")]
        original = [token for i, ids in enumerate(sentences) for token in [EOS] * (i > 0) + ids]
        if len(sentences) == 1:  # the tokenizer's own source layout
            assert hf_tokenizer(document)["input_ids"] == [*original, EOS, EN_XX if lang == "en" else FR_XX]
        hf_source = torch.tensor([[*original, EOS, hf_tokenizer.convert_tokens_to_ids(code)]])
        hf_decoder_input = shift_tokens_right(hf_source, PAD)[0].tolist()
        target = [t for t in inputs.target[row].tolist() if t != IGNORE_INDEX]
        decoder_input = [t for t in inputs.decoder_input[row].tolist() if t != PAD]
        source = [t for t in inputs.source[row].tolist() if t != PAD]
        assert target == [*original, EOS]
        assert decoder_input == hf_decoder_input[:-1]
        assert source[-2:] == hf_source[0, -2:].tolist()  # noised X, then </s> <lang>
        assert source.count(EOS) == len(sentences) and tokenizer.mask_id in source

    trained = copy.deepcopy(model).train()  # the fixture's model stays as imported
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-3)
    loss = MultilingualDenoising()(trained, batch)["loss"]
    loss.backward()
    assert math.isfinite(loss.item())
    grads = [p.grad for p in trained.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    optimizer.step()
    assert not torch.equal(trained.token_embedding.weight, model.token_embedding.weight)

    context = EvalContext(tokenizer=tokenizer, data=DataContext(tokenizer=tokenizer, training=False))
    metrics = denoise(model, context, data=str(shards), max_length=12)
    assert set(metrics) >= {"denoise_em/en", "denoise_em/fr"} and 0 < metrics["denoise_copy_chrf"] < 100


def test_cli_writes_a_folder_load_pretrained_loads(imported, hf_dir, tmp_path, capsys):
    hf, _, _ = imported
    output = tmp_path / "cli"
    assert main(["convert", "hf-mbart", str(hf_dir), str(output), "--languages", "en=en_XX", "de=de_DE"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["output_dir"] == str(output)
    model, tokenizer, _ = mmptm.load_pretrained(output)
    # The printed overrides make mbart_tiny.yaml build the imported model, which train.init_from loads strictly.
    config = load_config("mbart_tiny.yaml", shlex.split(report["train_overrides"]))
    assert config.train.init_from == str(output) and config.tokenizer.path == str(output)
    rebuilt = mmptm.create_model(config.model, tokenizer=load_tokenizer(output))
    load_weights(rebuilt, output / "model.safetensors")
    assert model.language_token_id["de"] == tokenizer.language_token_ids["de_DE"]
    assert "fr_XX" in model.languages and "en_XX" not in model.languages
    source, _ = sources(2)
    decoder_input = source[:, :3]
    with torch.no_grad():
        expected = hf(input_ids=source, attention_mask=(source != PAD).long(), decoder_input_ids=decoder_input).logits
        torch.testing.assert_close(model(source, decoder_input), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["MBartModel", "pytorch_model.bin with every tied copy", "sharded"])
def test_other_weight_layouts_import_the_same(imported, hf_dir, tmp_path, layout):
    """A bare ``MBartModel`` (no ``model.`` prefix, no LM head), a torch file with the tied copies saved,
    and shards with an index (how large checkpoints such as mbart-large-cc25 are saved)."""
    from safetensors.torch import load_file, save_file

    hf, _, _ = imported
    folder = copy_folder(hf_dir, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    if layout == "MBartModel":
        state = {name.removeprefix("model."): tensor for name, tensor in state.items() if name != "final_logits_bias"}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif layout == "sharded":
        hf.save_pretrained(folder, max_shard_size="20KB")
        (folder / "model.safetensors").unlink()
        assert len(list(folder.glob("model-*.safetensors"))) > 1
    else:
        shared = state["model.shared.weight"]
        names = ("lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")
        torch.save({**state, **{name: shared.clone() for name in names}}, folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    model, _, _ = mmptm.load_pretrained(import_hf_mbart(folder, tmp_path / "out"))  # languages named as the codes
    source, languages = sources(4)
    codes = model.language_tokens([{"en": "en_XX", "fr": "fr_XX"}[lang] for lang in languages])
    decoder_input = torch.cat([codes[:, None], source[:, :4]], dim=1)
    with torch.no_grad():
        expected = hf(input_ids=source, attention_mask=(source != PAD).long(), decoder_input_ids=decoder_input).logits
        torch.testing.assert_close(model(source, decoder_input), expected, atol=1e-5, rtol=1e-5)


DROPOUT_KEYS = ("dropout", "attention_dropout", "activation_dropout")


@pytest.mark.parametrize("key", DROPOUT_KEYS)
def test_dropout_is_where_transformers_puts_it(hf_dir, tmp_path, key):
    """One dropout at 1 drops whole tensors (sub-layer outputs and embeddings, attention probabilities,
    MLP activations): training-mode outputs are then deterministic, and equal transformers' only if mmptm
    drops the same tensors at the same places."""
    folder = copy_folder(hf_dir, tmp_path, {**dict.fromkeys(DROPOUT_KEYS, 0.0), key: 1.0})
    hf = transformers.MBartForConditionalGeneration.from_pretrained(folder)
    with torch.no_grad():  # non-zero biases: a tensor dropped before or after a layer with a bias differs
        for name, parameter in hf.named_parameters():
            if name.endswith("bias") and "norm" not in name and "final_logits" not in name:
                parameter.normal_(0, 0.5)
    hf.save_pretrained(folder)
    model, _, _ = mmptm.load_pretrained(import_hf_mbart(folder, tmp_path / "out", languages=["en=en_XX", "fr=fr_XX"]))
    source, languages = sources(4)
    targets = right_padded([[model.language_token_id[lang], *row[row != PAD][:-2].tolist()]
                            for row, lang in zip(source, languages, strict=True)])
    with torch.no_grad():
        evaluated = model(source, targets)
        hf.train(), model.train()
        expected = hf(input_ids=source, attention_mask=(source != PAD).long(), decoder_input_ids=targets).logits
        trained = model(source, targets)
    torch.testing.assert_close(trained, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(trained, evaluated, atol=1e-3)


def test_import_carries_the_dropouts(hf_dir, tmp_path):
    folder = copy_folder(hf_dir, tmp_path, {"dropout": 0.1, "attention_dropout": 0.05, "activation_dropout": 0.2})
    output = import_hf_mbart(folder, tmp_path / "out", languages=["en=en_XX", "fr=fr_XX"])
    section = yaml.safe_load((output / "config.yaml").read_text())["model"]
    assert {key: section[key] for key in DROPOUT_KEYS} == {
        "dropout": 0.1, "attention_dropout": 0.05, "activation_dropout": 0.2}
    model, _, _ = mmptm.load_pretrained(output)
    block = model.decoder[1]
    assert (model.dropout, block.dropout, block.cross_attn.dropout, block.mlp.dropout) == (0.1, 0.1, 0.05, 0.2)
    with pytest.raises(ConversionError, match=r"attention_dropout=1.5 is not supported .* a probability in \[0, 1\]"):
        import_hf_mbart(copy_folder(hf_dir, tmp_path / "bad", {"attention_dropout": 1.5}), tmp_path / "bad_out")


def copy_folder(hf_dir: Path, tmp_path: Path, config: dict | None = None) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(hf_dir, folder)
    if config is not None:
        original = json.loads((hf_dir / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**original, **config}))
    return folder


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "bart"}, "model_type 'bart' is not 'mbart'"),
    ({"normalize_before": False}, "normalize_before=False is not supported by mmptm's mbart; accepted: True"),
    ({"add_final_layer_norm": False}, "add_final_layer_norm=False"),
    ({"decoder_attention_heads": 2}, "decoder_attention_heads=2 is not supported"),
    ({"decoder_ffn_dim": 48}, "decoder_ffn_dim=48"),
    ({"activation_function": "relu"}, "activation_function='relu' is not supported by mmptm's mbart; accepted: 'gelu'"),
    ({"pad_token_id": 0}, "pad_token_id=0"),
])
def test_configs_mmptm_cannot_express_are_refused(hf_dir, tmp_path, change, message):
    with pytest.raises(ConversionError, match=message.replace("(", r"\(")):
        import_hf_mbart(copy_folder(hf_dir, tmp_path, change), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def edit_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_bad_files_are_refused_naming_them(hf_dir, tmp_path):
    folder = copy_folder(hf_dir, tmp_path)
    with pytest.raises(ConversionError, match="'xx_XX' .* is not one of the tokenizer's language codes"):
        import_hf_mbart(folder, tmp_path / "a", languages=["en=xx_XX"])
    with pytest.raises(ConversionError, match="not of the form NAME=CODE"):
        import_hf_mbart(folder, tmp_path / "a", languages=["en_XX"])
    with pytest.raises(ConversionError, match=r"\['en'\] would each name more than one"):
        import_hf_mbart(folder, tmp_path / "a", languages=["en=en_XX", "en=fr_XX"])

    edit_weights(folder, lambda state: state.__setitem__("final_logits_bias", state["final_logits_bias"] + 0.5))
    with pytest.raises(ConversionError, match="weights: 'final_logits_bias' is not zero"):
        import_hf_mbart(folder, tmp_path / "a")
    edit_weights(folder, lambda state: state.update(final_logits_bias=state["final_logits_bias"] * 0,
                                                    **{"lm_head.weight": state["model.shared.weight"] + 1}))
    with pytest.raises(ConversionError, match="'lm_head.weight' differs from 'model.shared.weight'"):
        import_hf_mbart(folder, tmp_path / "a")
    edit_weights(folder, lambda state: state.pop("lm_head.weight"))

    (folder / "tokenizer_config.json").write_text(json.dumps({"language_codes": ["en_XX", "fr_XX"]}))
    with pytest.raises(ConversionError, match=f"has {PIECES + 4} ids .* but the weights .* have {VOCAB} token"):
        import_hf_mbart(folder, tmp_path / "a")
    (folder / "tokenizer_config.json").unlink()  # no codes named: those of the released model of this size
    _, tokenizer, _ = mmptm.load_pretrained(import_hf_mbart(folder, tmp_path / "inferred"))
    assert tokenizer.language_token_ids["en_XX"] == EN_XX and len(tokenizer.language_token_ids) == CC25_CODES
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": VOCAB - 1}))
    with pytest.raises(ConversionError, match=f"names no language codes and .* vocab_size={VOCAB - 1} leaves 24"):
        import_hf_mbart(folder, tmp_path / "a")
    (folder / "sentencepiece.bpe.model").unlink()
    with pytest.raises(ConversionError, match="tokenizer: .*sentencepiece.bpe.model|tokenizer: no tokenizer"):
        import_hf_mbart(folder, tmp_path / "a")
    for name in ("sentencepiece.bpe.model", "config.json"):  # back to a good folder without weights
        shutil.copy(hf_dir / name, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"no weights file \(model.safetensors, pytorch_model.bin, or a sharded"):
        import_hf_mbart(folder, tmp_path / "a")
    (folder / "config.json").unlink()
    with pytest.raises(ConversionError, match="no config.json"):
        import_hf_mbart(folder, tmp_path / "a")
    assert not (tmp_path / "a").exists()
