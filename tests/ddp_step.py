"""One GRPO batch on a fixed global batch, under torchrun with any number of processes.

    torchrun --standalone --nproc_per_node N tests/ddp_step.py MODEL_DIR OUT_DIR [--sharding none|fsdp2]

Each process trains on its contiguous share of the batch's groups (`dspy_p2o.loop.shard`,
as the loop does) with a fresh fp32 trainer per case (replicated under DDP, or sharded with
`--sharding fsdp2`); rank 0 writes OUT_DIR/<case>.pt (the full weights after the batch and the
all-reduced gradients of each optimiser step, gathered from the shards when sharded) and
OUT_DIR/<case>.json: the batch's metrics, every process's rows and forward passes per phase
(counted by hooks on the policy and reference modules), and every process's bytes of parameters,
gradients and AdamW state at the optimiser step. Used by test_multiprocess.py to compare N = 2
with N = 1, and sharded with replicated.
"""

import argparse
import json
from pathlib import Path

import torch

from dspy_p2o.collectives import shard
from dspy_p2o.processes import end_process_group
from dspy_p2o.config import LoraConfig
from dspy_p2o.batch import Call, Rollout
from dspy_p2o.trainer import GRPOTrainer, TrainerConfig
from dspy_p2o.trainer.sharding import training_state_bytes

# name -> TrainerConfig overrides; every loss aggregation, the on-policy fast path (template ratio
# off, one step), the template-ratio mask, two mini-batches whose rows sit on one rank each, a
# LoRA adapter with the KL term (its reference: the module with the adapter disabled; not sharded), and
# "uneven": a compound batch whose shares differ in rows and in distilled rows, with every scoring
# phase on (old: truncated IS; templated: the mask; reference: beta > 0) and several micro-batches
CASES = {
    "grpo": dict(loss_agg="grpo", template_ratio="off"),
    "dapo": dict(loss_agg="dapo", template_ratio="mask", template_ratio_bounds=(0.9, 1.1)),
    "dr_grpo": dict(loss_agg="dr_grpo", template_ratio="soft"),
    "dapo_two_steps": dict(loss_agg="dapo", mini_batch_size=2, micro_batch_tokens=48),
    "lora": dict(loss_agg="dapo", template_ratio="mask", template_ratio_bounds=(0.9, 1.1), beta=0.1,
                 lora=LoraConfig(r=4, alpha=8.0)),
    "uneven": dict(loss_agg="dapo", beta=0.05, tis_cap=2.0, template_ratio="mask", micro_batch_tokens=64),
}
PHASES = ("old", "templated", "ref", "step")
UNSHARDED = {"lora"}  # cases that run without trainer.sharding (a LoRA adapter is not sharded)


