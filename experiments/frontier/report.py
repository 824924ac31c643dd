"""What the frontier job prints and stores as its summary: the per-depth summary over seeds, the tables, the
sentences that interpret the numbers, and the one progress line per finished run."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np

from .arguments import DEAD_ENTROPY

if TYPE_CHECKING:
    from .runs import Job


def summarize(results: list[dict]) -> list[dict]:
    """Per run kind and depth: test accuracy mean and sample std over the seeds (std 0 for one seed), per-seed values,
    alive layers and wall time (means)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in results:
        groups.setdefault((r["run"], r["depth"]), []).append(r)
    order = {"ceiling": 0, "baseline": 1, "lbe": 2}
    summary = []
    for (kind, depth), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], order.get(kv[0][0], 3))):
        acc = np.array([r["test_accuracy"] for r in sorted(runs, key=lambda r: r["seed_index"])])
        summary.append({
            "run": kind, "depth": depth, "seeds": len(runs),
            "test_accuracy_mean": float(acc.mean()), "test_accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "test_accuracy_per_seed": acc.tolist(),
            "alive_layers_mean": float(np.mean([r["alive_layers"] for r in runs])), "num_layers": runs[0]["num_layers"],
            "wall_time_s_mean": float(np.mean([r["wall_time_s"] for r in runs])),
        })
    return summary


def _pct(mean: float, std: float, n: int) -> str:
    return f"{100 * mean:.1f}%" + (f" ± {100 * std:.1f}" if n > 1 else "")


def format_frontier_table(summary: list[dict]) -> str:
    """depth | ceiling / baseline / LBE accuracy (mean ± std over seeds) | alive layers | seconds per run."""
    kinds = [k for k in ("ceiling", "baseline", "lbe") if any(s["run"] == k for s in summary)]
    header = ["run", "depth", "seeds", "test accuracy", "alive layers (end)", "wall time / run"]
    cells = [header]
    for s in sorted(summary, key=lambda s: (kinds.index(s["run"]), s["depth"])):
        cells.append([s["run"], str(s["depth"]), str(s["seeds"]),
                      _pct(s["test_accuracy_mean"], s["test_accuracy_std"], s["seeds"]),
                      f"{s['alive_layers_mean']:.0f}/{s['num_layers']}", f"{s['wall_time_s_mean']:.0f} s"])
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def interpret(summary: list[dict], steps: int | None = None) -> str:
    """One or two sentences on what the frontier shows, written from the numbers: where the baseline falls to chance
    (< 15% on ten classes), how deep LBE still learns, a depth where neither learns, and the ceiling."""
    by = {(s["run"], s["depth"]): s for s in summary}
    depths = sorted({s["depth"] for s in summary if s["run"] != "ceiling"})
    chance = 0.15
    budget = f"{steps} steps" if steps else "this budget"

    def acc(s: dict) -> str:
        return _pct(s["test_accuracy_mean"], s["test_accuracy_std"], s["seeds"])

    first = []
    dead = [d for d in depths if ("baseline", d) in by and by[("baseline", d)]["test_accuracy_mean"] < chance]
    if dead:
        first.append(f"Without LBE the network stays at chance (< {100 * chance:.0f}%) from depth {dead[0]} on")
    elif any(("baseline", d) in by for d in depths):
        first.append(f"Without LBE every depth up to {max(d for d in depths if ('baseline', d) in by)} learns")
    learns = [d for d in depths if ("lbe", d) in by and by[("lbe", d)]["test_accuracy_mean"] >= chance]
    rescued = [d for d in learns if d in dead]
    if rescued:
        first.append(f"with LBE it learns up to depth {rescued[-1]} ({acc(by[('lbe', rescued[-1])])})")
    elif learns:
        first.append(f"with LBE it learns up to depth {learns[-1]} ({acc(by[('lbe', learns[-1])])})")
    stuck = [d for d in dead if ("lbe", d) in by and by[("lbe", d)]["test_accuracy_mean"] < chance]
    sentence = "; ".join(first)
    if stuck:
        s = by[("lbe", stuck[-1])]
        sentence += (f", but at depth {stuck[-1]} neither learns within {budget} (LBE has revived "
                     f"{s['alive_layers_mean']:.0f} of its {s['num_layers']} layers by then)")
    sentence = (sentence + ".") if sentence else ""
    shallow = next((d for d in depths if ("baseline", d) in by and ("lbe", d) in by
                    and by[("baseline", d)]["test_accuracy_mean"] >= chance), None)
    if shallow is not None:
        sentence += " " + compare_at_depth(by[("baseline", shallow)], by[("lbe", shallow)])
    ceiling = next((s for s in summary if s["run"] == "ceiling"), None)
    if ceiling is not None:
        sentence += (f" A well-initialized {ceiling['depth']}-layer network reaches {acc(ceiling)} with the same "
                     f"recipe: the distance to it is what {budget} leave the deep networks.")
    return sentence.strip()


