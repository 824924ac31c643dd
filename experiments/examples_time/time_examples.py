"""Wall time and CPU time of each example's documented command, one after the other, into a JSON with its provenance.

    python experiments/examples_time/time_examples.py --glue_dir path/to/glue --output experiments/examples_time/results/examples_time.json

The RTE and SFT examples run their offline commands (the original GLUE files in --glue_dir), which train exactly as
their default commands do once the data is loaded from the Hub. The CPU seconds (user + system, of the example's
process and its children) hardly depend on what else runs on the machine; the wall time does, so the JSON also records
the load average before each command and the number of CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: the repository root, for `experiments`

from experiments.provenance import portable_path, provenance

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue_dir", required=True, help="folder with the original GLUE task folders (RTE, SST-2)")
    parser.add_argument("--output", required=True)
    cli = parser.parse_args()
    cli.glue_dir = os.path.abspath(cli.glue_dir)
    commands = {
        "quickstart": ["examples/quickstart.py"],
        "finetune_rte": ["examples/finetune_rte.py", "--data_dir", f"{cli.glue_dir}/RTE"],
        "vision_mlp": ["examples/vision_mlp.py"],
        "sft_with_lbe": ["examples/sft_with_lbe.py", "--data", f"{cli.glue_dir}/SST-2/train.tsv"],
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    for name, argv in commands.items():
        with tempfile.TemporaryDirectory() as out:
            extra = [] if name == "quickstart" else ["--output_dir", out]
            load = os.getloadavg()[0]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            done = subprocess.run([sys.executable, os.path.join(REPO, argv[0]), *argv[1:], *extra], cwd=out, env=env,
                                  capture_output=True, text=True)
            seconds = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = {"command": "python " + " ".join(portable_path(w) for w in argv), "wall_time_s": seconds,
                         "cpu_time_s": cpu, "load_average_1min_before": load,
                         "last_line": done.stdout.strip().splitlines()[-1]}
        print(f"{name}: {seconds:.0f} s wall, {cpu:.0f} CPU s  ({results[name]['last_line'][:100]})", flush=True)
    with open(cli.output, "w") as f:
        json.dump({"meta": provenance(sys.argv, packages=("trl", "datasets")), "examples": results}, f, indent=1)


if __name__ == "__main__":
    main()
