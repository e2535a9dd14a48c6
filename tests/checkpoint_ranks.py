"""Checkpoints written by several processes when one of them is slow, or its disk is full.

    torchrun --standalone --nproc_per_node 2 tests/checkpoint_ranks.py MODEL_DIR OUT_DIR [--sharding none|fsdp2]

After a training batch, a checkpoint saved while every `torch.save` of rank 1 first sleeps 1.5 s
(rank 1 writes its RNG state last); after another, a checkpoint saved while rank 1's `torch.save`
fails with ENOSPC. Each process writes OUT_DIR/rank<R>.json: what each save returned or raised.
"""

import argparse
import errno
import json
import time
from pathlib import Path

import torch

from dspy_p2o.checkpoints import NoSpaceForCheckpoint
from dspy_p2o.collectives import shard
from dspy_p2o.processes import end_process_group
from dspy_p2o.trainer import GRPOTrainer, TrainerConfig
from ddp_step import global_batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out", type=Path)
    parser.add_argument("--sharding", default="none")
    args = parser.parse_args()
    trainer = GRPOTrainer(args.model_dir, config=TrainerConfig(lr=1e-3, sharding=args.sharding))
    rank = trainer.accelerator.process_index
    mine = shard(global_batch(), rank, trainer.accelerator.num_processes)
    save = torch.save
    report = {}

    def slow_save(*a, **k):
        time.sleep(1.5)
        return save(*a, **k)

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    for name, patch in (("slow", slow_save), ("full", full_disk)):
        trainer.train_on([r for group in mine for r in group])
        if rank == 1:
            torch.save = patch
        try:
            report[name] = {"saved": trainer.save_checkpoint(args.out / "checkpoints").name}
        except NoSpaceForCheckpoint as exc:
            report[name] = {"no_space": exc.step}
        finally:
            torch.save = save
    (args.out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
    end_process_group()
