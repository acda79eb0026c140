"""Shared pieces of checkpoint import/export: safe weight reading and writing mmptm checkpoint folders."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

if TYPE_CHECKING:
    from mmptm.data_pipelines.fairseq_spm import FairseqSentencePieceTokenizer


class ConversionError(ValueError):
    """A checkpoint that cannot be converted: unknown architecture, missing files, shape mismatch."""


# Hugging Face BERT-family encoder layers (``encoder.layer.N``, as in BERT, VisualBERT and XLM-R) -> the
# ``layers.N`` stack of :class:`mmptm.encoders.bert.BertLayer` (regex pattern, replacement).
HF_BERT_LAYER_RENAMES = [
    (r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.", r"layers.\1.attention.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.dense."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attention.norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.ffn.intermediate."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.ffn.output."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.ffn.norm."),
]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, read without executing pickled code.

    Accepts ``.safetensors``; ``.pt``/``.pth``/``.bin`` torch files read with
    ``weights_only=True`` (a plain state dict, or a training checkpoint with a
    ``state_dict`` entry, whose DDP ``module.`` prefixes are dropped); and
    TorchScript archives such as OpenAI's original ``ViT-B-32.pt``, whose
    tensors are read by ``torch.jit.load`` (TorchScript deserialisation runs
    no Python pickle code).

    Raises:
        ConversionError: a missing file or one that holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"weights file '{path}' not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if is_torchscript(path):
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # an unpickler refusal, a corrupt zip, ...
        raise ConversionError(f"{path}: not a torch weights file readable without pickled code ({err})") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(torch.is_tensor(v) for v in loaded.values()):
        raise ConversionError(f"{path}: holds no state dict (a mapping name -> tensor)")
    if loaded and all(k.startswith("module.") for k in loaded):
        loaded = {k[len("module.") :]: v for k, v in loaded.items()}
    return loaded


HF_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")


def read_hf_config(model_dir: Path) -> tuple[dict[str, Any], Path]:
    """The parsed ``config.json`` of a Hugging Face ``save_pretrained`` folder, and its path (for messages).

    Raises:
        ConversionError: no ``config.json``, or one that is not a JSON object.
    """
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"'{model_dir}' is not a Hugging Face model folder: no config.json")
    return read_json_object(config_file), config_file


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in a file (a Hugging Face folder's config, tokenizer or processor file).

    Raises:
        ConversionError: not valid JSON, or JSON that is not an object.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def rename_tensor(name: str, renames: list[tuple[str, str]]) -> str | None:
    """``name`` under the first ``(pattern, replacement)`` of ``renames`` whose pattern matches; None if none does."""
    for pattern, replacement in renames:
        renamed, count = re.subn(pattern, replacement, name)
        if count:
            return renamed
    return None


def read_hf_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face ``save_pretrained`` folder: one weights file, or the shards of its index.

    Reads ``model.safetensors`` or ``pytorch_model.bin``, else every shard named by
    ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json`` (large models), with
    :func:`read_state_dict`.

    Raises:
        ConversionError: no weights file, or an index that is not valid JSON with a ``weight_map``.
    """
    model_dir = Path(model_dir)
    for name in HF_WEIGHTS_FILES:
        if (model_dir / name).is_file():
            return read_state_dict(model_dir / name)
    for name in HF_WEIGHTS_FILES:
        index = model_dir / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise ConversionError(f"{index}: not a weights index with a 'weight_map' ({err!r})") from None
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_state_dict(model_dir / shard))
            return state
    raise ConversionError(
        f"'{model_dir}': no weights file ({', '.join(HF_WEIGHTS_FILES)}, or a sharded '<name>.index.json')"
    )


def is_torchscript(path: Path) -> bool:
    """Whether a file is a TorchScript archive (a zip with serialised code), as OpenAI's CLIP files are."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def infer_layers(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of transformer blocks ``<prefix>N.`` in a state dict."""
    return len({k[len(prefix) :].split(".")[0] for k in state_dict if k.startswith(prefix)})


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise a :class:`ConversionError` naming the keys a converted state dict lacks or has in excess."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ConversionError(
            f"{source}: its weights do not fit the architecture inferred from them (an unsupported variant?): "
            f"missing {missing[:6]}, unexpected {unexpected[:6]}, "
            f"wrong shapes {[(k, tuple(state_dict[k].shape), tuple(expected[k].shape)) for k in wrong[:4]]}"
        )


