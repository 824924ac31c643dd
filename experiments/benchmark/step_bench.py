"""Seconds per training step of the deep vanilla MLP with the LBE loss, one PyTorch thread: a bare PyTorch loop
against the main job's step (`scripts/train_vanilla.py`, its `BatchEntropyTrainer` with the frontier's evaluation and
logging cadence), at each width asked for. Not part of the package or the tests.

Modes, per width (depth 500 by default, batch 128, 8×8 inputs, subnormals flushed):

- `bare`: forward with hidden states, `batch_entropies`, L = CE·(1 + 0.5·mean_l (H_l − 2)²), zero_grad, backward,
  fused AdamW, on one random batch (the loop of the first version of this script);
- `bare_clip`: the same plus `clip_grad_norm_(…, 1.0)`, which the main job does (Trainer's `max_grad_norm`);
- `main`: `scripts/train_vanilla.py --depths D --runs lbe --num_seeds 1 --no_ceiling --workers 1 --width W
  --max_steps N` with the frontier's evaluation (every tenth of the run, with the effective-rank pass) and logging
  (every 10 steps) cadence; its training CPU time over N steps, and split into the optimizer steps themselves
  (`on_step_begin` → `on_step_end`) and what happens between them (logging, evaluation, the next batch).

Every time is the process's CPU time (`time.process_time`, one thread), which a shared machine inflates less than wall
time; wall times are recorded too. `--repo PATH` imports `hf_batch_entropy` and the main job
(`experiments.frontier`, or `scripts/train_vanilla.py` in a checkout from before that package) from another
checkout (e.g. the code before a change) with this script's measurement. Writes a JSON with the commit of the measured
checkout, versions, machine and command:

    python experiments/benchmark/step_bench.py --widths 64,256 --out experiments/benchmark/results/step_bench.json
    python experiments/benchmark/step_bench.py --repo ../before --widths 64 --out /tmp/before.json

The first version of this script (a bare loop printing ms per step) measured two copies side by side for `--workers`:
run two copies with `--modes bare` at once for that.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shlex
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))


def _provenance_module():
    """This checkout's `experiments/provenance.py`, loaded from its file: the measured checkout (`--repo`) may be
    older than it. It records the measured checkout's commit."""
    spec = importlib.util.spec_from_file_location("_provenance", os.path.join(os.path.dirname(HERE), "provenance.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clock() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def bench_bare(depth: int, width: int, steps: int, clip: bool) -> dict:
    import torch

    from hf_batch_entropy import batch_entropies
    from experiments.models import build_vanilla_model

    torch.manual_seed(0)
    model = build_vanilla_model("mlp", depth, width)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    x, y = torch.randn(128, 1, 8, 8), torch.randint(0, 10, (128,))

    def step() -> None:
        out = model(pixel_values=x, labels=y, output_hidden_states=True)
        entropies = batch_entropies(list(out.hidden_states))
        loss = out.loss * (1 + 0.5 * ((entropies - 2) ** 2).mean())
        optimizer.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    for _ in range(5):
        step()
    cpu_steps = []
    cpu, wall = _clock()
    for _ in range(steps):
        begin = time.process_time()
        step()
        cpu_steps.append(time.process_time() - begin)
    cpu_end, wall_end = _clock()
    return {"steps": steps, "cpu_ms_per_step": 1000 * (cpu_end - cpu) / steps,
            "wall_ms_per_step": 1000 * (wall_end - wall) / steps, **_spread(cpu_steps)}


def _spread(cpu_steps: list[float]) -> dict:
    """Median and fastest step (CPU ms): on a shared machine the fastest is the least disturbed by other processes."""
    ordered = sorted(cpu_steps)
    return {"cpu_ms_step_median": 1000 * ordered[len(ordered) // 2], "cpu_ms_step_min": 1000 * ordered[0]}


def main_job(repo: str) -> tuple[types.SimpleNamespace | types.ModuleType, types.ModuleType]:
    """The main job's pieces in the measured checkout (first on sys.path): `expand_preset`, `parse_arguments`,
    `setup_process`, `run_job`, `Job`, and the module whose `VanillaTrainer` `run_job` builds (to time its steps).
    From the package `experiments.frontier` (or `hf_batch_entropy.frontier` in older checkouts), or in a checkout from
    before either existed, from the script itself."""
    for package in ("experiments.frontier", "hf_batch_entropy.frontier"):
        if os.path.isdir(os.path.join(repo, *package.split("."))):
            arguments = importlib.import_module(f"{package}.arguments")
            runs = importlib.import_module(f"{package}.runs")
            return types.SimpleNamespace(expand_preset=arguments.expand_preset, parse_arguments=arguments.parse_arguments,
                                         setup_process=runs.setup_process, run_job=runs.run_job, Job=runs.Job), runs
    spec = importlib.util.spec_from_file_location("train_vanilla_bench", os.path.join(repo, "scripts", "train_vanilla.py"))
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # dataclasses look their module up while the script's classes are built
    spec.loader.exec_module(script)
    return script, script


def bench_main(repo: str, depth: int, width: int, steps: int, out_dir: str, extra: list[str]) -> dict:
    from transformers import TrainerCallback

    tv, trainer_home = main_job(repo)
    record = {"step_cpu": [], "between_cpu": [], "step_wall": []}

    class StepClock(TrainerCallback):
        last_end = None

        def on_train_begin(self, args, state, control, **kwargs):
            record["train_begin"] = _clock()

        def on_train_end(self, args, state, control, **kwargs):
            record["train_end"] = _clock()

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin = _clock()
            if self.last_end is not None:
                record["between_cpu"].append(self.begin[0] - self.last_end[0])

        def on_step_end(self, args, state, control, **kwargs):
            self.last_end = _clock()
            record["step_cpu"].append(self.last_end[0] - self.begin[0])
            record["step_wall"].append(self.last_end[1] - self.begin[1])

    base = trainer_home.VanillaTrainer

    class Timed(base):
        def __init__(self, *a, callbacks=None, **k):
            super().__init__(*a, callbacks=list(callbacks or []) + [StepClock()], **k)

    trainer_home.VanillaTrainer = Timed
    argv = ["--depths", str(depth), "--runs", "lbe", "--num_seeds", "1", "--no_ceiling", "--workers", "1",
            "--width", str(width), "--max_steps", str(steps), "--disable_tqdm", "true", "--output_dir", out_dir] + extra
    expanded = tv.expand_preset(argv)
    model_args, _, training_args = tv.parse_arguments(expanded)
    tv.setup_process(model_args, training_args)
    result, _ = tv.run_job(tv.Job("lbe", depth, 0), expanded)
    skip = 5  # warm-up steps left out of the per-step split
    step_cpu, between = record["step_cpu"][skip:], record["between_cpu"][skip:]
    train_cpu = record["train_end"][0] - record["train_begin"][0]
    train_wall = record["train_end"][1] - record["train_begin"][1]
    return {
        "steps": result["steps"], "argv": argv, "train_cpu_s": train_cpu, "train_wall_s": train_wall,
        "cpu_ms_per_step": 1000 * train_cpu / result["steps"], "wall_ms_per_step": 1000 * train_wall / result["steps"],
        "optimizer_step_cpu_ms": 1000 * sum(step_cpu) / len(step_cpu), **_spread(step_cpu),
        "between_steps_cpu_ms_mean": 1000 * sum(between) / len(between),
        "between_steps_cpu_ms_max": 1000 * max(between),
        "test_accuracy": result["test_accuracy"], "test_loss": result["test_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=os.path.dirname(os.path.dirname(HERE)), help="checkout to measure")
    parser.add_argument("--depth", type=int, default=500)
    parser.add_argument("--widths", default="64,256")
    parser.add_argument("--modes", default="bare,bare_clip,main")
    parser.add_argument("--bare_steps", type=int, default=30, help="bare-loop steps per width (after 5 warm-up steps)")
    parser.add_argument("--main_steps", default="64:200,256:60", help="main-job steps per width, WIDTH:STEPS,...")
    parser.add_argument("--main_args", default="", help="more flags for the main job's run (e.g. its --eval_steps: "
                        "by default it evaluates every tenth of --main_steps, far more often than a long run)")
    parser.add_argument("--out", default=None, help="JSON to write")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. the measurement condition)")
    args = parser.parse_args()
    repo = os.path.abspath(args.repo)
    sys.path.insert(0, repo)
    import torch

    import hf_batch_entropy
    from experiments.denormals import flush_denormals

    torch.set_num_threads(1)
    flush_denormals()
    main_steps = {int(k): int(v) for k, v in (kv.split(":") for kv in args.main_steps.split(","))}
    results = []
    for width in [int(w) for w in args.widths.split(",")]:
        for mode in args.modes.split(","):
            if mode == "main":
                out_dir = os.path.join("/tmp", f"step_bench_main_{os.getpid()}_{width}")
                r = bench_main(repo, args.depth, width, main_steps.get(width, 100), out_dir, shlex.split(args.main_args))
            else:
                r = bench_bare(args.depth, width, args.bare_steps, clip=mode == "bare_clip")
            r.update(mode=mode, width=width, depth=args.depth)
            results.append(r)
            print(f"width {width:4d} {mode:10s} {r['cpu_ms_per_step']:8.1f} ms CPU/step (step median "
                  f"{r['cpu_ms_step_median']:.1f}, fastest {r['cpu_ms_step_min']:.1f})  "
                  f"{r['wall_ms_per_step']:8.1f} ms wall/step", flush=True)
    for width in sorted({r["width"] for r in results}):
        by = {r["mode"]: r for r in results if r["width"] == width}
        for ref in ("bare", "bare_clip"):
            if "main" in by and ref in by:
                by["main"][f"ratio_to_{ref}"] = by["main"]["cpu_ms_per_step"] / by[ref]["cpu_ms_per_step"]
                by["main"][f"ratio_to_{ref}_fastest_step"] = by["main"]["cpu_ms_step_min"] / by[ref]["cpu_ms_step_min"]
    record = _provenance_module()
    for r in results:
        if "argv" in r:
            r["argv"] = [record.portable_path(word) for word in r["argv"]]
    report = {
        "meta": {
            **record.provenance([os.path.relpath(__file__), *sys.argv[1:]], repo=repo,
                                torch_threads=torch.get_num_threads()),
            "measured_checkout": record.portable_path(repo),
            "hf_batch_entropy_file": record.portable_path(hf_batch_entropy.__file__, repo=repo),
            "clock": "process CPU time (time.process_time), one PyTorch thread; wall time alongside",
            "note": args.note,
        },
        "results": results,
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
