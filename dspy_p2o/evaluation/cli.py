"""`dspy-p2o eval`: the paper's maths evaluation (Table 1) of a model, or a comparison of runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dspy_p2o.config import ConfigError, engine_options_from
from dspy_p2o.evaluation.prompting import DEFAULT_PROGRAM, PROMPT_MODES
from dspy_p2o.evaluation.protocol import SMALL_BENCHMARK_SIZE
from dspy_p2o.evaluation.runner import DEFAULT_CHUNK_SEQUENCES
from dspy_p2o.renderer import ADAPTERS

PAPER_BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench")
DEFAULT_MAX_TOKENS = 12288  # the paper's maximum response length (GPU)
# On CPU a small model decodes tens of tokens per second: the paper's budget, on a model that repeats
# itself, is most of an hour per problem. The CPU default keeps a run to what a person can wait for.
CPU_MAX_TOKENS = 1024
# Evaluation owns the GPU (the vLLM engine's own defaults leave room for a trainer), and a
# whole benchmark should be in flight at once.
ENGINE_DEFAULTS = {"vllm": {"gpu_memory_utilization": 0.9, "max_concurrency": 512}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory or hub id (required unless --compare)")
    parser.add_argument("--benchmarks", default=",".join(PAPER_BENCHMARKS),
                        help="comma-separated benchmark names (default: the paper's six)")
    parser.add_argument("--engine", default="local", choices=("local", "vllm"),
                        help="local: in-process transformers; vllm: a managed vLLM server (GPU)")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="an engine option (config.LocalOptions / config.VLLMOptions; VALUE parsed as JSON "
                             "when it can be), repeatable; "
                             "e.g. dtype=bfloat16, max_batch_size=128 (local); tensor_parallel_size=2, "
                             "max_model_len=16384, url=http://host:8000 (vllm)")
    parser.add_argument("--prompt", default="program", choices=PROMPT_MODES,
                        help="program: the DSPy program's prompt; raw: Qwen's maths-eval chat prompt "
                             "(comparable with published numbers)")
    parser.add_argument("--program", default=DEFAULT_PROGRAM,
                        help=f"DSPy program name or saved-program path for --prompt program (default {DEFAULT_PROGRAM})")
    parser.add_argument("--adapter", default="chat", choices=ADAPTERS,
                        help="DSPy adapter of --prompt program (default chat); use the one the model was trained with")
    parser.add_argument("--chat-template-kwargs", type=json.loads, default=None, metavar="JSON",
                        help='passed to apply_chat_template, e.g. \'{"enable_thinking": false}\'')
    parser.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    parser.add_argument("--out", default=None, help="output dir (default runs/eval/<model>-<prompt>); "
                                                    "rerunning with the same dir resumes")
    parser.add_argument("--name", default=None, help="row label in the table (default: the model's name)")
    parser.add_argument("--samples", type=int, default=None,
                        help="samples per problem on the sampled benchmarks (default 16)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="temperature on the sampled benchmarks (default 0.6; 0 makes them greedy)")
    parser.add_argument("--top-p", type=float, default=None, help="default 1.0")
    parser.add_argument("--top-k", type=int, default=None, help="default 0 (off)")
    parser.add_argument("--sampled-below", type=int, default=SMALL_BENCHMARK_SIZE, metavar="N",
                        help=f"benchmarks with fewer than N problems are sampled, the rest decoded greedily "
                             f"(default {SMALL_BENCHMARK_SIZE}, the paper's rule; 0: all greedy)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help=f"maximum completion tokens (default {DEFAULT_MAX_TOKENS}, the paper's, on GPU; "
                             f"{CPU_MAX_TOKENS} on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-sequences", type=int, default=DEFAULT_CHUNK_SEQUENCES,
                        help="sequences per engine.generate call; finished chunks are saved")
    parser.add_argument("--verify-timeout", type=float, default=None, help="seconds per math-verify check")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--compare", nargs="+", default=None, metavar="RESULTS",
                        help="render these results.json files (or run dirs) as one table, and exit")


def parse_engine_args(items: list[str]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--engine-arg {item!r} is not KEY=VALUE")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


def parse_benchmarks(text: str) -> list[str]:
    from dspy_p2o.data import BENCHMARKS

    names = [b.strip() for b in text.split(",") if b.strip()]
    unknown = [b for b in names if b not in BENCHMARKS]
    if not names or unknown:
        raise ValueError(f"unknown benchmark(s) {unknown or text!r}; choose from {', '.join(BENCHMARKS)}")
    return list(dict.fromkeys(names))


def on_cpu(engine: str, options: Any) -> bool:
    """Whether the engine decodes on this machine's CPU: the engine options' `device` (default
    cuda when present), except an attached vLLM server (`url`), which is elsewhere."""
    if engine == "vllm" and getattr(options, "url", None):
        return False
    import torch

    device = getattr(options, "device", None)
    return torch.device(device).type == "cpu" if device else not torch.cuda.is_available()


def workload(benchmarks: list[str], limit: int | None, overrides: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(benchmark, problems, samples per problem) of a run: what its tokens cost is made of."""
    from dspy_p2o.data import load_benchmark
    from dspy_p2o.evaluation.protocol import protocol_for

    out = []
    for name in benchmarks:
        size = len(load_benchmark(name))
        out.append((name, size if limit is None else min(limit, size), protocol_for(size, **overrides).samples))
    return out


