"""Where LBE's extra time goes in the depth-500 vanilla MLP step (width 256, batch 128, one thread): process CPU time
of a bare PyTorch step built up part by part, of `Trainer`'s and `BatchEntropyTrainer`'s steps, and a torch.profiler
table of the operators whose time differs between the two trainers. Writes a JSON with commit, versions, machine and
command. Not part of the package or the tests.

    python experiments/benchmark/step_profile.py --reps 12 --out experiments/benchmark/results/cpu_1thread_mlp256_profile.json
    python experiments/benchmark/step_profile.py --threads 2 --reps 24 --out experiments/benchmark/results/cpu_2threads_mlp256_profile.json

With `--threads` above 1 every time is wall-clock time (process CPU time would add up the threads' time), and
`--threads 0` keeps torch's default.

Bare steps (each includes the previous one's work; all do clipping at 1.0 and fused AdamW, as `Trainer` does), timed
in alternating order, median process CPU time:

- `plain`: forward, task loss, backward, clipping, AdamW, `zero_grad` (what `Trainer`'s step computes);
- `hidden_states`: the same forward with `output_hidden_states=True` (the 500 activations it returns);
- `estimator_no_grad`: plus `batch_entropies` of them under `no_grad` (the estimator's forward alone, no graph);
- `lbe_term`: the LBE term in the loss: the estimator with its autograd graph, and its backward;
- `alpha_step`: plus α's own AdamW step;
- `tally`: plus the trainer's metric tally of the step (`MetricTally.add_pass`, the loss split).

The same parts on their own (the estimator's forward, its forward and backward, α's step, the tally, the NaN
count), then the trainers themselves (`scripts/benchmark.py`'s turns, `--clock cpu`), and the floor: one read of the 500
activations (`sum`) and one write of a gradient per layer (`empty_like` + `fill_`), to compare with what LBE adds;
and each pass the estimator makes over the activations, timed on its own from cold caches (`passes`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

BARE = ("plain", "hidden_states", "estimator_no_grad", "lbe_term", "alpha_step", "tally")


def _median_ms(times: list[float]) -> dict:
    return {"median_ms": round(1000 * statistics.median(times), 2), "fastest_ms": round(1000 * min(times), 2),
            "n": len(times)}


def _passes(hidden: list, clock, reps: int) -> dict:
    """Each pass the estimator makes over the activations, on its own, with the same operators as
    `hf_batch_entropy.entropy` on CPU, from cold caches (a 256 MiB sweep before each repetition, as in a step, where
    the model's weights and optimizer state pass through the caches between the forward and the backward): the
    forward's stacking of each chunk into the scratch (its one read of the activations), the three reductions over the
    cache-sized scratch (batch mean, squared deviations in place, sum over the batch), the backward's gradient per layer
    (`mse_loss_backward` into a fresh tensor, reading the activation again) and autograd's in-place accumulation of
    that gradient with the model's own (one `add_` per layer)."""
    import torch

    from hf_batch_entropy._compat import squared_difference, squared_difference_backward
    from hf_batch_entropy.entropy import fused

    batch, units = hidden[0].shape
    per_chunk = max(1, fused._chunk_numel(hidden[0].device) // hidden[0].numel())
    chunks = [hidden[i : i + per_chunk] for i in range(0, len(hidden), per_chunk)]
    scratch = torch.empty(per_chunk * batch * units)
    sweep = torch.empty(64 << 20)
    means = [h.mean(dim=0, keepdim=True) for h in hidden]
    coefs = [torch.rand(1, units) for _ in hidden]
    model_grads = [torch.rand_like(h) for h in hidden]
    ours = [torch.rand_like(h) for h in hidden]

    def stack():
        for chunk in chunks:
            torch.stack(chunk, out=scratch[: len(chunk) * batch * units].view(len(chunk), batch, units))

    def reductions():  # the estimator's own steps, so that this tracks them
        for chunk in chunks:
            stacked = scratch[: len(chunk) * batch * units].view(len(chunk), batch, units)
            squared_difference(stacked, fused._batch_mean(stacked, None).expand_as(stacked), out=stacked).sum(dim=1)

    def gradient():
        for x, mean, coef in zip(hidden, means, coefs):
            squared_difference_backward(coef, x, mean)

    def accumulate():
        for g, o in zip(model_grads, ours):
            g.add_(o)

    parts = {"forward: stack each chunk into the scratch (cold read)": stack,
             "forward: mean, squared deviations, sum over the scratch (cache-sized)": reductions,
             "backward: gradient per layer, mse_loss_backward (cold read, fresh write)": gradient,
             "backward: autograd's accumulation with the model's gradient, add_ per layer (cold)": accumulate}
    out = {"layers_per_chunk": per_chunk}
    for name, fn in parts.items():
        times = []
        for _ in range(reps):
            sweep.fill_(1.0)
            if fn is reductions:
                stack()  # the scratch as the forward leaves it
            begin = clock()
            fn()
            times.append(clock() - begin)
        out[name] = _median_ms(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=12, help="steps per bare variant (alternating order)")
    parser.add_argument("--trainer_rounds", type=int, default=2, help="turns per trainer (6 measured steps each)")
    parser.add_argument("--profile_steps", type=int, default=3, help="steps per trainer under torch.profiler")
    parser.add_argument("--threads", type=int, default=1,
                        help="PyTorch threads (0: torch's default); above 1 the clock is wall time, not process CPU time")
    parser.add_argument("--out", default=None)
    parser.add_argument("--note", default="")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from experiments.benchmark.cases import _image_data, _vanilla_mlp
    from experiments.benchmark.cli import run_turn
    from experiments.benchmark.measure import CLOCKS
    from experiments.provenance import provenance
    from hf_batch_entropy import batch_entropies
    from experiments.denormals import flush_denormals
    from hf_batch_entropy.regularizer import BatchEntropyRegularizer
    from hf_batch_entropy.tally import MetricTally

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    # Process CPU time is the cost of one thread's work; with several threads only the wall clock says what a step takes.
    clock_name = "cpu" if threads == 1 else "wall"
    clock = CLOCKS[clock_name]  # the benchmark's clocks, so the trainers' turns below are timed alike
    record = provenance(sys.argv, torch_threads=threads)
    record["clock"] = {"cpu": "process CPU time", "wall": "wall"}[clock_name]
    record["load_average_at_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    flush_denormals()
    torch.manual_seed(0)
    build = _vanilla_mlp(args.width, args.depth)
    master = build()
    data = _image_data()(args.batch_size * 16)
    x = data.columns["pixel_values"][: args.batch_size]
    y = data.columns["labels"][: args.batch_size]

    import copy

    model = copy.deepcopy(master)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    regularizer = BatchEntropyRegularizer(args.depth, check_finite=False)
    regularizer.configure_optimizer(1e-4)
    tally = MetricTally(lambda: 0)

    def step(level: int) -> None:
        hidden = level >= 1
        out = model(pixel_values=x, labels=y, output_hidden_states=hidden)
        loss = out.loss
        if level == 2:
            with torch.no_grad():
                batch_entropies(out.hidden_states)
        if level >= 3:
            lbe = regularizer(list(out.hidden_states), loss)
            loss = lbe.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if level >= 4:
            regularizer.step()
        if level >= 5:
            tally.add_pass("train", lbe.entropies, lbe.measured, lbe_alpha_mean=lbe.targets.mean())
            total = loss.detach().float()
            task = total * torch.where(lbe.loss != 0, lbe.task_loss / lbe.loss, 1.0).float()
            tally.add("train", task_loss=task, lbe_loss=total - task)

    results: dict = {"bare": {}, "trainers": {}, "floor": {}, "profile": {}}
    times = {name: [] for name in BARE}
    for level in range(len(BARE)):
        step(level)  # warm-up
    for r in range(args.reps):
        order = range(len(BARE)) if r % 2 == 0 else reversed(range(len(BARE)))
        for level in order:
            begin = clock()
            step(level)
            times[BARE[level]].append(clock() - begin)
    for name in BARE:
        results["bare"][name] = _median_ms(times[name])
    tally.discard()

    # The parts on their own (many repetitions, each far shorter than a step, so less exposed to other jobs).
    with torch.no_grad():
        hidden = list(model(pixel_values=x, output_hidden_states=True).hidden_states)
    leaves = [h.clone().requires_grad_() for h in hidden]
    entropies = batch_entropies(hidden)

    def estimator_forward_backward():
        batch_entropies(leaves).sum().backward()
        for leaf in leaves:
            leaf.grad = None

    def alpha_step():
        (regularizer.targets() - entropies).square().mean().backward()
        regularizer.step()

    isolated = {
        "estimator forward, no graph": lambda: batch_entropies(hidden),
        "estimator forward + backward (gradients into leaves)": estimator_forward_backward,
        "alpha's AdamW step (with its tiny backward)": alpha_step,
        "metric tally (add_pass)": lambda: tally.add_pass("train", entropies, None, lbe_alpha_mean=entropies.mean()),
        "NaN/inf count of the entropies": lambda: (~torch.isfinite(entropies)).float(),
    }
    results["isolated"] = {}
    for name, fn in isolated.items():
        fn()
        samples = []
        for _ in range(5 * args.reps):
            begin = clock()
            fn()
            samples.append(clock() - begin)
        results["isolated"][name] = _median_ms(samples)
    tally.discard()
    del leaves
    floor = {"read": [], "write": []}
    for _ in range(args.reps):
        begin = clock()
        for h in hidden:
            h.sum()
        floor["read"].append(clock() - begin)
        begin = clock()
        for h in hidden:
            torch.empty_like(h).fill_(1.0)
        floor["write"].append(clock() - begin)
    results["floor"] = {name: _median_ms(t) for name, t in floor.items()}
    results["floor"]["activation_mb"] = round(sum(h.numel() * h.element_size() for h in hidden) / 2**20, 1)
    results["passes"] = _passes(hidden, clock, args.reps)
    del hidden, model, optimizer

    # The trainers, as scripts/benchmark.py runs them (the clock above), alternating.
    with tempfile.TemporaryDirectory() as workdir:
        case = SimpleNamespace(batch_size=args.batch_size)
        opts = SimpleNamespace(device="cpu", workdir=workdir, batch_size=args.batch_size, bf16=False,
                               torch_compile=False, clock=clock_name)
        trainer_times = {"trainer": [], "lbe": []}
        for r in range(args.trainer_rounds):
            for variant in ("trainer", "lbe") if r % 2 == 0 else ("lbe", "trainer"):
                trainer_times[variant].extend(run_turn(case, variant, master, data, opts, 8)[2:])
        results["trainers"] = {v: _median_ms(t) for v, t in trainer_times.items()}

        # Operator table of each trainer's steps: self CPU time per step, by operator.
        for variant in ("trainer", "lbe"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run_turn(case, variant, master, data, opts, args.profile_steps)
            ops = {}
            for event in prof.key_averages():
                ops[event.key] = {"self_cpu_ms_per_step": round(event.self_cpu_time_total / 1000 / args.profile_steps, 3),
                                  "calls_per_step": event.count / args.profile_steps}
            results["profile"][variant] = ops

    base, lbe_ops = results["profile"]["trainer"], results["profile"]["lbe"]
    diff = []
    for key in set(base) | set(lbe_ops):
        delta = lbe_ops.get(key, {}).get("self_cpu_ms_per_step", 0.0) - base.get(key, {}).get("self_cpu_ms_per_step", 0.0)
        calls = lbe_ops.get(key, {}).get("calls_per_step", 0) - base.get(key, {}).get("calls_per_step", 0)
        diff.append((delta, key, calls))
    diff.sort(reverse=True)
    results["profile_difference"] = [
        {"op": key, "extra_self_cpu_ms_per_step": round(delta, 3), "extra_calls_per_step": calls}
        for delta, key, calls in diff[:30]
    ]
    del results["profile"]  # the full tables are long; the difference is what matters

    plain = results["bare"]["plain"]["median_ms"]
    print(f"{'part':20s} {'median ms':>10s} {'+ vs previous':>14s} {'+ vs plain':>11s}")
    previous = plain
    for name in BARE:
        med = results["bare"][name]["median_ms"]
        print(f"{name:20s} {med:10.1f} {med - previous:14.1f} {med - plain:11.1f}")
        previous = med
    for v, r in results["trainers"].items():
        print(f"trainer {v:12s} {r['median_ms']:10.1f} (fastest {r['fastest_ms']:.1f})")
    print("floor:", results["floor"])
    print("passes:", results["passes"])
    for name, r in results["isolated"].items():
        print(f"isolated {name}: {r['median_ms']} ms (fastest {r['fastest_ms']})")
    for row in results["profile_difference"][:20]:
        print(f"  {row['extra_self_cpu_ms_per_step']:8.2f} ms  {row['extra_calls_per_step']:8.1f} calls  {row['op']}")
    from experiments.provenance import portable_path

    settings = {**vars(args), "out": args.out and portable_path(args.out)}  # no local absolute path in the record
    output = {"provenance": record, "note": args.note, "settings": settings,
              "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None, **results}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(output, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
