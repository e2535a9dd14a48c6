"""The toy-world experiment: GRPO vs P^2O and its ablations, each run through `P2OLoop`
(the code path `dspy_p2o.compile` users take), with the same seed and the same number of
phase-1 policy rollouts per arm.

Per arm it reports accuracy WITHOUT templates on the held-out hard and easy questions,
the hard-set size per epoch, the phase-1 rollouts and the rollouts spent inside GEPA.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

from dspy_p2o.config import P2OConfig
from dspy_p2o.toyworld.policy import PolicyConfig, pretrain_policy, torch_threads
from dspy_p2o.toyworld.reflection import ReflectionNoise, reflection_lm
from dspy_p2o.template import Template
from dspy_p2o.toyworld.task import ToyProgram, World, WorldConfig, build_world, greedy_accuracy, metric

# Each arm is the P^2O loop with switches; everything else is shared.
ARMS: dict[str, dict[str, Any]] = {
    "grpo": {"method": "grpo"},
    "p2o": {},
    "p2o_no_distill": {"trainer.distill": False},
    "p2o_same_template": {"prompt.same_template_in_group": True},
}
ARM_TITLES = {"grpo": "GRPO", "p2o": "P^2O", "p2o_no_distill": "P^2O w/o context distillation",
              "p2o_same_template": "P^2O, same template in a group"}
DEMO_ARMS = ("grpo", "p2o")
CONFIG_FILE = "config.yaml"  # the loop's settings, on P2OConfig's schema (package data)


def toy_config(overrides: Mapping[str, Any] | None = None) -> P2OConfig:
    """The toy world's run config (toyworld/config.yaml) with `overrides` (bare or dotted keys, as `dspy-p2o train`)."""
    with resources.as_file(resources.files("dspy_p2o.toyworld") / CONFIG_FILE) as path:
        return P2OConfig.load(path, overrides)


@dataclass
class ArmResult:
    hard_acc: float
    easy_acc: float
    hard_per_epoch: list[int]
    hard_acc_per_epoch: list[float]
    easy_acc_per_epoch: list[float]
    policy_rollouts: int
    gepa_rollouts: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def toy_loop(program: Any, world: World, policy_dir: Path, run_dir: Path, config: P2OConfig, seed: int):
    """The P^2O loop of one arm, validating every epoch on the held-out hard questions (`val/pass@1`, as
    `compile(valset=...)` does) and on the held-out easy ones (`val/easy_pass@1`): when easy skills are
    lost shows in the run's metrics. Validation is greedy and draws no random numbers, so it does not
    change the run."""
    from dspy_p2o.loop import P2OLoop, with_ids

    class ToyLoop(P2OLoop):
        easyset = with_ids(world.split("test", "easy"), "val_easy")
        announces_disk = False  # the demo prints its epoch lines only; its runs' tiny checkpoints are in summary.md


        def evaluate(self, examples):
            out = super().evaluate(examples)
            if examples is self.valset:
                out["val/easy_pass@1"] = super().evaluate(self.easyset)["val/pass@1"]
            return out

    # The toy world's own teacher, passed as an LM object (what compile(..., reflection=lm) does).
    return ToyLoop(program, world.train, metric=metric, policy=str(policy_dir), config=config, run_dir=run_dir,
                   valset=world.split("test", "hard"), reflection_lm=reflection_lm(seed=seed, noise=ReflectionNoise()))