def write_checkpoint(
    output_dir: str | Path,
    model_config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    tokenizer: Any,
    source: str,
) -> Path:
    """Build the mmptm model of ``model_config``, load ``state_dict`` strictly and save a checkpoint folder.

    The folder (written to a temporary sibling and renamed) holds
    ``config.yaml`` (a ``model`` and a ``tokenizer`` section, plus
    ``imported_from``), ``model.safetensors`` and the tokenizer's files; it
    loads with :func:`mmptm.load_pretrained`, evaluates with ``mmptm zeroshot``
    and initialises training with ``train.init_from``.

    Raises:
        ConversionError: the weights do not fit the model, or ``output_dir`` exists and is not empty.
    """
    from mmptm.models import create_model
    from mmptm.training.checkpoint import save_weights

    model = create_model(model_config, tokenizer=tokenizer)
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    check_state_dict(model, state_dict, source)
    model.load_state_dict(state_dict)
    config = {
        "imported_from": source,
        "model": model_config,
        "tokenizer": {"path": ".", "context_length": tokenizer.context_length},
    }
    with new_folder(output_dir) as tmp:
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        save_weights(model, tmp / "model.safetensors")
        tokenizer.save(tmp)
    return Path(output_dir)


@contextlib.contextmanager
def new_folder(output_dir: str | Path) -> Iterator[Path]:
    """Fill a temporary sibling of ``output_dir`` and rename it into place, so no half-written folder remains.

    Raises:
        ConversionError: ``output_dir`` exists and is not empty.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ConversionError(f"output folder '{output_dir}' exists and is not empty")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{output_dir.name}-", dir=output_dir.parent))
    try:
        yield tmp
        if output_dir.exists():
            output_dir.rmdir()
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def training_overrides(checkpoint: str | Path) -> str:
    """The ``mmptm train`` overrides that continue pretraining from an imported checkpoint (shell-quoted).

    ``train.init_from`` loads the weights strictly, so the run's ``model`` section must be the
    checkpoint's and its ``tokenizer.path`` the checkpoint folder.
    """
    model = yaml.safe_load((Path(checkpoint) / "config.yaml").read_text(encoding="utf-8"))["model"]
    model_yaml = yaml.safe_dump(model, default_flow_style=True, width=float("inf"), sort_keys=False).strip()
    return " ".join(shlex.quote(item) for item in
                    (f"train.init_from={checkpoint}", f"tokenizer.path={checkpoint}", f"model={model_yaml}"))


def read_fairseq_tokenizer(source: Path, context_length: int, model: str) -> FairseqSentencePieceTokenizer:
    """XLM-R's or mBART's tokenizer: ``sentencepiece.bpe.model`` in fairseq's ids, from a folder or the file.

    A folder (or a file named ``sentencepiece.bpe.model``) gives the language codes its
    ``tokenizer_config.json`` names; a model file of another name gives none.

    Args:
        source: the folder or the model file.
        context_length: the tokenizer's row length.
        model: the model's name, for messages (``XLM-R``, ``mBART``).

    Raises:
        ConversionError: no such file, or one that is not a sentencepiece model in fairseq's layout.
    """
    from mmptm.data_pipelines.fairseq_spm import FairseqSentencePieceTokenizer, load_fairseq_tokenizer
    from mmptm.data_pipelines.tokenizer import FAIRSEQ_MODEL_FILENAME

    try:
        if source.is_file() and source.name != FAIRSEQ_MODEL_FILENAME:
            return FairseqSentencePieceTokenizer(source, context_length)
        return load_fairseq_tokenizer(source.parent if source.is_file() else source, context_length)
    except FileNotFoundError as err:
        raise ConversionError(
            f"tokenizer: {err}: {model}'s tokenizer is the '{FAIRSEQ_MODEL_FILENAME}' of its Hugging Face "
            "folder; pass --tokenizer with that file or a folder holding it"
        ) from None
    except ValueError as err:
        raise ConversionError(f"tokenizer: {source}: {err}") from None
