"""What produced a result file: the command, the commit, the library versions and the machine.

Every JSON of measured figures that the project's scripts write (`results.json` of the vanilla experiments, the
benchmarks, the GLUE tables, the padding check) carries this record, so that a figure in the docs can be traced to
the code and the host that made it and re-run:

    >>> from experiments.provenance import provenance
    >>> record = provenance(["scripts/benchmark.py", "--device", "cpu"], packages=["deepspeed"])
    >>> sorted(record)
    ['changed_files', 'command', 'commit', 'dirty', 'machine', 'started', 'versions']

Not imported by `import hf_batch_entropy`, and imports nothing of it: a script can load this file on its own.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["cpu_id", "cpu_model", "git", "portable_path", "provenance", "weights_checksum"]

#: Versions recorded in every provenance (besides this package's, as `hf_batch_entropy`, and the ones a caller names).
CORE_PACKAGES = ("torch", "transformers", "accelerate", "numpy")


def git(*args: str, cwd: str | None = None) -> str | None:
    """`git <args>` in `cwd` (default: this package's checkout); None where git or the repository is missing."""
    cwd = cwd or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", cwd, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpuinfo() -> dict[str, str]:
    """The fields of the first processor in /proc/cpuinfo (Linux; empty elsewhere), keys lower-cased."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, sep, value = line.partition(":")
                if sep:
                    fields[key.strip().lower()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else `platform.processor()`."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown"


#: The vector instruction sets whose presence `cpu_id` records: what decides which kernels MKL, oneDNN and ATen run.
VECTOR_ISAS = ("sse4_2", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")


def cpu_id() -> dict[str, Any]:
    """The CPU's vendor, family and model numbers and which of `VECTOR_ISAS` it has, from /proc/cpuinfo (Linux;
    empty elsewhere): model names such as "AMD EPYC" cover several generations whose kernels, and so whose figures,
    differ."""
    info = _cpuinfo()
    if not info:
        return {}
    flags = set(info.get("flags", "").split())
    return {"vendor": info.get("vendor_id"), "family": info.get("cpu family"), "model": info.get("model"),
            "vector_isas": [isa for isa in VECTOR_ISAS if isa in flags]}


REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def portable_path(word: str, repo: str = REPOSITORY) -> str:
    """A command-line word as a reader of the record can use it on another machine: an absolute path inside the
    repository becomes relative to its root; any other absolute path becomes `path/to/<its last part>`, the docs'
    placeholder (the folders of one machine mean nothing on another). `--flag=/a/path` is treated alike; other words
    are kept.

        >>> portable_path("/tmp/runs/glue/RTE", repo="/home/me/hf-batch-entropy")
        'path/to/RTE'
    """
    flag, sep, value = word.partition("=") if word.startswith("--") else ("", "", word)
    if not os.path.isabs(value):
        return word
    inside = os.path.commonpath([os.path.abspath(value), repo]) == repo
    value = os.path.relpath(value, repo) if inside else f"path/to/{os.path.basename(value.rstrip(os.sep))}"
    return f"{flag}{sep}{value}"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance(
    argv: Sequence[str] | None = None, packages: Sequence[str] = (), repo: str | None = None, **machine: Any
) -> dict[str, Any]:
    """The record of what produced a result.

    Args:
        argv: The command as run, script path first (default: `sys.argv`); recorded as `python <argv...>`, quoted for
            a shell, with the script's path relative to the current directory and every other absolute path made
            portable (`portable_path`).
        packages: Distribution names whose versions are recorded besides `CORE_PACKAGES` (e.g. `"scikit-learn"`).
        repo: The git checkout whose commit is recorded (default: the one this package is in).
        **machine: Facts about how the run used the machine (threads, processes, ...), added to `machine`.

    Returns:
        `{"command", "commit", "dirty", "changed_files", "versions", "machine", "started"}`: `commit` is
        `git rev-parse HEAD` of the checkout (None outside one), `dirty` whether tracked files differed from it,
        `changed_files` which did (a run that follows runs which rewrote their result files shows that only those
        differed; None outside a checkout), `versions` the Python and package versions (None for one that is not
        installed), `machine` the platform, CPU model, its family, model numbers and vector instruction sets
        (`cpu_id`), the kernels ATen runs (where torch is imported), logical CPUs and CUDA device (None without
        one), plus `machine`'s keyword arguments; `started` the local time.
    """
    argv = list(sys.argv if argv is None else argv)
    if argv and os.path.isabs(argv[0]):
        argv[0] = os.path.relpath(argv[0])
    argv = argv[:1] + [portable_path(word) for word in argv[1:]]
    status = git("status", "--porcelain", "--untracked-files=no", cwd=repo)
    changed = None if status is None else []
    if status:
        changed = (git("diff", "--name-only", "HEAD", cwd=repo) or "").splitlines()
    cuda = aten_kernels = None
    if "torch" in sys.modules:
        import torch

        cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        # The kernels ATen dispatches to: the CPU's best, or fewer where ATEN_CPU_CAPABILITY limits them.
        aten_kernels = torch.backends.cpu.get_cpu_capability()
    return {
        "command": shlex.join(["python", *argv]),
        "commit": git("rev-parse", "HEAD", cwd=repo),
        "dirty": None if status is None else bool(status),
        "changed_files": changed,
        "versions": {"python": platform.python_version(), "hf_batch_entropy": _version("hf-batch-entropy"),
                     **{p: _version(p) for p in (*CORE_PACKAGES, *packages)}},
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "cpu_id": cpu_id(),
                    "aten_cpu_capability": aten_kernels, "logical_cpus": os.cpu_count(), "cuda": cuda, **machine},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def weights_checksum(model: Any) -> float:
    """Σ|w| over a model's parameters, in float64: recorded before training (`init_checksum`), it shows that two runs
    compared as "without and with LBE" started from the same weights (equal sums) without storing the weights."""
    return float(sum(p.detach().double().abs().sum() for p in model.parameters()))
