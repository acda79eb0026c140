"""Streams of precomputed region features with captions, the inputs of VisualBERT and ViLBERT in their papers.

Li et al. 2019 and Lu et al. 2019 feed their fusion models the regions a
Faster R-CNN detector found (Anderson et al. 2018, bottom-up attention): per
image, N feature vectors and their boxes. A sample of such shards is files
sharing a key: ``npy`` (the N×D float features, ``numpy.save`` format),
``boxes.npy`` (N×4 boxes ``x1, y1, x2, y2``, normalised to [0, 1], or in pixels
with the image size in the json as ``width``/``height``), a caption (``txt``,
or json captions as in the ``image_text`` shards), optionally a per-region class
distribution (N×C, e.g. ``cls_prob.npy``: the masked-region classification
target, KL variant) and a label file. Captions, labels, reading, shuffling and
the counting of bad samples are those of the ``image_text`` dataset.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from typing import Any

import numpy as np
import torch

from mmptm.data_pipelines.context import DataContext
from mmptm.data_pipelines.image_text import CaptionCollate, ImageTextDecoder
from mmptm.data_pipelines.streams import BadSample, Batch, ShardStream, local_path, resolve_shards, shard_stream
from mmptm.encoders.visual_inputs import BOXES_KEY, REGION_CLASSES_KEY, REGION_MASK_KEY, REGIONS_KEY
from mmptm.registry import register_dataset


def load_array(raw: dict[str, Any], key: str, option: str) -> np.ndarray:
    """The ``.npy`` array stored under extension ``key`` of a raw sample.

    Args:
        raw: the raw sample (extension -> bytes).
        key: the file extension (``npy``, ``boxes.npy``, ...).
        option: the dataset option that names ``key``, for the message.

    Raises:
        BadSample: the file is missing or not a numeric ``.npy`` array.
    """
    if key not in raw:
        files = sorted(k for k in raw if not k.startswith("__"))
        raise BadSample(f"no '{key}' file (option {option}) among its files {files}")
    try:
        array = np.load(io.BytesIO(raw[key]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise BadSample(f"'{key}' is not a .npy array: {err}") from None
    if not np.issubdtype(array.dtype, np.number):
        raise BadSample(f"'{key}' holds {array.dtype}, not numbers")
    return array


def check_finite(array: np.ndarray, key: str) -> None:
    """Raise ``BadSample`` naming ``key`` when ``array`` holds a NaN or an infinity (they would poison the loss)."""
    if not np.isfinite(array).all():
        raise BadSample(f"'{key}' holds NaN or infinite values")


class RegionDecoder(ImageTextDecoder):
    """The ``image_text`` decoder with region features, boxes (and class distributions) in place of the image.

    Args:
        feature_key / boxes_key / class_key: file extensions of the features, boxes and class distributions.
        max_regions: keep at most this many regions (the first ones: detectors sort by confidence).
        feature_dim / num_classes: the D and C every sample must have (the model's; None: any).
        **caption_options: ``caption_key``, ``caption_languages``, ``label_key``, ``all_captions``.
    """

    def __init__(
        self,
        feature_key: str,
        boxes_key: str,
        class_key: str | None,
        max_regions: int,
        feature_dim: int | None = None,
        num_classes: int | None = None,
        **caption_options: Any,
    ) -> None:
        super().__init__(None, **caption_options)
        self.feature_key, self.boxes_key, self.class_key = feature_key, boxes_key, class_key
        self.max_regions = max_regions
        self.feature_dim, self.num_classes = feature_dim, num_classes

    def visual(self, raw: dict[str, Any], rng: random.Random) -> dict[str, Any]:  # noqa: ARG002 (no augmentation)
        """``{"regions": [N, D], "boxes": [N, 4] normalised[, "region_classes": [N, C]]}`` of a raw sample."""
        features = load_array(raw, self.feature_key, "feature_key")
        boxes = load_array(raw, self.boxes_key, "boxes_key").astype(np.float32)
        if features.ndim != 2 or boxes.shape != (len(features), 4):
            raise BadSample(
                f"'{self.feature_key}' must be N×D and '{self.boxes_key}' N×4, got {features.shape} and {boxes.shape}"
            )
        if len(features) == 0:
            raise BadSample("no regions")
        if self.feature_dim is not None and features.shape[1] != self.feature_dim:
            raise BadSample(
                f"'{self.feature_key}' has {features.shape[1]} features per region, the model reads "
                f"{self.feature_dim} (model.visual_dim)"
            )
        check_finite(features, self.feature_key)
        check_finite(boxes, self.boxes_key)
        if boxes.max() > 1.0:  # pixel coordinates: normalise by the image size
            boxes = boxes / self._image_size(raw)
        out = {
            REGIONS_KEY: torch.from_numpy(features[: self.max_regions].astype(np.float32)),
            BOXES_KEY: torch.from_numpy(boxes[: self.max_regions].clip(0.0, 1.0)),
        }
        if self.class_key is not None:
            classes = load_array(raw, self.class_key, "class_key").astype(np.float32)
            if classes.ndim != 2 or len(classes) != len(features):
                raise BadSample(f"'{self.class_key}' must be N×C for the {len(features)} regions, got {classes.shape}")
            if self.num_classes is not None and classes.shape[1] != self.num_classes:
                raise BadSample(
                    f"'{self.class_key}' has {classes.shape[1]} classes per region, the model has "
                    f"{self.num_classes} (model.region_classes)"
                )
            check_finite(classes, self.class_key)
            out[REGION_CLASSES_KEY] = torch.from_numpy(classes[: self.max_regions])
        return out

    @staticmethod
    def _image_size(raw: dict[str, Any]) -> np.ndarray:
        """``[width, height, width, height]`` from the sample's json, to normalise pixel boxes."""
        try:
            meta = json.loads(raw["json"].decode("utf-8")) if "json" in raw else {}
            size = np.array([meta["width"], meta["height"]] * 2, dtype=np.float32)
        except (ValueError, KeyError, TypeError):
            raise BadSample("boxes are in pixels but the json has no numeric 'width' and 'height'") from None
        if (size <= 0).any():
            raise BadSample(f"json width/height must be positive, got {size[:2].tolist()}")
        return size


class RegionCollate(CaptionCollate):
    """Pads each batch's regions to its largest N (``region_mask`` marks the real ones), then tokenises captions."""

    def __call__(self, samples: list[dict[str, Any]], skipped_keys: list[str]) -> Batch:
        longest = max(len(sample[REGIONS_KEY]) for sample in samples)
        padded = []
        for sample in samples:
            count = len(sample[REGIONS_KEY])
            sample = dict(sample)
            for key in (REGIONS_KEY, BOXES_KEY, REGION_CLASSES_KEY):
                if key in sample:
                    sample[key] = torch.nn.functional.pad(sample[key], (0, 0, 0, longest - count))
            sample[REGION_MASK_KEY] = torch.arange(longest) < count
            padded.append(sample)
        return super().__call__(padded, skipped_keys)


def check_shard_files(urls: list[str], required: dict[str, str], probe: int = 8) -> None:
    """Fail early when none of the first samples of the first local shard has a file the config requires.

    A shard set without the features a config reads is a configuration error, not a few bad
    samples, so it stops the run before training instead of skipping every sample; a file
    missing from only some samples is left to the reader (skipped and counted).

    Args:
        urls: the shard URLs (remote ones are not checked).
        required: file extension -> the dataset option that names it.
        probe: samples looked at.

    Raises:
        ValueError: naming the missing file, the option and the files the samples have.
    """
    path = local_path(urls[0]) if urls else None
    if path is None:
        return
    files: dict[str, set[str]] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                directory, _, name = member.name.rpartition("/")
                key, dot, extension = name.partition(".")
                if dot and f"{directory}/{key}" not in files and len(files) == probe:
                    break
                if dot:
                    files.setdefault(f"{directory}/{key}", set()).add(extension)
    except (tarfile.TarError, OSError):
        return  # the reader reports (and counts) a damaged shard
    present = set().union(*files.values()) if files else set()
    for extension, option in required.items():
        if files and not any(extension in extensions for extensions in files.values()):
            raise ValueError(
                f"region_features: shard {urls[0]}: none of its first {len(files)} samples has a '{extension}' file, "
                f"which the config reads (data.<stream>.{option}: {extension}); their files: {sorted(present)}. "
                f"Point data.<stream>.{option} at the shards' file, or write shards with it"
            )


@register_dataset("region_features")
def region_features(
    context: DataContext,
    shards: str,
    batch_size: int = 256,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    resample: bool = False,
    epoch_samples: int | None = None,
    feature_key: str = "npy",
    boxes_key: str = "boxes.npy",
    class_key: str | None = None,
    max_regions: int = 100,
    caption_languages: list[str] | None = None,
    caption_key: str = "txt",
    label_key: str | None = None,
    drop_last: bool | None = None,
    all_captions: bool = False,
) -> ShardStream:
    """Region-feature batches from webdataset shards, for VisualBERT/ViLBERT with ``model.vision: null``.

    Batches are ``{"regions": [B, N, D], "boxes": [B, N, 4], "region_mask": [B, N], "text": [B, L],
    "caption": [str], "key": [str], "skipped": int, "skipped_keys": [str][, "region_classes": [B, N, C],
    "label": [B]]}``, N the most regions of a sample in the batch. A sample whose arrays are missing or
    malformed (also: NaN or infinite values, or a feature size or class count other than the model's
    ``visual_dim`` and ``region_classes``, which ``context`` carries) is skipped and counted; a shard
    set whose first sample lacks a file the options name fails at once, naming it.

    Args:
        context: tokenizer, training flag, seed, rank, world size; the model's region feature size and
            class count (checked per sample when set).
        shards: shard URLs/brace pattern, a directory of ``*.tar``, or ``::``-separated parts.
        batch_size / num_workers / shuffle_buffer / resample / epoch_samples / drop_last: as ``image_text``.
        feature_key: extension of the N×D features file.
        boxes_key: extension of the N×4 boxes file.
        class_key: extension of an N×C per-region class distribution (the ``mrm`` KL target); None: none.
        max_regions: regions kept per sample.
        caption_languages / caption_key / label_key / all_captions: as ``image_text`` (with
            ``all_captions``, ``"captions": [[str]]`` replaces ``"caption"`` and ``"text"``).

    Returns:
        A :class:`~mmptm.data_pipelines.streams.ShardStream`.

    Raises:
        FileNotFoundError: missing shards.
        ValueError: invalid options, or shards without the files the options name.
    """
    if max_regions < 1:
        raise ValueError(f"region_features: max_regions must be >= 1, got {max_regions}")
    required = {feature_key: "feature_key", boxes_key: "boxes_key"}
    if class_key is not None:
        required[class_key] = "class_key"
    check_shard_files(resolve_shards(shards), required)
    decoder = RegionDecoder(
        feature_key, boxes_key, class_key, max_regions, context.region_dim, context.region_classes,
        caption_key=caption_key, caption_languages=caption_languages, label_key=label_key, all_captions=all_captions,
    )
    return shard_stream(
        "region_features",
        shards,
        context,
        decoder,
        RegionCollate(context.tokenizer),
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        resample=resample,
        epoch_samples=epoch_samples,
        drop_last=drop_last,
    )
