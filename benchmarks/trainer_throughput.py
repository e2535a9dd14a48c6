"""Training-step throughput: our GRPOTrainer vs TRL's GRPOTrainer on the same tiny model.

Both train a random-init tiny Qwen3 (hidden 256, 4 layers by default) on Q questions x
K completions of L tokens, with the same loss settings (dapo aggregation, eps 0.2/0.28,
beta 0, group scaling, no gradient checkpointing, fp32 on CPU). TRL generates its own
completions inside each step; we time only its training part: the whole
`training_step` minus the time spent in `_generate_and_score_completions` (generation +
reward), i.e. its loss forward, backward and optimizer step. Ours is `train_on` on
fixed rollouts of the same shape.

    python benchmarks/trainer_throughput.py --json runs/throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch


def build_model(out: Path, hidden: int, layers: int) -> Path:
    from dspy_p2o.tiny import build_tiny_model

    return build_tiny_model(out, hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=2)


def questions(n: int) -> list[str]:
    return [f"What is {i} + {2 * i + 3}? Answer with the number only." for i in range(n)]


def time_ours(model_dir: Path, args) -> list[float]:
    from transformers import AutoTokenizer

    from dspy_p2o.batch import Rollout
    from dspy_p2o.trainer import GRPOTrainer, TrainerConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    rollouts = []
    for q, text in enumerate(questions(args.questions)):
        x = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        x = tok(x, add_special_tokens=False)["input_ids"]
        for k in range(args.k):
            y = torch.randint(10, len(tok) - 10, (args.completion_len,), generator=g).tolist()
            rollouts.append(Rollout.of_call(f"q{q}", x, x, y, [-7.0] * len(y), float(k % 2)))
    config = TrainerConfig(lr=1e-6, loss_agg="dapo", epsilon_low=0.2, epsilon_high=0.28, beta=0.0,
                           scale_rewards="group", micro_batch_tokens=args.micro_batch_tokens, warmup_ratio=0.0)
    trainer = GRPOTrainer(model_dir, config=config)
    times = []
    for _ in range(args.warmup + args.reps):
        start = time.perf_counter()
        trainer.train_on(rollouts)
        times.append(time.perf_counter() - start)
    return times[args.warmup:]


def time_trl(model_dir: Path, args, out_dir: Path) -> tuple[list[float], list[float]]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig
    from trl_timing import timed_grpo_trainer

    generation_time: list[float] = []
    step_time: list[float] = []

    Timed = timed_grpo_trainer(generation_time, step_time)

    def reward(completions, **kwargs):  # alternating rewards: every group has signal
        return [float(i % 2) for i in range(len(completions))]

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    steps = args.warmup + args.reps
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in questions(args.questions)] * steps)
    config = GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, use_vllm=False, report_to=[], save_strategy="no",
        logging_steps=1000, per_device_train_batch_size=args.questions * args.k, gradient_accumulation_steps=1,
        num_generations=args.k, max_completion_length=args.completion_len, learning_rate=1e-6, beta=0.0,
        loss_type="dapo", epsilon=0.2, epsilon_high=0.28, scale_rewards="group", gradient_checkpointing=False,
        temperature=1.0, max_steps=steps, warmup_steps=0, dataloader_num_workers=0, seed=0,
        shuffle_dataset=False, disable_tqdm=True)
    trainer = Timed(model=model, reward_funcs=reward, args=config, train_dataset=data, processing_class=tok)
    trainer.train()
    train = [s - g for s, g in zip(step_time, generation_time)]
    return train[args.warmup:], generation_time[args.warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--completion-len", type=int, default=64)
    parser.add_argument("--micro-batch-tokens", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model", args.hidden, args.layers)
        ours = time_ours(model_dir, args)
        trl, trl_gen = time_trl(model_dir, args, Path(tmp) / "trl")
    result = {
        "ours_s": statistics.median(ours), "trl_s": statistics.median(trl),
        "ratio": statistics.median(ours) / statistics.median(trl),
        "trl_generation_s": statistics.median(trl_gen),
        "ours_all_s": ours, "trl_all_s": trl,
        "config": {**{k: v for k, v in vars(args).items() if k != "json"}, "device": "cpu",
                   "torch_threads": torch.get_num_threads(),
                   "timed": "ours: train_on; TRL: training_step minus _generate_and_score_completions"},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
