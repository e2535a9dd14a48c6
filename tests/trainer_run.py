"""Train a tiny model N steps on fixed rollouts, checkpointing every step; resume when
checkpoints exist. Used by test_trainer.py's kill-and-resume test:

    python tests/trainer_run.py MODEL_DIR RUN_DIR STEPS [--pause SECONDS]

Writes RUN_DIR/final.json with the final step, the optimizer's step counter, lr and a
checksum of the weights.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from dspy_p2o.rollouts import Rollout
from dspy_p2o.trainer import GRPOTrainer, TrainerConfig, latest_checkpoint


def fixed_rollouts() -> list[Rollout]:
    g = torch.Generator().manual_seed(0)
    out = []
    for q in range(2):
        x = torch.randint(10, 500, (10,), generator=g).tolist()
        for k in range(4):
            y = torch.randint(10, 500, (3 + k,), generator=g).tolist()
            out.append(Rollout.of_call(f"q{q}", x, x, y, [-5.0] * len(y), float(k % 2)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("--pause", type=float, default=0.0, help="seconds to sleep after each checkpoint")
    args = parser.parse_args()
    config = TrainerConfig(lr=1e-3, lr_schedule="linear", warmup_ratio=0.2, keep_last_checkpoints=2)
    trainer = GRPOTrainer(args.model_dir, config=config, total_steps=args.steps)
    checkpoints = args.run_dir / "checkpoints"
    resumed_from = 0
    if (last := latest_checkpoint(checkpoints)) is not None:
        resumed_from = trainer.load_checkpoint(last)["step"]
    rollouts = fixed_rollouts()
    while trainer.global_step < args.steps:
        trainer.train_on(rollouts)
        trainer.save_checkpoint(checkpoints, {"step": trainer.global_step})
        time.sleep(args.pause)
    state = trainer.optimizer.state_dict()["state"]
    final = {"global_step": trainer.global_step, "resumed_from": resumed_from,
             "adam_step": int(next(iter(state.values()))["step"]), "lr": trainer.scheduler.get_last_lr()[0],
             "weights_sum": float(sum(p.double().abs().sum() for p in trainer.model.parameters()))}
    (args.run_dir / "final.json").write_text(json.dumps(final))


if __name__ == "__main__":
    main()
