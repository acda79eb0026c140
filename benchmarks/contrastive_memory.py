"""Peak memory and time of CLIP's contrastive loss (forward + backward) by global batch size.

Compares the full ``[N, N]`` logits loss (open_clip's and mmptm's default)
with mmptm's chunked loss (``objectives: [{name: contrastive, chunk_size: ...}]``;
with ``grad_cache_chunk`` the towers' activations are bounded too, so the
loss is what grows with the global batch),
on random L2-normalised features, one configuration per subprocess so that each
peak is its own. On the CPU the peak is the process's maximum resident set
size; on a GPU, ``torch.cuda.max_memory_allocated``.

    python benchmarks/contrastive_memory.py                    # 1k..32k, 512-d, chunk 1024, full logits to 8k
    python benchmarks/contrastive_memory.py --sizes 1024 4096 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(method: str, n: int, dim: int, chunk_size: int, device: str) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from mmptm.objectives.contrastive import chunked_contrastive_loss, clip_contrastive_loss

    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(n, dim, generator=generator), dim=-1).to(device).requires_grad_()
    text = F.normalize(torch.randn(n, dim, generator=generator), dim=-1).to(device).requires_grad_()
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if method == "chunked":
        loss = chunked_contrastive_loss(image, text, scale, chunk_size)[0]
    else:
        loss = clip_contrastive_loss(image, text, scale)[0]
    loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 2**20  # kB -> GiB
    return {"seconds": time.perf_counter() - start, "peak_gib": peak, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--full-max", type=int, default=8192, help="largest batch for the full-logits loss")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.dim, args.chunk_size, args.device)))
        return
    print(f"contrastive loss forward+backward, {args.dim}-d features, chunk {args.chunk_size}, device {args.device}, "
          "peak memory above the process's baseline (CPU: max RSS; GPU: max allocated)\n")
    print("| global batch | full logits GiB | full logits s | chunked GiB | chunked s |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        cells = []
        for method in ("full", "chunked"):
            if method == "full" and n > args.full_max:
                cells.append("(skipped) | ")
                continue
            out = subprocess.run(
                [sys.executable, __file__, "--one", method, str(n), "--dim", str(args.dim),
                 "--chunk-size", str(args.chunk_size), "--device", args.device],
                capture_output=True, text=True, check=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            cells.append(f"{result['peak_gib']:.2f} | {result['seconds']:.2f}")
        print(f"| {n} | {cells[0]} | {cells[1]} |", flush=True)

if __name__ == "__main__":
    main()
