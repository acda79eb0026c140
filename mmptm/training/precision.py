"""bf16 autocast on CPUs without bf16 arithmetic: bf16-rounded operands, fp32 GEMM kernels, bf16 results.

On a CPU without AVX-512 BF16 or AMX (e.g. AMD Zen 3, most AVX2 machines),
PyTorch's bf16 matrix products fall back to a scalar kernel that is 5-70x
slower than the fp32 one, so ``torch.autocast("cpu", torch.bfloat16)`` makes
training several times slower than fp32. A bf16 GEMM is defined as products
of bf16 operands accumulated in fp32 and rounded to bf16 (Kalamkar et al.
2019, "A Study of BFLOAT16 for Deep Learning Training", sec. 3): the product
of two bf16 numbers is exact in fp32, so rounding the operands to bf16,
multiplying them with the fp32 kernel and rounding the result to bf16 computes
the same thing (up to the order of the fp32 accumulation), at fp32 GEMM speed.
:class:`Bf16MatmulsInFp32` does that for the GEMM-based ops inside an active
CPU bf16 autocast region; every other op keeps autocast's own behaviour, and
backward follows the same casts (gradients are rounded to bf16 where autocast
rounds them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

# The ops that autocast runs in bf16 through a GEMM (matmul-like and convolution kernels).
GEMM_OPS: frozenset[Callable[..., Any]] = frozenset({
    F.linear, F.conv1d, F.conv2d, F.conv3d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
    torch.Tensor.__rmatmul__, torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm, torch.baddbmm,
})


def cpu_has_bf16_gemm() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (oneDNN's AVX-512 BF16 / AMX kernels)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _bf16_operand(value: Any) -> Any:
    """A floating tensor rounded to bf16 (autocast's cast) and widened, exactly, back to fp32."""
    if torch.is_tensor(value) and value.is_floating_point():
        return value.to(torch.bfloat16).float()
    return value


class Bf16MatmulsInFp32(TorchFunctionMode):
    """Inside CPU bf16 autocast, compute GEMM ops as bf16 ops but with the fp32 kernels (see the module doc)."""

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func not in GEMM_OPS or not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        if torch.get_autocast_dtype("cpu") != torch.bfloat16:
            return func(*args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            out = func(*tree_map(_bf16_operand, args), **tree_map(_bf16_operand, kwargs))
        return out.to(torch.bfloat16)


@contextlib.contextmanager
def cpu_bf16_gemms(device: torch.device, precision: str) -> Iterator[None]:
    """:class:`Bf16MatmulsInFp32` for bf16 training on a CPU without bf16 GEMMs; otherwise nothing.

    Enter it around the autocast region and around ``backward()`` too: activation checkpointing
    and GradCache re-run forward code in backward (under the autocast state they recorded), and
    it must compute what the forward computed.

    Args:
        device: where the model trains.
        precision: the run's precision (``fp32``, ``bf16``, ``fp16``).
    """
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16_gemm():
        with Bf16MatmulsInFp32():
            yield
    else:
        yield