def run_arm(arm: str, world: World, policy_dir: Path, run_dir: Path, config: P2OConfig, *,
            progress: bool = True, program: Any = None) -> ArmResult:
    """One arm through the P^2O loop; accuracy measured afterwards without templates (`greedy_accuracy`).
    `program` (default ToyProgram) serves other programs of the world (two_step.py)."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {sorted(ARMS)}")
    start = time.time()
    cfg = P2OConfig.load(config, {"policy": str(policy_dir), "seed": world.seed, "progress": progress,
                                  "reflection": "custom", **ARMS[arm]})
    program = ToyProgram() if program is None else program
    loop = toy_loop(program, world, policy_dir, run_dir / arm, cfg, world.seed)
    result = loop.run_loop()

    def accuracy(engine, examples):
        return greedy_accuracy(engine, program, examples, max_tokens=config.max_tokens)

    hard = accuracy(result.engine, world.split("test", "hard"))
    easy = accuracy(result.engine, world.split("test", "easy"))
    gepa = 0
    for epoch in range(1, config.epochs + 1):
        path = loop.run.templates_file(epoch)
        if path.exists():
            cost = json.loads(path.read_text()).get("cost", {})
            gepa += sum(int(cost.get(key, 0)) for key in ("metric_calls_gepa", "metric_calls_fewshot",
                                                          "metric_calls_hard_train"))
    history = result.history
    return ArmResult(
        hard_acc=hard, easy_acc=easy, hard_per_epoch=[int(h["hard"]) for h in history],
        hard_acc_per_epoch=[float(h.get("val/pass@1", float("nan"))) for h in history],
        easy_acc_per_epoch=[float(h.get("val/easy_pass@1", float("nan"))) for h in history],
        policy_rollouts=config.epochs * len(world.train) * config.k, gepa_rollouts=gepa,
        seconds=round(time.time() - start, 1))


def run_experiment(seed: int = 0, arms: tuple[str, ...] = DEMO_ARMS, *, out_dir: str | Path = "runs/toyworld",
                   config: P2OConfig | None = None, world_config: WorldConfig | None = None,
                   policy_config: PolicyConfig | None = None, cache_dir: str | Path | None = None,
                   progress: bool = True, log: Callable[[str], None] = print, resume: bool = False) -> dict[str, Any]:
    """Pretrain (or load) the base policy and run each arm; returns the `--json` document.

    `resume`: arms already in this seed's results.json under the same config are kept, not rerun
    (each arm is its own seeded run, so which arms ran before does not change another's numbers)."""
    config = config or toy_config()
    world = build_world(seed, world_config)
    out_dir = Path(out_dir) / f"seed{seed}"
    done: dict[str, Any] = {}
    if resume and (out_dir / "results.json").exists():
        previous = json.loads((out_dir / "results.json").read_text())
        if previous.get("config") == json.loads(json.dumps(config.redacted())):
            done = previous["arms"]
    t0 = time.time()
    log(f"[toyworld] seed {seed}: easy rules {world.easy_rules}, hard rules {world.hard_rules}")
    policy_dir = pretrain_policy(world, policy_config, cache_dir=cache_dir, progress=progress)
    log(f"[toyworld] base policy ready in {time.time() - t0:.0f}s: {policy_dir}")
    base = base_accuracy(world, policy_dir, config.max_tokens)
    log(f"[toyworld] base policy without templates: hard {base['hard_acc']:.2f}, easy {base['easy_acc']:.2f}; "
        f"hard with the oracle instruction: {base['hard_acc_oracle']:.2f}")
    results: dict[str, Any] = dict(done)
    for arm in arms:
        if arm in done:
            log(f"[toyworld] arm {arm}: kept from {out_dir / 'results.json'}")
            continue
        log(f"[toyworld] arm {arm} ...")
        with torch_threads(1):
            arm_result = run_arm(arm, world, policy_dir, out_dir, config, progress=progress)
        results[arm] = arm_result.to_json()
        log(f"[toyworld] arm {arm}: hard {arm_result.hard_acc:.2f}, easy {arm_result.easy_acc:.2f}, "
            f"hard per epoch {arm_result.hard_per_epoch} ({arm_result.seconds:.0f}s)")
    results = {arm: results[arm] for arm in ARMS if arm in results}  # one order in every table
    doc = {"seed": seed, "arms": results, "base": base, "world": {"easy": world.easy_rules, "hard": world.hard_rules},
           "config": config.redacted(), "seconds": round(time.time() - t0, 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(doc, indent=2))
    (out_dir / "table.md").write_text(markdown_table(doc))
    try:
        plot(doc, out_dir / "toyworld.png")
    except Exception as exc:  # a plotting problem must not cost the run
        log(f"[toyworld] could not write the plot: {exc}")
    return doc


def base_accuracy(world: World, policy_dir: Path, max_tokens: int) -> dict[str, float]:
    from dspy_p2o.engines import LocalEngine

    engine, program = LocalEngine(policy_dir, device="cpu"), ToyProgram()
    hard, easy = world.split("test", "hard"), world.split("test", "easy")
    oracle = lambda e: Template({"solve.predict": world.oracle_instruction(e.tag)})  # noqa: E731
    return {"hard_acc": greedy_accuracy(engine, program, hard, max_tokens=max_tokens),
            "easy_acc": greedy_accuracy(engine, program, easy, max_tokens=max_tokens),
            "hard_acc_oracle": greedy_accuracy(engine, program, hard, max_tokens=max_tokens, template=oracle)}


def markdown_table(doc: dict[str, Any]) -> str:
    """A Table-2-style summary: held-out accuracy without templates, hard-set sizes, rollout spend,
    with what each column counts."""
    lines = [f"Toy world, seed {doc['seed']}: accuracy (%) on HELD-OUT questions, answered WITHOUT templates", "",
             "| arm | held-out hard acc | held-out easy acc | hard training questions per epoch | policy rollouts "
             "| GEPA rollouts |",
             "|---|---:|---:|---|---:|---:|"]
    base = doc.get("base")
    if base:
        lines.append(f"| base policy | {100 * base['hard_acc']:.1f} | {100 * base['easy_acc']:.1f} | - | - | - |")
    for arm, r in doc["arms"].items():
        lines.append(f"| {ARM_TITLES.get(arm, arm)} | {100 * r['hard_acc']:.1f} | {100 * r['easy_acc']:.1f} | "
                     f"{r['hard_per_epoch']} | {r['policy_rollouts']} | {r['gepa_rollouts']} |")
    lines += ["",
              "- held-out hard / easy acc: one greedy answer per held-out test question of the hard / easy rules, "
              "with the program's own instruction and no template: what the trained weights alone do.",
              "- hard training questions per epoch: TRAINING questions mined as hard in that epoch (mean reward of "
              "their rollouts below `tau`; only the plain rollouts count under `hardness_on: plain`), the set the "
              "prompt phase after it works on; epoch 1 first.",
              "- policy rollouts: phase-1 rollouts over the run (the same budget for every arm); GEPA rollouts: "
              "the student's executions inside the prompt phases."]
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    from dspy_p2o.reports import epoch_ticks

    fig = Figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    epochs: list[int] = []
    for arm, r in doc["arms"].items():
        epochs = list(range(1, len(r["hard_per_epoch"]) + 1))
        ax1.plot(epochs, r["hard_per_epoch"], marker="o", label=ARM_TITLES.get(arm, arm))
        ax2.plot(epochs, r["hard_acc_per_epoch"], marker="o", label=ARM_TITLES.get(arm, arm))
    ax1.set(title="hard TRAINING questions per epoch", xlabel="epoch", ylabel="|D_hard|")
    ax2.set(title="held-out hard accuracy, no template", xlabel="epoch", ylabel="accuracy", ylim=(-0.02, 1.02))
    for ax in (ax1, ax2):
        ticks = epoch_ticks(epochs)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
