"""CLIP training throughput: mmptm vs open_clip on the same architecture, batch, precision and optimizer.

Each side runs the training step its user gets by default. mmptm: the
trainer's step (``contrastive`` objective, ``build_optimizer``'s AdamW with
its weight-decay groups, gradient clipping at ``train.grad_clip``, and for
bf16 the trainer's autocast). open_clip: the step of its ``train.py``
(``ClipLoss`` on the model's output dict, ``torch.optim.AdamW`` over its
gain/bias and other groups as its ``main.py`` builds it, no clipping by
default, the ``logit_scale`` clamp after the step). Both get the same weights
(open_clip's, imported with mmptm's converter), the same random batch, the same
precision (fp32, or ``torch.autocast`` bf16) and the same optimizer
hyperparameters (``clip_base``'s lr, betas, eps, weight decay). After a
warm-up the two are timed interleaved, A/B/A/B, ``--repeats`` times ``--steps``
steps, and the median step time is reported, with the FLOPs of one step as
each side runs it (counted with ``torch.utils.flop_counter``) per second and as
a fraction of this machine's dense matmul peak in the same dtype, measured in
the same run (MFU; for bf16 the better of PyTorch's bf16 matmul and mmptm's, see
:mod:`mmptm.training.precision`).

The captions are CLIP BPE rows as the tokenizer writes them, padded to the
77-token context, ``--caption-tokens MIN MAX`` long (default 5-30, web alt-text
length). mmptm's text tower skips the columns after the batch's last
end-of-text token (exact under causal attention, see
:class:`mmptm.encoders.text.TextTransformer`), so it runs fewer FLOPs than
open_clip on the same batch; ``--caption-tokens 77 77`` removes that difference.

    python benchmarks/clip_train.py                                  # small ViT, fp32 and bf16, CPU
    python benchmarks/clip_train.py --model ViT-B-32 --batch-size 32 --steps 1 --repeats 3
    python benchmarks/clip_train.py --model ViT-B-16 --batch-size 256 --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch

# clip_base's optimizer settings (mmptm's TrainConfig defaults), given to both sides.
LR, WEIGHT_DECAY, BETAS, EPS, GRAD_CLIP = 5e-4, 0.2, (0.9, 0.98), 1e-6, 1.0

SMALL = {  # a ViT small enough for a quick CPU run, in open_clip's config format
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 256, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}


def build_pair(model_name: str, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """open_clip's model (returning its output dict, as in its training) and mmptm's with the same weights."""
    import open_clip

    from mmptm.interop.open_clip import infer_model_config, to_mmptm_layout
    from mmptm.models import create_model

    torch.manual_seed(0)
    if model_name == "small":
        reference = open_clip.model.CLIP(**SMALL, output_dict=True)
        heads = (SMALL["text_cfg"]["heads"], SMALL["vision_cfg"]["width"] // 64)
    else:
        reference = open_clip.create_model(model_name, pretrained=None, output_dict=True)
        config = open_clip.get_model_config(model_name)
        heads = (config["text_cfg"].get("heads", 8), config["vision_cfg"]["width"] // 64)
    state = to_mmptm_layout(reference.state_dict())
    config = infer_model_config(state, "gelu", text_heads=heads[0], vision_heads=heads[1])
    vocab = state["text.token_embedding.weight"].shape[0]
    clip_bpe = SimpleNamespace(vocab_size=vocab, pad_id=0, eos_id=vocab - 1)  # what the text tower reads from it
    ours = create_model(config, tokenizer=clip_bpe)
    ours.load_state_dict(state)
    return reference.to(device).train(), ours.to(device).train()


def precision_context(precision: str, device: str) -> Callable[[], contextlib.AbstractContextManager]:
    """``torch.autocast`` for bf16 (what both trainers use), nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def mmptm_step(model: torch.nn.Module, device: str) -> Callable[[dict[str, torch.Tensor], str], None]:
    """mmptm's default training step, as ``Trainer._train_step`` runs it with one objective."""
    from mmptm.objectives.contrastive import ContrastiveLoss
    from mmptm.training.optim import build_optimizer
    from mmptm.training.precision import cpu_bf16_gemms

    objective = ContrastiveLoss()
    optimizer = build_optimizer(model.named_parameters(), LR, WEIGHT_DECAY, BETAS, EPS)

    def step(batch: dict[str, torch.Tensor], precision: str) -> None:
        with cpu_bf16_gemms(torch.device(device), precision):
            with precision_context(precision, device)():
                loss = objective(model, batch)["loss"].float()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def open_clip_step(model: torch.nn.Module, device: str) -> Callable[[dict[str, torch.Tensor], str], None]:
    """open_clip's training step as its ``train.py`` runs it (optimizer as its ``main.py`` builds it)."""
    import open_clip

    def exclude(name: str, param: torch.nn.Parameter) -> bool:  # open_clip main.py's gain_or_bias test
        return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": WEIGHT_DECAY}],
        lr=LR, betas=BETAS, eps=EPS,
    )
    loss_fn = open_clip.loss.ClipLoss()

    def step(batch: dict[str, torch.Tensor], precision: str) -> None:
        optimizer.zero_grad()
        with precision_context(precision, device)():
            losses = loss_fn(**model(batch["image"], batch["text"]), output_dict=True)
            total_loss = sum(losses.values())
        total_loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return step