def cost_line(work: list[tuple[str, int, int]], max_tokens: int, defaulted: bool) -> str:
    """What a CPU run will cost, said before it starts."""
    sequences = sum(problems * samples for _, problems, samples in work)
    parts = ", ".join(f"{name} {problems} x {samples}" for name, problems, samples in work)
    budget = (f"max_tokens {max_tokens} (the CPU default; {DEFAULT_MAX_TOKENS}, the paper's, on GPU: set it with "
              "--max-tokens)" if defaulted else f"max_tokens {max_tokens}")
    return (f"on CPU: {budget}; this run decodes {sequences} sequences (problems x samples: {parts}) of up to "
            f"{max_tokens} tokens: at most {sequences * max_tokens:,} tokens")


def model_label(model: str) -> str:
    return Path(model.rstrip("/")).name or model


def main(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"dspy-p2o eval: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from dspy_p2o.evaluation.report import load_results, results_table

    if args.compare:
        print(results_table([load_results(p) for p in args.compare]), end="")
        return 0
    if not args.model:
        raise ValueError("--model is required (or --compare RESULTS...)")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    benchmarks = parse_benchmarks(args.benchmarks)
    try:
        options = engine_options_from(args.engine, {**ENGINE_DEFAULTS.get(args.engine, {}),
                                                    **parse_engine_args(args.engine_arg)})
    except ConfigError as exc:
        raise ConfigError(f"--engine-arg: {exc}") from None
    out = Path(args.out or Path("runs") / "eval" / f"{model_label(args.model)}-{args.prompt}")
    cpu = on_cpu(args.engine, options)
    defaulted = args.max_tokens is None
    max_tokens = (CPU_MAX_TOKENS if cpu else DEFAULT_MAX_TOKENS) if defaulted else args.max_tokens
    overrides = {"samples": args.samples, "temperature": args.temperature, "top_p": args.top_p,
                 "top_k": args.top_k, "max_tokens": max_tokens, "seed": args.seed,
                 "sampled_below": args.sampled_below}
    from dspy_p2o.evaluation.prompting import load_program
    from dspy_p2o.evaluation.protocol import protocol_for
    from dspy_p2o.jsonio import check_writable
    from dspy_p2o.run_dir import RunDir

    # Catch bad settings before an engine spends minutes starting.
    protocol_for(1, **overrides), protocol_for(10**9, **overrides)
    program = load_program(args.program) if args.prompt == "program" else None
    check_writable(out, directory=True)
    with RunDir(out).lock():  # one eval per output dir at a time (RunDirBusy names the holder)
        if cpu:  # what the run will cost, said before it starts
            print(f"dspy-p2o eval: {cost_line(workload(benchmarks, args.limit, overrides), max_tokens, defaulted)}",
                  file=sys.stderr)
        return _evaluate(args, benchmarks, options, overrides, program, out)


def _evaluate(args: argparse.Namespace, benchmarks: list[str], options: Any, overrides: dict[str, Any],
              program: Any, out: Path) -> int:
    from dspy_p2o.engines import open_engine
    from dspy_p2o.evaluation.prompting import make_prompting
    from dspy_p2o.evaluation.report import results_table
    from dspy_p2o.evaluation.runner import evaluate

    # A local model is recorded by its absolute path, so a resume from another directory matches.
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    with open_engine(args.engine, args.model, options) as engine:
        prompting = make_prompting(args.prompt, engine.tokenizer, program=program or args.program,
                                   chat_template_kwargs=args.chat_template_kwargs, adapter=args.adapter)
        results = evaluate(engine, benchmarks, prompting, out, model=model,
                           label=args.name or f"{model_label(args.model)} ({args.prompt})", limit=args.limit,
                           protocol_overrides=overrides, chunk_sequences=args.chunk_sequences,
                           verify_timeout=args.verify_timeout, progress=not args.quiet)
    print(results_table([results]), end="")
    print(f"\nresults: {out / 'results.json'}  samples: {out}/<benchmark>.jsonl")
    return 0
