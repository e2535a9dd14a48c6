"""Greedy accuracy without templates on the TRAIN and the held-out letters of each kind, for the
final policies of `dspy-p2o demo` runs: separates memorised train letters from a re-pointed tag.

    python benchmarks/toyworld/split_accuracy.py --out runs/toyworld --seeds 0 1 2 --arms grpo p2o
"""

from __future__ import annotations

import argparse
import glob

import torch


def main() -> None:
    from dspy_p2o.engines import LocalEngine
    from dspy_p2o.toyworld.experiment import toy_config
    from dspy_p2o.toyworld.policy import load_policy
    from dspy_p2o.toyworld.task import ToyProgram, build_world, greedy_accuracy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/toyworld", help="the demo's --out directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=["grpo", "p2o"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    max_tokens = toy_config().max_tokens  # what the demo's runs sampled and validated with
    for seed in args.seeds:
        world = build_world(seed)
        for arm in args.arms:
            found = sorted(glob.glob(f"{args.out}/seed{seed}/{arm}/checkpoints/*/model"))
            if not found:
                raise SystemExit(f"no checkpoint under {args.out}/seed{seed}/{arm}/checkpoints: run the demo first")
            model, tokenizer = load_policy(found[-1])
            program, engine = ToyProgram(), LocalEngine(model, tokenizer)
            acc = {f"{split}/{kind}": round(100 * greedy_accuracy(engine, program, world.split(split, kind),
                                                                  max_tokens=max_tokens), 1)
                   for split in ("train", "test") for kind in ("easy", "hard")}
            print(seed, arm, acc, flush=True)


if __name__ == "__main__":
    main()