def matmul_peak(precision: str, device: str, size: int = 2048, repeats: int = 5) -> float:
    """Dense matmul FLOP/s of this machine in ``precision``: the best of a few square products.

    For bf16, the better of PyTorch's bf16 product and mmptm's (fp32 kernels on bf16-rounded
    operands where the CPU lacks bf16 ones), both with bf16 inputs and output. Each is timed at
    the largest power-of-two side up to ``size`` whose product takes under 0.2 s, so that a slow
    fallback kernel (PyTorch's bf16 one on AVX2 CPUs) costs seconds, not minutes.
    """
    from mmptm.training.precision import cpu_bf16_gemms

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    variants = [contextlib.nullcontext]
    if precision == "bf16":
        variants.append(lambda: cpu_bf16_gemms(torch.device(device), "bf16"))

    def seconds(variant: Callable[[], contextlib.AbstractContextManager], n: int) -> float:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        sync(device)
        start = time.perf_counter()
        with precision_context(precision, device)(), variant():
            a @ b
        sync(device)
        return time.perf_counter() - start

    best = 0.0
    for variant in variants:
        n = 256
        while n < size and seconds(variant, n) < 0.2:
            n *= 2
        best = max(best, 2 * n**3 / min(seconds(variant, n) for _ in range(repeats)))
    return best


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_flops(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """FLOPs of one forward and backward of ``model`` (either side) and the contrastive loss, as it runs them."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmptm.objectives.contrastive import clip_contrastive_loss

    with FlopCounterMode(display=False) as counter:
        out = model(batch["image"], batch["text"])
        clip_contrastive_loss(out["image_features"], out["text_features"], out["logit_scale"])[0].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def caption_batch(
    batch_size: int, context: int, shortest: int, longest: int, generator: torch.Generator
) -> torch.Tensor:
    """CLIP BPE rows as the tokenizer writes them: start token, caption, end token, zero padding to ``context``.

    Each row's length (start and end tokens included) is uniform in ``[shortest, longest]``.
    """
    lengths = torch.randint(shortest, longest + 1, (batch_size,), generator=generator)
    text = torch.zeros(batch_size, context, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        text[row, 0] = 49406
        text[row, 1 : length - 1] = torch.randint(1, 49000, (length - 2,), generator=generator)
        text[row, length - 1] = 49407  # end of text, where both towers pool
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="'small' or an open_clip model name, e.g. ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--caption-tokens", type=int, nargs=2, default=[5, 30], metavar=("MIN", "MAX"),
        help="each caption's token count, start and end included, uniform in [MIN, MAX] (default 5 30: web "
        "alt-text such as LAION's averages ~11 words); '77 77' fills the whole context",
    )
    args = parser.parse_args()

    reference, ours = build_pair(args.model, args.device)
    image_size = ours.visual.image_size
    context = ours.text.context_length
    shortest, longest = args.caption_tokens
    if not 2 <= shortest <= longest <= context:
        parser.error(f"--caption-tokens needs 2 <= MIN <= MAX <= {context} (the context length)")
    generator = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.randn(args.batch_size, 3, image_size, image_size, generator=generator).to(args.device),
        "text": caption_batch(args.batch_size, context, shortest, longest, generator).to(args.device),
    }
    steps = {"open_clip": open_clip_step(reference, args.device), "mmptm": mmptm_step(ours, args.device)}
    flops = {"open_clip": step_flops(reference, batch), "mmptm": step_flops(ours, batch)}
    print(f"model {args.model}, batch {args.batch_size}, captions of {shortest}-{longest} of {context} tokens, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; GFLOP per "
          f"training step as each side runs it: open_clip {flops['open_clip'] / 1e9:.1f}, mmptm "
          f"{flops['mmptm'] / 1e9:.1f}; each side's default training step (mmptm: Trainer step with clipping at "
          f"{GRAD_CLIP}; open_clip: train.py step), AdamW lr {LR}, betas {BETAS}, eps {EPS}, weight decay "
          f"{WEIGHT_DECAY}; median of {args.repeats} x {args.steps} steps, interleaved\n")
    print("| precision | open_clip samples/s | mmptm samples/s | mmptm / open_clip | open_clip TFLOP/s | "
          "mmptm TFLOP/s | matmul peak TFLOP/s | open_clip MFU | mmptm MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for precision in args.precision:
        peak = matmul_peak(precision, args.device)
        for step in steps.values():
            for _ in range(args.warmup):
                step(batch, precision)
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                sync(args.device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(batch, precision)
                sync(args.device)
                times[name].append((time.perf_counter() - start) / args.steps)
        median = {name: statistics.median(values) for name, values in times.items()}
        rate = {name: args.batch_size / seconds for name, seconds in median.items()}
        achieved = {name: flops[name] / seconds for name, seconds in median.items()}
        print(f"| {precision} | {rate['open_clip']:.1f} | {rate['mmptm']:.1f} | "
              f"{rate['mmptm'] / rate['open_clip']:.2f} | {achieved['open_clip'] / 1e12:.3f} | "
              f"{achieved['mmptm'] / 1e12:.3f} | {peak / 1e12:.3f} | {achieved['open_clip'] / peak:.1%} | "
              f"{achieved['mmptm'] / peak:.1%} |", flush=True)


if __name__ == "__main__":
    main()