def _ids(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(10, 500, (n,), generator=g).tolist()


def global_batch() -> list[list[Rollout]]:
    """Four groups: templated + plain, plain, zero-std (no signal), templated; lengths vary."""
    g = torch.Generator().manual_seed(0)
    groups = []
    for q, (templated, rewards) in enumerate([(2, [1.0, 0.0, 1.0, 0.0]), (0, [0.0, 1.0, 0.5, 0.0]),
                                              (0, [1.0, 1.0, 1.0, 1.0]), (4, [1.0, 0.0, 0.0, 0.0])]):
        x, x_tilde = _ids(g, 8 + q), _ids(g, 12 + q)
        group = []
        for k, reward in enumerate(rewards):
            y = _ids(g, 3 + (k + q) % 4)
            z = "z" if k < templated else None
            group.append(Rollout.of_call(f"q{q}", x, x_tilde if z else x, y, [-1.0] * len(y), reward, z))
        groups.append(group)
    return groups


def uneven_batch() -> list[list[Rollout]]:
    """Four groups of four rollouts; the first two (one process's share of two) make one call per
    rollout, all plain; the last two make three calls per rollout (a compound program) and group 3
    is templated: the other share has three times the rows and every distilled row."""
    g = torch.Generator().manual_seed(1)
    groups = []
    for q, rewards in enumerate([[1.0, 0.0, 0.0, 1.0], [0.0, 0.5, 1.0, 0.0], [1.0, 0.0, 0.5, 0.0],
                                 [0.0, 0.0, 1.0, 0.0]]):
        calls_per_rollout, templated = (1, False) if q < 2 else (3, q == 3)
        prompts = [(_ids(g, 9 + q + c), _ids(g, 14 + q + c)) for c in range(calls_per_rollout)]
        group = []
        for reward in rewards:
            calls = []
            for c, (x, x_tilde) in enumerate(prompts):
                y = _ids(g, 3 + (c + q) % 3)
                calls.append(Call(f"p{c}", x, x_tilde if templated else x, y, [-1.0] * len(y),
                                  "z" if templated else None))
            group.append(Rollout(f"q{q}", calls, reward, "z" if templated else None))
        groups.append(group)
    return groups


BATCHES = {"uneven": uneven_batch}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # a shard's whole (collective)


def _record_gradients(trainer, memory: list[dict]) -> list[list[torch.Tensor]]:
    """The gradients each optimiser step applies (after DDP's all-reduce / FSDP's reduce-scatter, and
    clipping), whole; and this process's tensor bytes after the step (AdamW's state exists by then)."""
    seen, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append([_full(p.grad).detach().clone() for p in trainer.model.parameters() if p.requires_grad])
        out = step(*args, **kwargs)
        memory.append(training_state_bytes(trainer.model, trainer.optimizer.optimizer))
        return out

    trainer.optimizer.step = recording_step
    return seen


def _count_passes(trainer) -> dict[str, int]:
    """Forward passes of the policy (and reference) module per phase of `train_on`."""
    counts = dict.fromkeys(PHASES, 0)
    current = ["other"]

    def hook(*_):
        counts[current[0]] = counts.get(current[0], 0) + 1

    trainer.model.register_forward_pre_hook(hook)
    if trainer.ref_model is not None:
        trainer.accelerator.unwrap_model(trainer.ref_model).register_forward_pre_hook(hook)

    def labelled(name, method):
        def run(*args, **kwargs):
            current[0] = name
            try:
                return method(*args, **kwargs)
            finally:
                current[0] = "other"
        return run

    for name, method in (("old", "_old_logprobs"), ("templated", "_templated_logprobs"),
                         ("ref", "_reference_logprobs"), ("step", "_optimiser_step")):
        setattr(trainer, method, labelled(name, getattr(trainer, method)))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out", type=Path)
    parser.add_argument("--sharding", default="none")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    trainer = None
    for name, overrides in CASES.items():
        if args.sharding != "none" and name in UNSHARDED:
            continue
        config = TrainerConfig(lr=1e-3, max_grad_norm=1.0, sharding=args.sharding, **overrides)
        trainer = GRPOTrainer(args.model_dir, config=config, accelerator=trainer.accelerator if trainer else None)
        acc = trainer.accelerator
        memory: list[dict] = []
        grads = _record_gradients(trainer, memory)
        passes = _count_passes(trainer)
        mine = shard(BATCHES.get(name, global_batch)(), acc.process_index, acc.num_processes)
        rollouts = [r for group in mine for r in group]
        metrics = trainer.train_on(rollouts)
        weights = trainer.full_state_dict()  # gathered onto rank 0 when sharded (every rank calls it)
        from accelerate.utils import gather_object

        ranks = gather_object([{"rows": sum(len(r.calls) for r in rollouts), "passes": passes,
                                "memory": memory[-1]}])
        if acc.is_main_process:
            torch.save({"weights": {k: v.detach().clone() for k, v in weights.items()}, "grads": grads},
                       args.out / f"{name}.pt")
            (args.out / f"{name}.json").write_text(json.dumps(
                {**metrics, "processes": acc.num_processes, "sharding": args.sharding, "ranks": ranks}))
        acc.wait_for_everyone()


if __name__ == "__main__":
    main()
    end_process_group()
