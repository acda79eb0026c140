"""Streams of image-text batches from webdataset shards (the img2dataset layout).

A sample is files sharing a key: an image (``jpg|jpeg|png|webp``), a caption
(``txt``), optionally a ``json`` with captions per language
(``{"captions": {lang: str | [str, ...]}}``) and a label file (e.g. ``cls``).
Reading, splitting, shuffling, batching and the counting of bad samples are
:mod:`mmptm.data_pipelines.streams`'; this module decodes a sample's image,
caption(s) and label.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from PIL import Image

from mmptm.data_pipelines.context import DataContext
from mmptm.data_pipelines.shards import IMAGE_EXTENSIONS
from mmptm.data_pipelines.streams import (
    BadSample,
    Batch,
    ShardStream,
    Skip,
    collate_samples,
    decode_image,
    shard_stream,
)
from mmptm.data_pipelines.transforms import ImageTransform, image_transform
from mmptm.registry import register_dataset


class ImageTextDecoder:
    """Turns a raw webdataset sample into ``{"image", "caption" | "captions", "key"[, "label"]}`` or a ``Skip``.

    Datasets of captioned samples with other visual files (region features, image tokens) subclass
    it and override :meth:`visual`; captions, labels and skip handling stay the same.

    Args:
        transform: PIL image (and the stream's generator, for random crops) -> tensor.
        caption_key: extension of the caption file.
        caption_languages: languages to draw json captions from (None: any).
        label_key: extension of the integer label file (None: no label).
        all_captions: keep every caption (``"captions"``) instead of drawing one (``"caption"``).
    """

    def __init__(
        self,
        transform: ImageTransform,
        caption_key: str,
        caption_languages: list[str] | None,
        label_key: str | None,
        all_captions: bool = False,
    ) -> None:
        self.transform = transform
        self.caption_key = caption_key
        self.caption_languages = caption_languages
        self.label_key = label_key
        self.all_captions = all_captions

    def decode_stream(
        self, items: Iterable[dict[str, Any] | Skip], rng: random.Random
    ) -> Iterator[dict[str, Any] | Skip]:
        """Decode every raw sample of ``items``; ``Skip`` items pass through."""
        for item in items:
            yield item if isinstance(item, Skip) else self.decode(item, rng)

    def decode(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any] | Skip:
        """Decode one raw sample (extension -> bytes, plus ``__key__`` and ``__url__``)."""
        try:
            captions = self._captions(raw)
            sample: dict[str, Any] = {"key": raw["__key__"]}
            if self.all_captions:
                sample["captions"] = [caption for texts in captions.values() for caption in texts]
            else:
                sample["caption"] = rng.choice(captions[rng.choice(list(captions))])
            if self.label_key is not None:
                sample["label"] = self._label(raw)
            # Last: the costly part, done only for samples that are otherwise complete.
            sample.update(self.visual(raw, rng))
        except BadSample as err:
            return Skip(raw["__url__"], raw["__key__"], str(err))
        return sample

    def visual(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        """The sample's visual entries, ``{"image": tensor}``; a decoder of other visual inputs overrides it.

        Raises:
            BadSample: no decodable image.
        """
        return {"image": self.transform(self._image(raw), rng)}

    @staticmethod
    def _image(raw: dict[str, Any]) -> Image.Image:
        ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if ext is None:
            files = sorted(k for k in raw if not k.startswith("__"))
            raise BadSample(f"no image ({'|'.join(IMAGE_EXTENSIONS)}) among its files {files}")
        return decode_image(raw[ext], ext)

    def _captions(self, raw: dict[str, Any]) -> dict[str, list[str]]:
        """The sample's usable captions by language: its json captions, or its caption file under ``""``."""
        by_language = _json_captions(raw)
        if by_language:
            languages = [
                lang for lang in by_language if self.caption_languages is None or lang in self.caption_languages
            ]
            if not languages:
                raise BadSample(f"no caption in languages {self.caption_languages} (has {sorted(by_language)})")
            return {lang: by_language[lang] for lang in languages}
        data = raw.get(self.caption_key)
        if data is None:
            raise BadSample(f"no caption (no '{self.caption_key}' file and no json captions)")
        try:
            caption = data.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise BadSample(f"'{self.caption_key}' caption is not UTF-8: {err}") from None
        if not caption:
            raise BadSample(f"empty '{self.caption_key}' caption")
        return {"": [caption]}

    def _label(self, raw: dict[str, Any]) -> int:
        data = raw.get(self.label_key)
        if data is None:
            raise BadSample(f"no label ('{self.label_key}' file)")
        try:
            return int(data.decode("utf-8").strip())
        except ValueError:  # UnicodeDecodeError is a ValueError
            raise BadSample(f"'{self.label_key}' label is not an integer: {data[:32]!r}") from None


def _json_captions(raw: dict[str, Any]) -> dict[str, list[str]]:
    """The non-empty captions per language of a sample's json (empty when it has none).

    Raises:
        BadSample: the json is not UTF-8 JSON.
    """
    if "json" not in raw:
        return {}
    try:
        meta = json.loads(raw["json"].decode("utf-8"))
    except (ValueError, RecursionError) as err:  # bad UTF-8, bad JSON, absurd nesting
        raise BadSample(f"undecodable json: {err!r}") from None
    captions = meta.get("captions") if isinstance(meta, dict) else None
    if not isinstance(captions, dict):
        return {}
    by_language = {}
    for language, value in captions.items():
        texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        texts = [text.strip() for text in texts if isinstance(text, str) and text.strip()]
        if texts:
            by_language[language] = texts
    return by_language


class CaptionCollate:
    """Stacks decoded samples into a batch and tokenises single captions (picklable for DataLoader workers).

    The collate of every captioned dataset; a dataset whose visual entries need padding (region
    features) subclasses it and pads before calling it.
    """

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor] | None) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: list[dict[str, Any]], skipped_keys: list[str]) -> Batch:
        batch = collate_samples(samples, skipped_keys)
        if self.tokenizer is not None and "caption" in batch:
            batch["text"] = self.tokenizer(batch["caption"])
        return batch