def compare_at_depth(baseline: dict, lbe: dict) -> str:
    """LBE against the baseline at a depth where the baseline learns (the frontier's depth 10): the difference of
    the means, judged against twice its standard error over the seeds (sqrt(s_b²/n_b + s_l²/n_l))."""
    depth, n = baseline["depth"], min(baseline["seeds"], lbe["seeds"])
    diff = 100 * (lbe["test_accuracy_mean"] - baseline["test_accuracy_mean"])
    text = (f"At depth {depth}, where the network learns without it, LBE gives "
            f"{_pct(lbe['test_accuracy_mean'], lbe['test_accuracy_std'], lbe['seeds'])} against "
            f"{_pct(baseline['test_accuracy_mean'], baseline['test_accuracy_std'], baseline['seeds'])} without: "
            f"{abs(diff):.1f} points {'lower' if diff < 0 else 'higher'}")
    if n < 2:
        return text + " (one seed: no spread to judge the difference by)."
    se2 = 2 * 100 * math.sqrt(baseline["test_accuracy_std"] ** 2 / baseline["seeds"]
                              + lbe["test_accuracy_std"] ** 2 / lbe["seeds"])
    if abs(diff) <= se2:
        return (text + f", within twice the standard error of the difference over {n} seeds ({se2:.1f} points): "
                "no clear difference.")
    return (text + f", more than twice the standard error of the difference over {n} seeds ({se2:.1f} points): "
            f"LBE {'costs' if diff < 0 else 'adds'} accuracy at this depth.")


def format_table(results: list[dict]) -> str:
    """The runs side by side (the single-depth report)."""
    rows = [
        ("run", lambda r: r["run"]),
        ("seed", lambda r: str(r["seed_index"])),
        ("lbe_beta", lambda r: f"{r['lbe_beta']:g}"),
        ("test accuracy", lambda r: f"{100 * r['test_accuracy']:.1f}%"),
        ("test task loss", lambda r: f"{r['test_loss']:.4f}"),
        ("train task loss (last log)", lambda r: "-" if r["train_task_loss"] is None else f"{r['train_task_loss']:.4f}"),
        ("entropy min (end)", lambda r: f"{r['entropy_min']:.4g}"),
        ("entropy mean (end)", lambda r: f"{r['entropy_mean']:.4g}"),
        (f"alive layers (H > {DEAD_ENTROPY:g})", lambda r: f"{r['alive_layers']}/{r['num_layers']}"),
        ("effective rank L1/L5/L10", lambda r: " / ".join(f"{r['effective_rank_end'][k]:.2f}" for k in ("1", "5", "10")
                                                          if k in r["effective_rank_end"])),
        ("steps", lambda r: str(r["steps"])),
        ("wall time", lambda r: f"{r['wall_time_s']:.1f} s"),
    ]
    cells = [[name] + [fmt(r) for r in results] for name, fmt in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# The prior shape of a run's cost, for the time-left estimate until a deep run has finished: in the documented
# frontier (1,000 steps) a run took about 2.5 s plus 0.145 s per hidden layer (experiments/frontier/results/vanilla_frontier.json),
# i.e. a fixed part worth ~17 layers.
def run_cost(job: Job) -> float:
    return job.depth + 17.0


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class Progress:
    """The one line printed per finished run: run k of N, kind, depth, seed, test accuracy, seconds, and the time
    left for the job.

    The time left is the job's work in run-seconds (the finished runs as measured, the others predicted) spread over
    the workers, minus the wall time since the first run started; counting wall time credits the runs in flight. A
    run's seconds are predicted as `a + b·depth`, fitted to the finished runs once one of them is at least half as
    deep as the deepest planned (so the fit does not extrapolate from shallow runs alone); before that, as the prior
    `run_cost` scaled to the finished runs' seconds.
    """

    def __init__(self, jobs: list[Job], workers: int, clock=time.perf_counter):
        self.jobs, self.total, self.workers = list(jobs), len(jobs), workers
        self.finished: dict[str, tuple[int, float]] = {}  # run name -> (depth, seconds)
        self.clock = clock
        self.start = clock()
        self.first_start: float | None = None

    def _seconds(self, depth: int) -> float:
        """Predicted seconds of a run of this depth."""
        depths, seconds = zip(*self.finished.values())
        if max(depths) * 2 >= max(j.depth for j in self.jobs) and len(set(depths)) > 1:
            mean_d, mean_s = sum(depths) / len(depths), sum(seconds) / len(seconds)
            slope = (sum((d - mean_d) * (t - mean_s) for d, t in zip(depths, seconds))
                     / sum((d - mean_d) ** 2 for d in depths))
            intercept = mean_s - slope * mean_d
            if slope > 0 and intercept >= 0:
                return intercept + slope * depth
        per_unit = sum(seconds) / sum(d + 17.0 for d in depths)
        return per_unit * (depth + 17.0)

    def line(self, job: Job, result: dict) -> str:
        now = self.clock()
        if self.first_start is None:
            self.first_start = now - result["wall_time_s"]
        self.finished[job.name] = (job.depth, result["wall_time_s"])
        done = len(self.finished)
        width = len(str(self.total))
        head = (f"run {done:>{width}}/{self.total}  {job.kind:<8}  depth {job.depth:<4} seed {job.seed_index}  "
                f"test accuracy {100 * result['test_accuracy']:5.1f}%  {result['wall_time_s']:5.0f} s")
        if done == self.total:
            return f"{head}  (all done in {_duration(now - self.start)})"
        work = sum(t for _, t in self.finished.values()) + sum(
            self._seconds(j.depth) for j in self.jobs if j.name not in self.finished)
        left = max(0.0, work / self.workers - (now - self.first_start))
        return f"{head}  (about {_duration(left)} left)"
