"""FSDP2 sharding of the trainer's model (`trainer.sharding: fsdp2`) and the full / sharded state
dicts that checkpoints and weight syncs take from it.

With N processes each holds 1/N of the parameters, gradients and AdamW state (PyTorch's
`torch.distributed.fsdp.fully_shard`: DTensor parameters sharded along dim 0), instead of a full
replica each (DDP). A forward of a sharded module gathers each layer's parameters from every
process and frees them after, so EVERY forward is a collective: all processes must run the same
number of forwards, no-grad scoring included (the trainer plans its passes so: `GRPOTrainer._plan`).

The trainer applies `fully_shard` itself rather than through accelerate's FSDP plugin: accelerate
1.16 shards only on accelerators (on CPU an FSDP plugin falls back to DDP), so its path could not be
the tested one. The calls are those of accelerate's `fsdp_version: 2` path with
TRANSFORMER_BASED_WRAP: `fully_shard` on every decoder layer (the model's `_no_split_modules`
classes), then on the whole model (embeddings, final norm, a tied head); parameters resharded after
each forward; bf16 compute over fp32 shards through `MixedPrecisionPolicy`. The same code runs
under torchrun over gloo on CPU (the tests) and over NCCL on GPUs.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch


def shard_module(module: torch.nn.Module, *, device: torch.device, compute_dtype: torch.dtype | None) -> torch.nn.Module:
    """`fully_shard` every decoder layer of a transformers causal LM, then the model, over all
    processes of the initialised process group (in place; returns the module). Parameters move to
    `device`; `compute_dtype` (e.g. bf16) is what forwards run in, gradients are reduced in fp32."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from dspy_p2o.config import ConfigError

    if hasattr(module, "peft_config"):
        raise ConfigError("trainer.sharding fsdp2 does not shard a peft (LoRA) model; use sharding: none with LoRA")
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("trainer.sharding fsdp2 shards over the processes of a run: launch it with torchrun or "
                          "accelerate launch (torchrun --nproc_per_node 1 for one process)")
    layers = decoder_layers(module)
    if not layers:
        raise ConfigError(f"trainer.sharding fsdp2: {type(module).__name__} names no decoder layer class "
                          "(_no_split_modules) to shard by")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    return module


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules of the classes transformers keeps whole
    (`_no_split_modules`, e.g. Qwen3DecoderLayer) -- what accelerate's transformer wrap policy wraps."""
    names = set(getattr(module, "_no_split_modules", None) or ())
    return [m for m in module.modules() if type(m).__name__ in names]


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_state_dict(module: torch.nn.Module, *, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's weights as plain tensors, gathered from the shards (a collective: every process
    calls it). `everywhere=False`: on CPU, on the main process only (the others get {}), as
    `save_pretrained` and a vLLM reload need; True: on every process (each rank's own engine replica)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=not everywhere))


def local_bytes(tensors: Iterable[Any]) -> int:
    """Bytes this process holds of `tensors` (a DTensor counts its local shard; shared storage once)."""
    from torch.distributed.tensor import DTensor

    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), local.numel())
        if key not in seen:
            seen.add(key)
            total += local.numel() * local.element_size()
    return total


def training_state_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This process's bytes of parameters, gradients and optimiser state (what sharding divides)."""
    params = [p for p in module.parameters()]
    return {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params if p.grad is not None),
            "optimizer": local_bytes(v for state in optimizer.state.values() for v in state.values())}
