"""Image-token shards: images tokenised once by a dVAE, for training the DALL-E token decoder.

DALL-E (Ramesh et al. 2021, sec. 2.2) trains its transformer on the dVAE's
tokens of every image; computing them once (``mmptm tokenizer images``) takes
the image tokenizer out of the decoder's training loop. A sample of such shards
is files sharing a key: ``tokens.npy`` (the ``grid × grid`` token grid, int16
or int32), the image's caption(s) as the ``image_text`` shards hold them
(``txt``, and ``json`` with captions per language) and its ``cls`` label if it
had one. The ``image_tokens`` dataset reads them with the captions, languages,
labels, shuffling and skip counting of the ``image_text`` dataset.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmptm.data_pipelines.context import DataContext, model_data_context
from mmptm.data_pipelines.image_text import CaptionCollate, ImageTextDecoder
from mmptm.data_pipelines.region_features import load_array
from mmptm.data_pipelines.shards import open_tar_writer
from mmptm.data_pipelines.streams import BadSample, ShardStream, Skip, collate_samples, shard_stream
from mmptm.data_pipelines.transforms import image_transform
from mmptm.registry import register_dataset

logger = logging.getLogger("mmptm.data")

TOKENS_KEY = "tokens.npy"
IMAGE_TOKENS = "image_tokens"
# The files of an image-text sample that its token sample keeps (besides the tokens).
KEPT_FILES = ("txt", "json", "cls")


class ImageTokenDecoder(ImageTextDecoder):
    """The ``image_text`` decoder with a token grid in place of the image.

    Args:
        tokens_key: file extension of the token grid.
        grid_size / codebook_size: the grid side and token vocabulary every sample must have (the
            model's; None: any square grid of non-negative ids).
        **caption_options: ``caption_key``, ``caption_languages``, ``label_key``, ``all_captions``.
    """

    def __init__(
        self, tokens_key: str, grid_size: int | None = None, codebook_size: int | None = None, **caption_options: Any
    ) -> None:
        super().__init__(None, **caption_options)
        self.tokens_key = tokens_key
        self.grid_size, self.codebook_size = grid_size, codebook_size

    def visual(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:  # noqa: ARG002 (no augmentation)
        """``{"image_tokens": LongTensor[N]}``: the sample's token grid, flattened row-major."""
        tokens = load_array(raw, self.tokens_key, "tokens_key")
        if not np.issubdtype(tokens.dtype, np.integer) or tokens.ndim not in (1, 2) or tokens.size == 0:
            raise BadSample(f"'{self.tokens_key}' must be a non-empty integer grid, got {tokens.dtype} {tokens.shape}")
        if tokens.min() < 0:
            raise BadSample(f"'{self.tokens_key}' holds negative token ids")
        side = math.isqrt(tokens.size)
        if side * side != tokens.size or (tokens.ndim == 2 and tokens.shape[0] != tokens.shape[1]):
            raise BadSample(f"'{self.tokens_key}' must be a square grid of tokens, got shape {tokens.shape}")
        if self.grid_size is not None and side != self.grid_size:
            raise BadSample(
                f"'{self.tokens_key}' is a {side}x{side} grid, the model reads {self.grid_size}x{self.grid_size} "
                "(model.grid_size): tokens of another image tokenizer or image size"
            )
        if self.codebook_size is not None and tokens.max() >= self.codebook_size:
            raise BadSample(
                f"'{self.tokens_key}' holds token id {int(tokens.max())}, outside the model's codebook of "
                f"{self.codebook_size} (model.codebook_size): tokens of another image tokenizer"
            )
        return {IMAGE_TOKENS: torch.from_numpy(tokens.astype(np.int64).reshape(-1))}


@register_dataset("image_tokens")
def image_tokens(
    context: DataContext,
    shards: str,
    batch_size: int = 256,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    resample: bool = False,
    epoch_samples: int | None = None,
    tokens_key: str = TOKENS_KEY,
    caption_languages: list[str] | None = None,
    caption_key: str = "txt",
    label_key: str | None = None,
    drop_last: bool | None = None,
    all_captions: bool = False,
) -> ShardStream:
    """Batches of precomputed image tokens and captions (shards written by ``mmptm tokenizer images``).

    Batches are ``{"image_tokens": LongTensor[B, N] (row-major grids), "text": [B, L] (context.tokenizer
    of the captions; absent without a tokenizer), "caption": [str], "key": [str], "skipped": int,
    "skipped_keys": [str][, "label": [B]]}``; with ``all_captions``, ``"captions": [[str]]`` replaces
    ``"caption"`` and ``"text"``. A caption is drawn as in the ``image_text`` dataset: a random
    language among ``caption_languages`` that the sample's json has, then a random caption of it.
    A sample whose token file is missing or malformed (also: not a square grid, or a grid side or
    token ids other than the model's ``grid_size`` and ``codebook_size``, which ``context`` carries)
    is skipped and counted.

    Args:
        context: tokenizer, training flag, seed, rank, world size, image token grid and codebook size.
        shards / batch_size / num_workers / shuffle_buffer / resample / epoch_samples / drop_last:
            as ``image_text``.
        tokens_key: extension of the token grid file.
        caption_languages / caption_key / label_key / all_captions: as ``image_text``.

    Returns:
        A :class:`~mmptm.data_pipelines.streams.ShardStream`.

    Raises:
        FileNotFoundError: missing shards.
        ValueError: invalid options.
    """
    decoder = ImageTokenDecoder(
        tokens_key,
        grid_size=context.image_token_grid,
        codebook_size=context.image_codebook_size,
        caption_key=caption_key,
        caption_languages=caption_languages,
        label_key=label_key,
        all_captions=all_captions,
    )
    return shard_stream(
        "image_tokens",
        shards,
        context,
        decoder,
        CaptionCollate(context.tokenizer),
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        resample=resample,
        epoch_samples=epoch_samples,
        drop_last=drop_last,
    )


# --------------------------------------------------------------------------- writing token shards


class _FileKeepingDecoder(ImageTextDecoder):
    """The ``image_text`` eval decoder that also keeps the sample's caption and label files as bytes."""

    def decode(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any] | Skip:
        sample = super().decode(raw, rng)
        if not isinstance(sample, Skip):
            sample["files"] = {ext: raw[ext] for ext in KEPT_FILES if ext in raw}
        return sample


@dataclass
class TokenShardStats:
    """What :func:`tokenize_image_shards` wrote.

    Attributes:
        num_samples: samples written.
        num_skipped: input samples skipped (no decodable image or caption; logged as warnings).
        shards: the tar files, in order.
        grid_size / codebook_size: the token grid's side and the vocabulary of its tokens.
    """

    num_samples: int
    num_skipped: int
    shards: list[Path]
    grid_size: int
    codebook_size: int


def load_image_tokenizer(checkpoint: str | Path, device: str = "cpu") -> Any:
    """The ``dvae``/``vqvae`` model of a checkpoint (or of a run folder's latest checkpoint), in eval mode.

    Raises:
        FileNotFoundError: no checkpoint there.
        ConfigError: the checkpoint holds another kind of model.
    """
    from mmptm.config import ConfigError
    from mmptm.encoders.dvae import ImageTokenizer
    from mmptm.models import load_pretrained

    model = load_pretrained(checkpoint, device=device).model
    if not isinstance(model, ImageTokenizer):
        raise ConfigError(
            f"checkpoint {checkpoint} holds a {type(model).__name__} model, not an image tokenizer: "
            "train one with a 'dvae' or 'vqvae' model (e.g. `mmptm train dvae_tiny.yaml`)"
        )
    return model


def tokenize_image_shards(
    checkpoint: str | Path,
    data: str,
    output_dir: str | Path,
    *,
    batch_size: int = 256,
    samples_per_shard: int = 10000,
    num_workers: int = 2,
    device: str = "cpu",
) -> TokenShardStats:
    """Write the image tokens of every sample of image-text shards into token shards (``00000.tar``, ...).

    Each output sample keeps its key, its ``txt``/``json`` captions and ``cls`` label, and gets the
    token grid as ``tokens.npy`` (int16 when the codebook fits, else int32). The images are read with
    the tokenizer's eval transform (resize and centre crop to its ``image_size``, pixels in [0, 1]).
    A sample without a decodable image or caption is skipped, logged and counted. ``info.json``
    next to the shards records the tokenizer and the counts.

    Args:
        checkpoint: a ``dvae``/``vqvae`` checkpoint or run folder.
        data: image-text shards (pattern, folder of ``*.tar``, ``demo:train``, ``::``-separated parts).
        output_dir: where to write (created).
        batch_size: images tokenised at once.
        samples_per_shard: samples per output shard.
        num_workers: DataLoader processes reading the input (0: this process).
        device: where the tokenizer runs.

    Raises:
        FileNotFoundError: missing checkpoint or shards.
        ConfigError: the checkpoint is not an image tokenizer.
        ValueError: invalid options.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    model = load_image_tokenizer(checkpoint, device)
    context = model_data_context(model, training=False)
    decoder = _FileKeepingDecoder(
        image_transform(context.image_size, context.image_mean, context.image_std, training=False),
        caption_key="txt",
        caption_languages=None,
        label_key=None,
        all_captions=True,
    )
    stream = shard_stream(
        "tokenizer images", data, context, decoder, collate_samples, batch_size=batch_size, num_workers=num_workers,
        shuffle_buffer=0, resample=False, epoch_samples=None, drop_last=False,
    )
    dtype = np.int16 if model.codebook_size <= np.iinfo(np.int16).max + 1 else np.int32
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    writer = _TokenShardWriter(output, samples_per_shard)
    skipped = 0
    try:
        for batch in stream:
            skipped += int(batch.get("skipped", 0))
            if batch.get("empty"):
                continue
            with torch.no_grad():
                tokens = model.encode_tokens(batch["image"].to(device)).cpu().numpy()
            for key, files, grid in zip(batch["key"], batch["files"], tokens, strict=True):
                grid_bytes = _npy_bytes(grid.reshape(model.grid_size, -1), dtype)
                writer.write({"__key__": key, **files, TOKENS_KEY: grid_bytes})
    except BaseException:
        writer.abort()  # an interrupted shard stays .tar.partial: never mistaken for a complete one
        raise
    writer.close()
    stats = TokenShardStats(writer.num_samples, skipped, writer.shards, model.grid_size, model.codebook_size)
    info = {
        "checkpoint": str(checkpoint),
        "source": data,
        "num_samples": stats.num_samples,
        "num_skipped": stats.num_skipped,
        "grid_size": stats.grid_size,
        "codebook_size": stats.codebook_size,
        "image_size": model.image_size,
        "shards": [path.name for path in stats.shards],
    }
    (output / "info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return stats


def _npy_bytes(array: np.ndarray, dtype: type) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array.astype(dtype), allow_pickle=False)
    return buffer.getvalue()


class _TokenShardWriter:
    """Fills ``00000.tar``, ``00001.tar``, ... with ``samples_per_shard`` samples each (``.tar.partial`` until full)."""

    def __init__(self, output_dir: Path, samples_per_shard: int) -> None:
        self.output_dir = output_dir
        self.samples_per_shard = samples_per_shard
        self.shards: list[Path] = []
        self.num_samples = 0
        self._in_shard = 0
        self._stream: Any = None
        self._tar: Any = None

    def write(self, sample: dict[str, Any]) -> None:
        if self._tar is None:
            self._stream = open(self._path(".tar.partial"), "wb")  # noqa: SIM115 (closed in _finish_shard)
            self._tar = open_tar_writer(self._stream)
        self._tar.write(sample)
        self.num_samples += 1
        self._in_shard += 1
        if self._in_shard == self.samples_per_shard:
            self._finish_shard()

    def close(self) -> None:
        """Finish the last shard."""
        self._finish_shard()

    def abort(self) -> None:
        """Close the shard being written without completing it."""
        if self._tar is not None:
            self._tar.close()
            self._stream.close()
            self._tar = self._stream = None

    def _path(self, suffix: str) -> Path:
        return self.output_dir / f"{len(self.shards):05d}{suffix}"

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._stream.close()
        final = self._path(".tar")
        self._path(".tar.partial").replace(final)
        self.shards.append(final)
        self._tar = self._stream = None
        self._in_shard = 0
