"""FSDP2 sharding of mmptm models, and strategy-independent (full) state dicts for checkpoints.

``distributed.strategy: fsdp`` shards every transformer block (each element of
a parameter-holding ``nn.ModuleList``, e.g. ``transformer.resblocks``) and then
the root with ``torch.distributed.fsdp.fully_shard`` (FSDP2, per-parameter
sharding; the ZeRO-3 scheme surveyed in Han et al. 2021, sec. 6.1). It runs on
CUDA with NCCL and on CPU processes with gloo alike, which is how it is tested.

Checkpoints load whatever the strategy and process count. A sharded run saves
its model and optimizer shards with ``torch.distributed.checkpoint`` (every
rank writes its part, nothing is gathered) and, for inference, a consolidated
``model.safetensors``; DDP and single-process runs save full state, the
optimizer keyed by parameter name. A run saved by 2 FSDP processes therefore
resumes with 1 process, or with 4, and loads for inference as any other
checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmptm.config import ConfigError

MIXED_PRECISION_PARAMS = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Methods of a dual encoder that run the model outside forward(): FSDP must gather around them too.
FORWARD_METHODS = ("encode_image", "encode_text")


def _full_options(cpu_offload: bool = True) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded on their own: every element of each ``nn.ModuleList`` that holds parameters."""
    units = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            units += [block for block in module if any(True for _ in block.parameters())]
    return units


def check_shardable(model: nn.Module) -> None:
    """Raise a ConfigError for a model that declares, in ``fsdp_unsupported``, why FSDP cannot train it."""
    reason = getattr(model, "fsdp_unsupported", None)
    if reason:
        raise ConfigError(
            f"distributed.strategy=fsdp cannot train a {type(model).__name__} model: {reason}; "
            "use distributed.strategy=ddp"
        )


def shard_model(model: nn.Module, precision: str, cpu_offload: bool = False) -> list[nn.Parameter]:
    """Apply FSDP2 in place: each block of :func:`shard_units`, then the root.

    Scalar parameters (a CLIP's ``logit_scale``, SigLIP's ``logit_bias``)
    cannot be sharded: they stay whole on every rank, and the caller averages
    their gradients with :func:`average_replicated_grads` after backward.

    Args:
        model: the model, on its device, in the default process group.
        precision: ``fp32``, or ``bf16``/``fp16`` to gather parameters and compute in that
            type (gradients are still reduced in fp32).
        cpu_offload: keep shards, gradients and optimizer state in pinned CPU memory, moved to the
            GPU around each use (FSDP2's ``CPUOffloadPolicy``; it needs CUDA).

    Returns:
        The replicated (unsharded) parameters.

    Raises:
        ConfigError: a model FSDP cannot train (:func:`check_shardable`), before anything is sharded.
    """
    check_shardable(model)
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    options = {
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=MIXED_PRECISION_PARAMS.get(precision), reduce_dtype=torch.float32
        ),
        "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
    }
    replicated = [p for p in model.parameters() if p.ndim == 0]
    for unit in shard_units(model):
        fully_shard(unit, ignored_params=set(replicated), **options)
    fully_shard(model, ignored_params=set(replicated), **options)
    for method in FORWARD_METHODS:
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return replicated


def average_replicated_grads(params: list[nn.Parameter]) -> None:
    """Average the gradients of parameters FSDP leaves whole, as it averages those of its shards."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.stack([g.reshape(()) for g in grads])
    dist.all_reduce(flat)  # SUM: gloo has no AVG
    flat /= dist.get_world_size()
    for grad, value in zip(grads, flat, strict=True):
        grad.copy_(value.reshape(grad.shape))


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of sharded (DTensor) and replicated parameters together; return it."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if hasattr(g, "full_tensor")]
    whole = [g for g in grads if not hasattr(g, "full_tensor")]
    squares = torch.zeros((), dtype=torch.float32, device=grads[0].device if grads else "cpu")
    if sharded:
        norm = torch.nn.utils.get_total_norm(sharded)
        squares = squares + (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float() ** 2
    if whole:
        squares = squares + torch.nn.utils.get_total_norm(whole).float() ** 2
    total = squares.sqrt()
    coefficient = min(1.0, max_norm / (total.item() + 1e-6))
    if coefficient < 1.0:
        for grad in grads:
            grad.mul_(coefficient)
    return total


def model_state(model: nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The full state dict (a collective when ``sharded``: every rank calls it; rank 0 gets the tensors)."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], sharded: bool) -> None:
    """Load a full state dict into the model (each rank with the whole dict: it keeps its shards)."""
    if not sharded:
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_full_options(cpu_offload=False))


def _parameter_names(modules: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in modules.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(modules: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict[str, Any]:
    """The optimizer state keyed by parameter name (``modules`` names every optimised parameter).

    A collective when ``sharded``; rank 0 gets the full state.
    """
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(modules, optimizer, options=_full_options())
    names = _parameter_names(modules, optimizer)
    state = optimizer.state_dict()
    return {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]],
    }


def load_optimizer_state(
    modules: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], sharded: bool
) -> None:
    """Load what :func:`optimizer_state` returned, whichever strategy and process count wrote it."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(modules, optimizer, state, options=_full_options(cpu_offload=False))
        return
    index = {name: i for i, name in enumerate(_parameter_names(modules, optimizer))}
    missing = sorted(set(index) - set(n for g in state["param_groups"] for n in g["params"]))
    if missing:
        raise ValueError(f"the saved optimizer state has no entry for parameters {missing[:5]}")
    optimizer.load_state_dict({
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
    })


def save_distributed_state(modules: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Every rank writes its shards of the model and optimizer state (``torch.distributed.checkpoint``).

    The folder reloads on any number of processes, sharded or not (see :func:`load_distributed_state`);
    nothing is gathered, so it scales to models whose full state does not fit in one process.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(modules), "optimizer": get_optimizer_state_dict(modules, optimizer)}
    dcp.save(state, checkpoint_id=str(path))


def load_distributed_state(modules: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Load what :func:`save_distributed_state` wrote, resharded for this run's processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(modules), "optimizer": get_optimizer_state_dict(modules, optimizer)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(modules, state["model"])
    set_optimizer_state_dict(modules, optimizer, state["optimizer"])
