"""CLIP training throughput: mmptm vs open_clip on the same architecture, batch, precision and optimizer.

Both models get the same weights (open_clip's, imported with mmptm's
converter), the same random batch and ``torch.optim.AdamW``; one training step
is forward, contrastive loss (mmptm's ``contrastive`` objective / open_clip's
``ClipLoss``), backward, optimizer step. After a warm-up the two are timed
interleaved, A/B/A/B, ``--repeats`` times ``--steps`` steps, and the median
step time is reported, with the model FLOPs of one step (counted with
``torch.utils.flop_counter``) per second and as a fraction of this machine's
dense matmul peak in the same dtype, measured in the same run (MFU).

    python benchmarks/clip_train.py                                  # small ViT, fp32 and bf16, CPU
    python benchmarks/clip_train.py --model ViT-B-32 --batch-size 32
    python benchmarks/clip_train.py --model ViT-B-16 --batch-size 256 --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch

SMALL = {  # a ViT small enough for a quick CPU run, in open_clip's config format
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 256, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}


def build_pair(model_name: str, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """open_clip's model and mmptm's with the same weights."""
    import open_clip

    from mmptm.interop.open_clip import infer_model_config, to_mmptm_layout
    from mmptm.models import create_model

    torch.manual_seed(0)
    if model_name == "small":
        reference = open_clip.model.CLIP(**SMALL)
        heads = (SMALL["text_cfg"]["heads"], SMALL["vision_cfg"]["width"] // 64)
    else:
        reference = open_clip.create_model(model_name, pretrained=None)
        config = open_clip.get_model_config(model_name)
        heads = (config["text_cfg"].get("heads", 8), config["vision_cfg"]["width"] // 64)
    state = to_mmptm_layout(reference.state_dict())
    config = infer_model_config(state, "gelu", text_heads=heads[0], vision_heads=heads[1])
    vocab = state["text.token_embedding.weight"].shape[0]
    clip_bpe = SimpleNamespace(vocab_size=vocab, pad_id=0, eos_id=vocab - 1)  # what the text tower reads from it
    ours = create_model(config, tokenizer=clip_bpe)
    ours.load_state_dict(state)
    return reference.to(device).train(), ours.to(device).train()


def training_step(model: torch.nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                  batch: dict[str, torch.Tensor], autocast: Callable) -> None:
    with autocast():
        loss = loss_fn(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def matmul_peak(dtype: torch.dtype, device: str, size: int = 2048, repeats: int = 5) -> float:
    """Dense matmul FLOP/s of this machine in ``dtype``: the best of a few square products."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_flops(model: torch.nn.Module, loss_fn: Callable, batch: dict[str, torch.Tensor]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss_fn(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="'small' or an open_clip model name, e.g. ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import open_clip

    from mmptm.objectives.contrastive import ContrastiveLoss

    reference, ours = build_pair(args.model, args.device)
    image_size = ours.visual.image_size
    context = ours.text.context_length
    generator = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.randn(args.batch_size, 3, image_size, image_size, generator=generator).to(args.device),
        "text": torch.randint(1, 49000, (args.batch_size, context), generator=generator).to(args.device),
    }
    batch["text"][:, -1] = 49407  # end of text, where both towers pool
    clip_loss = open_clip.loss.ClipLoss()

    def open_clip_loss(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        image, text, scale = model(b["image"], b["text"])  # open_clip's training forward
        return clip_loss(image, text, scale)

    objective = ContrastiveLoss()

    def mmptm_loss(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return objective(model, b)["loss"]

    runners = {"open_clip": (reference, open_clip_loss), "mmptm": (ours, mmptm_loss)}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-5) for name, (model, _) in runners.items()}
    flops = step_flops(ours, mmptm_loss, batch)
    print(f"model {args.model}, batch {args.batch_size}, device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {flops / 1e9:.1f} GFLOP per training step")
    print(f"{'precision':>9} | {'open_clip samples/s':>19} | {'mmptm samples/s':>15} | {'ratio':>5} | "
          f"{'mmptm TFLOP/s':>13} | {'MFU':>6}")
    for precision in args.precision:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        autocast = (
            (lambda d=dtype: torch.autocast(device_type=torch.device(args.device).type, dtype=d))
            if precision == "bf16" else contextlib.nullcontext
        )
        peak = matmul_peak(dtype, args.device)
        for name, (model, loss_fn) in runners.items():
            for _ in range(args.warmup):
                training_step(model, loss_fn, optimizers[name], batch, autocast)
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.repeats):
            for name, (model, loss_fn) in runners.items():
                sync(args.device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    training_step(model, loss_fn, optimizers[name], batch, autocast)
                sync(args.device)
                times[name].append((time.perf_counter() - start) / args.steps)
        median = {name: statistics.median(values) for name, values in times.items()}
        rate = {name: args.batch_size / seconds for name, seconds in median.items()}
        achieved = flops / median["mmptm"]
        print(f"{precision:>9} | {rate['open_clip']:>19.1f} | {rate['mmptm']:>15.1f} | "
              f"{rate['mmptm'] / rate['open_clip']:>5.2f} | {achieved / 1e12:>13.3f} | {achieved / peak:>6.1%}",
              flush=True)


if __name__ == "__main__":
    main()
