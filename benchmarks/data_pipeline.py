"""Image-text data pipeline throughput vs. a bare loop that only decodes the same images.

The pipeline is mmptm's ``image_text`` dataset as a bundled config sets it up
(``--config``: its ``data.train`` section, tokenizer and image size, training
augmentation): tar reading, shuffle buffer, image decode, random resized crop,
normalisation (or, with the config's ``uint8_images`` as in ``clip_base``, none:
the model normalises on its device), caption choice, batched tokenisation and collation, through a
``DataLoader``. The bare loop reads the same shards through the same
``DataLoader`` split and only decodes each image (PIL, to RGB); it is the
floor below which no image pipeline can go. Each epoch reads every sample
once (no resampling); the two are timed interleaved, ``--repeats`` epochs
each per worker count, and the median samples/s is reported.

``--synthetic N`` also writes N photo-like 224×224 JPEGs with captions into
shards (what ``clip_base`` reads from img2dataset), next to the demo's 32×32 PNGs.

    python benchmarks/data_pipeline.py                          # demo shards + 2000 synthetic JPEGs, 0/1/2 workers
    python benchmarks/data_pipeline.py --shards '/data/laion/{00000..00009}.tar' --config clip_base --synthetic 0
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def bare_decode_stream(stream: Any) -> Any:
    """``stream``'s shards, split and tar reading, with a decoder that only decodes the image.

    Batches are just sample counts, so nothing but reading and decoding costs.
    """
    from mmptm.data_pipelines.image_text import ImageTextDecoder
    from mmptm.data_pipelines.streams import DeterministicDecoder, ShardPipeline, ShardStream

    class DecodeOnly(DeterministicDecoder):
        def decode(self, raw: dict[str, Any]) -> dict[str, Any]:
            ImageTextDecoder._image(raw)
            return {"count": 1}

    def count(samples: list[dict[str, Any]], skipped_keys: list[str]) -> dict[str, Any]:  # noqa: ARG001
        return {"count": len(samples)}

    pipeline = stream.loader.dataset
    bare = ShardPipeline(
        pipeline.urls, pipeline.context, DecodeOnly(), count,
        batch_size=pipeline.batch_size, shuffle_buffer=0, resample=False, epoch_samples=None,
        drop_last=pipeline.drop_last,
    )
    return ShardStream(bare, num_workers=stream.loader.num_workers)


def build_pipeline(config_name: str, shards: str, workers: int) -> Any:
    """The config's ``data.train`` image-text stream on ``shards``, one pass per epoch."""
    from mmptm.config import load_config
    from mmptm.data_pipelines.context import DataContext
    from mmptm.data_pipelines.demo import resolve
    from mmptm.data_pipelines.tokenizer import load_tokenizer
    from mmptm.registry import DATASETS, build

    config = load_config(config_name)
    section = dict(config.data["train"])
    section.update(shards=shards, num_workers=workers, resample=False, epoch_samples=None)
    tokenizer = load_tokenizer(resolve(config.tokenizer.path), context_length=config.tokenizer.context_length)
    context = DataContext(tokenizer=tokenizer, image_size=config.model["vision"]["image_size"], training=True)
    return build(DATASETS, section, context=context)


def samples_per_second(stream: Iterable[dict[str, Any]]) -> float:
    """One epoch of ``stream``, worker start-up included; samples/s."""
    start = time.perf_counter()
    samples = 0
    for batch in stream:
        if "count" in batch:
            samples += batch["count"]
        elif not batch.get("empty"):
            samples += len(batch["key"])
    return samples / (time.perf_counter() - start)


def photo_like_jpeg(rng: np.random.Generator, size: int) -> bytes:
    """A smooth random colour field with mild noise as a quality-90 JPEG: decodes like a photo, not like noise."""
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
    image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_synthetic_shards(directory: Path, samples: int, size: int = 224, per_shard: int = 500) -> str:
    """``samples`` JPEG + caption samples in shards of ``per_shard``; returns the shard pattern."""
    import webdataset as wds

    rng = np.random.default_rng(0)
    words = ["a", "photo", "of", "the", "red", "small", "dog", "cat", "on", "grass", "city", "at", "night"]
    shards = (samples + per_shard - 1) // per_shard
    for shard in range(shards):
        with wds.TarWriter(str(directory / f"synthetic-{shard:06d}.tar")) as tar:
            for index in range(shard * per_shard, min(samples, (shard + 1) * per_shard)):
                caption = " ".join(random.Random(index).choices(words, k=12))
                tar.write({"__key__": f"{index:09d}", "jpg": photo_like_jpeg(rng, size), "txt": caption.encode()})
    return str(directory / f"synthetic-{{000000..{shards - 1:06d}}}.tar")


def measure(config_name: str, shards: str, workers: int, repeats: int) -> dict[str, float]:
    """Median samples/s of the pipeline and of the bare decode loop, interleaved."""
    pipeline = build_pipeline(config_name, shards, workers)
    bare = bare_decode_stream(pipeline)
    rates: dict[str, list[float]] = {"bare": [], "pipeline": []}
    samples_per_second(pipeline)  # warm-up: page cache, lazy imports
    for _ in range(repeats):
        rates["bare"].append(samples_per_second(bare))
        rates["pipeline"].append(samples_per_second(pipeline))
    return {name: statistics.median(values) for name, values in rates.items()}


def rows(datasets: list[tuple[str, str, str]], workers: list[int], repeats: int) -> Iterator[str]:
    for label, config_name, shards in datasets:
        for count in workers:
            rate = measure(config_name, shards, count, repeats)
            yield (f"| {label} | {config_name} | {count} | {rate['bare']:.0f} | {rate['pipeline']:.0f} | "
                   f"{rate['pipeline'] / rate['bare']:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="clip_tiny", help="bundled config or YAML whose data.train is measured")
    parser.add_argument("--shards", default="demo:train", help="shards for --config ('demo:train': 32px PNGs)")
    parser.add_argument("--synthetic", type=int, default=2000,
                        help="also measure clip_base on this many synthetic 224px JPEGs (0: no)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per method and worker count")
    args = parser.parse_args()

    torch.set_num_threads(1)  # as in DataLoader workers: the pipeline's per-sample work is single-threaded
    with tempfile.TemporaryDirectory() as tmp:
        datasets = [(args.shards, args.config, args.shards)]
        if args.synthetic:
            pattern = write_synthetic_shards(Path(tmp), args.synthetic)
            datasets.append((f"{args.synthetic} synthetic 224px JPEGs", "clip_base", pattern))
        print(f"image-text pipeline vs bare decode, torch {torch.__version__}, median of {args.repeats} epochs")
        print("| shards | config | workers | bare decode samples/s | pipeline samples/s | pipeline / bare |")
        print("|---|---|---|---|---|---|")
        for row in rows(datasets, args.workers, args.repeats):
            print(row, flush=True)


if __name__ == "__main__":
    main()
