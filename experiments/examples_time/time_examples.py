"""Wall time of each example's documented command, one after the other, into a JSON with its provenance.

    python experiments/examples_time/time_examples.py --glue_dir path/to/glue --output docs/results/examples_time.json

The RTE and SFT examples run their offline commands (the original GLUE files in --glue_dir), which train exactly as
their default commands do once the data is loaded from the Hub. Run it on a quiet machine: it measures wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: the repository root, for `experiments`

from experiments.provenance import provenance

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
            start = time.perf_counter()
            done = subprocess.run([sys.executable, os.path.join(REPO, argv[0]), *argv[1:], *extra], cwd=out, env=env,
                                  capture_output=True, text=True)
            seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = {"command": "python " + " ".join(argv), "wall_time_s": seconds,
                         "last_line": done.stdout.strip().splitlines()[-1]}
        print(f"{name}: {seconds:.0f} s  ({results[name]['last_line'][:100]})", flush=True)
    with open(cli.output, "w") as f:
        json.dump({"meta": provenance(sys.argv), "examples": results}, f, indent=1)


if __name__ == "__main__":
    main()