@register_dataset("image_text")
def image_text(
    context: DataContext,
    shards: str,
    batch_size: int = 256,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    resample: bool = False,
    epoch_samples: int | None = None,
    caption_languages: list[str] | None = None,
    caption_key: str = "txt",
    label_key: str | None = None,
    augment_scale: tuple[float, float] = (0.9, 1.0),
    drop_last: bool | None = None,
    all_captions: bool = False,
    uint8_images: bool = False,
) -> ShardStream:
    """Image-text batches from webdataset shards (img2dataset layout).

    Batches are ``{"image": [B,3,H,W], "text": [B,L] (context.tokenizer of the
    captions; absent without a tokenizer), "caption": [str], "key": [str],
    "skipped": int, "skipped_keys": [str][, "label": [B]]}``, and possibly a
    last ``{"empty": True, "skipped": n, "skipped_keys": [...]}`` per worker.
    With ``all_captions``, ``"captions": [[str]]`` (every caption of each
    sample) replaces ``"caption"`` and ``"text"``. Bad samples are skipped,
    counted and logged; ``skipped_keys`` names them (``"<shard url>#<key>"``,
    the same in every epoch).

    Without ``resample`` one iteration reads every sample once across all
    workers and ranks: shards are split between them; when there are fewer
    shards than ``world_size × max(num_workers, 1)``, every worker reads all
    shards and keeps every n-th sample instead (exact, but each reads all
    bytes). Ranks can get different numbers of batches that way: use
    ``resample`` for multi-process training.

    Args:
        context: tokenizer, image size and normalisation, training flag, seed, rank, world size.
        shards: shard URLs/brace pattern, a directory of ``*.tar``, ``::``-separated parts, or ``demo:train``.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes (0: in this process).
        shuffle_buffer: samples in the shuffle buffer when training (0 or 1: no sample shuffle).
        resample: draw shards with replacement, endlessly; an epoch is then ``epoch_samples`` samples.
        epoch_samples: samples per epoch and rank with ``resample`` (required with it, invalid without);
            with ``drop_last`` rounded up to whole batches.
        caption_languages: languages of the json captions to draw from (None: all the sample has);
            a sample with json captions but none in these languages is skipped.
        caption_key: extension of the caption file, used when the json has no captions.
        label_key: extension of an integer label file (e.g. ``cls``) to return as ``"label"``.
        augment_scale: area range of the training random crop.
        drop_last: drop each worker's final partial batch (default: ``context.training``).
        all_captions: return every caption of a sample (its json captions in ``caption_languages``,
            in the json's order, or its caption file), as for retrieval evaluation, instead of one drawn at random.
        uint8_images: batches carry the uint8 pixels (``image: uint8 [B,3,H,W]``) for the model to
            normalise on its device (CLIP's ``encode_image`` does): no float work in the data workers
            and a quarter of the bytes to collate, pin and copy. For accelerators; on a CPU the
            training process would do the work the workers did.

    Returns:
        A :class:`~mmptm.data_pipelines.streams.ShardStream`.

    Raises:
        FileNotFoundError: missing shards.
        ValueError: invalid options.
    """
    decoder = ImageTextDecoder(
        image_transform(context.image_size, context.image_mean, context.image_std, context.training, augment_scale,
                        uint8=uint8_images),
        caption_key=caption_key,
        caption_languages=caption_languages,
        label_key=label_key,
        all_captions=all_captions,
    )
    return shard_stream(
        "image_text",
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
