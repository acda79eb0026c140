"""Image-token sampling speed of the DALL-E token decoder: with and without the KV cache.

Sampling an image draws its tokens one at a time (Ramesh et al. 2021, sec.
2.3). Without a cache every token recomputes the transformer over the whole
sequence so far (caption + image tokens: quadratic in the image length);
with the KV cache (:class:`mmptm.encoders.dalle.KVCache`) each token runs
only its own position against the stored keys and values. Both draw from the
same seeded generator and are checked to give the same tokens. The two are
timed interleaved, A/B/A/B, ``--repeats`` times after a warm-up, and the
median is reported as image tokens per second (batch × tokens / wall time),
with this process's CPU time beside it: on a CPU shared with other jobs the
wall time depends on their load, the CPU time much less.

    python benchmarks/generation.py                                   # 256 image tokens (16x16), CPU, fp32
    python benchmarks/generation.py --width 512 --layers 12 --heads 8 --batch-size 16 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid-size", type=int, default=16, help="image tokens per side (16: 256 tokens)")
    parser.add_argument("--text-length", type=int, default=16)
    parser.add_argument("--codebook-size", type=int, default=1024)
    parser.add_argument("--vocab-size", type=int, default=1000)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4, help="images sampled together")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from mmptm.encoders.dalle import TokenDecoder
    from mmptm.generation.sampling import sample_image_tokens

    torch.manual_seed(0)
    model = TokenDecoder(
        codebook_size=args.codebook_size, grid_size=args.grid_size, text_length=args.text_length, width=args.width,
        layers=args.layers, heads=args.heads, vocab_size=args.vocab_size, pad_id=0,
    ).to(args.device).eval()
    text = torch.randint(4, args.vocab_size, (args.batch_size, args.text_length), device=args.device)
    text[:, 0], text[:, -1] = 2, 3  # bos ... eos, no padding
    tokens = args.batch_size * model.num_image_tokens

    def sample(use_cache: bool) -> tuple[tuple[float, float], torch.Tensor]:
        """(wall seconds, CPU seconds) of sampling the batch, and the tokens."""
        generator = torch.Generator(device=args.device).manual_seed(1)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        sampled = sample_image_tokens(model, text, generator=generator, use_cache=use_cache)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - wall, time.process_time() - cpu), sampled

    methods = {"KV cache": True, "full recompute": False}
    outputs = {name: sample(use_cache)[1] for name, use_cache in methods.items()}  # warm-up
    same = torch.equal(outputs["KV cache"], outputs["full recompute"])
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, use_cache in methods.items():
            times[name].append(sample(use_cache)[0])
    wall = {name: statistics.median(t[0] for t in values) for name, values in times.items()}
    cpu = {name: statistics.median(t[1] for t in values) for name, values in times.items()}

    print(f"token decoder width {args.width}, {args.layers} layers, {args.heads} heads; {args.text_length} caption "
          f"tokens + {model.num_image_tokens} image tokens ({args.grid_size}x{args.grid_size}), codebook "
          f"{args.codebook_size}; batch {args.batch_size}, device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats}, interleaved; same tokens with and "
          f"without the cache: {'yes' if same else 'NO'}\n")
    print("| method | seconds / batch | image tokens/s | speedup | CPU seconds / batch | CPU speedup |")
    print("|---|---|---|---|---|---|")
    for name in methods:
        print(f"| {name} | {wall[name]:.3f} | {tokens / wall[name]:.1f} | {wall['full recompute'] / wall[name]:.1f}x | "
              f"{cpu[name]:.3f} | {cpu['full recompute'] / cpu[name]:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
