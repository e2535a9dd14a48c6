"""One GRPO batch on a fixed global batch, under torchrun with any number of processes.

    torchrun --standalone --nproc_per_node N tests/ddp_step.py MODEL_DIR OUT_DIR

Each process trains on its contiguous share of the batch's groups (`dspy_p2o.loop.shard`,
as the loop does) with a fresh fp32 trainer per case; rank 0 writes OUT_DIR/<case>.pt (the
weights after the batch and the all-reduced gradients of each optimiser step) and
OUT_DIR/<case>.json (the batch's metrics). Used by test_multiprocess.py to compare N = 2
with N = 1.
"""

import json
import sys
from pathlib import Path

import torch

from dspy_p2o.collectives import shard
from dspy_p2o.config import LoraConfig
from dspy_p2o.rollouts import Rollout
from dspy_p2o.trainer import GRPOTrainer, TrainerConfig

# name -> TrainerConfig overrides; every loss aggregation, the on-policy fast path (template ratio
# off, one step), the template-ratio mask, two mini-batches whose rows sit on one rank each, and a
# LoRA adapter with the KL term (its reference: the module with the adapter disabled)
CASES = {
    "grpo": dict(loss_agg="grpo", template_ratio="off"),
    "dapo": dict(loss_agg="dapo", template_ratio="mask", template_ratio_bounds=(0.9, 1.1)),
    "dr_grpo": dict(loss_agg="dr_grpo", template_ratio="soft"),
    "dapo_two_steps": dict(loss_agg="dapo", mini_batch_size=2, micro_batch_tokens=48),
    "lora": dict(loss_agg="dapo", template_ratio="mask", template_ratio_bounds=(0.9, 1.1), beta=0.1,
                 lora=LoraConfig(r=4, alpha=8.0)),
}


def global_batch() -> list[list[Rollout]]:
    """Four groups: templated + plain, plain, zero-std (no signal), templated; lengths vary."""
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(10, 500, (n,), generator=g).tolist()

    groups = []
    for q, (templated, rewards) in enumerate([(2, [1.0, 0.0, 1.0, 0.0]), (0, [0.0, 1.0, 0.5, 0.0]),
                                              (0, [1.0, 1.0, 1.0, 1.0]), (4, [1.0, 0.0, 0.0, 0.0])]):
        x, x_tilde = ids(8 + q), ids(12 + q)
        group = []
        for k, reward in enumerate(rewards):
            y = ids(3 + (k + q) % 4)
            z = "z" if k < templated else None
            group.append(Rollout.of_call(f"q{q}", x, x_tilde if z else x, y, [-1.0] * len(y), reward, z))
        groups.append(group)
    return groups


def _record_gradients(trainer) -> list[list[torch.Tensor]]:
    """The gradients each optimiser step applies (after DDP's all-reduce and clipping), of the
    parameters that train (with LoRA: the adapter's)."""
    seen, step = [], trainer.optimizer.step

    def recording_step(*args, **kwargs):
        seen.append([p.grad.detach().clone() for p in trainer.model.parameters() if p.requires_grad])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    return seen


def main() -> None:
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    trainer = None
    for name, overrides in CASES.items():
        config = TrainerConfig(lr=1e-3, max_grad_norm=1.0, **overrides)
        trainer = GRPOTrainer(model_dir, config=config, accelerator=trainer.accelerator if trainer else None)
        acc = trainer.accelerator
        grads = _record_gradients(trainer)
        mine = shard(global_batch(), acc.process_index, acc.num_processes)
        metrics = trainer.train_on([r for group in mine for r in group])
        if acc.is_main_process:
            weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            torch.save({"weights": weights, "grads": grads}, out / f"{name}.pt")
            (out / f"{name}.json").write_text(json.dumps({**metrics, "processes": acc.num_processes}))
        acc.wait_for_everyone()


if __name__ == "__main__":
    main()
