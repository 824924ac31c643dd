"""`BatchEntropyConfig`: `transformers.TrainingArguments` plus the `lbe_*` settings of LBE.

The `lbe_*` fields live in a dataclass mixin, `BatchEntropyArguments`, so that any `TrainingArguments` subclass gets
them the same way: `BatchEntropyConfig` (`TrainingArguments`), `BatchEntropySeq2SeqConfig`
(`Seq2SeqTrainingArguments`), or your own, e.g. TRL's `SFTConfig`:

    @dataclass
    class SFTWithLBEConfig(BatchEntropyArguments, SFTConfig):
        pass

(`batch_entropy_config(SFTConfig)` builds that class for you). Every field has a `help` text, so
`HfArgumentParser(BatchEntropyConfig)` gives each one a documented command-line flag, exactly like the
`TrainingArguments` flags it extends.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import Seq2SeqTrainingArguments, TrainingArguments

__all__ = [
    "BatchEntropyArguments",
    "BatchEntropyConfig",
    "BatchEntropySeq2SeqConfig",
    "MAX_TARGET",
    "TargetModules",
    "batch_entropy_config",
    "check_settings",
]

REGEX_PREFIX = "re:"

#: The largest entropy target (`|lbe_alpha|`, `lbe_alpha_min`), in nats per unit. A unit at 20 nats has a variance of
#: about 1e16 (`H = ½·ln(π·e·σ² + 1)`); the paper's targets lie between 0.2 and 2.6. Far larger targets overflow the
#: squared distance `(H − α)²` in float32 and write NaN into the weights at the first step.
MAX_TARGET = 20.0

#: What `lbe_target_modules` takes: a regex string, or a list of module names (exact or dotted suffix, or
#: `re:<regex>`) and module classes.
TargetModules = str | list[str | type[nn.Module]] | None


@dataclass
class BatchEntropyArguments:
    r"""
    The `lbe_*` settings of layerwise batch-entropy regularization (LBE, Peer et al., TMLR 2022), a mixin for a
    `TrainingArguments` class: list it first among the bases (`class C(BatchEntropyArguments, TrainingArguments)`).

    For each regularized layer `l` with batch-entropy `H_l` and learnable target `α_l`:

        lbe_l = (H_l − max(lbe_alpha_min, |α_l|))²
        L     = L_task + lbe_beta · mean_l(lbe_l) · L_task

    The defaults are those of the paper's reference implementation (β = α₀ = α_min = 0.5), tuned for training deep
    networks from scratch. For fine-tuning pretrained transformers the paper searched β ∈ {0.005, 0.01, 0.05} and
    α₀ ∈ {0.2, 0.3, 0.5, 0.8}.

    Parameters:
        lbe_beta (`float`, *optional*, defaults to `0.5`):
            Weight β of the term. `0` turns LBE off: losses and updates are exactly the base trainer's, and the
            entropies are still measured and logged.
        lbe_alpha (`float`, *optional*, defaults to `0.5`):
            Initial value α₀ of every layer's learnable target α_l, in nats per unit; `|α₀| ≤ 20` (`MAX_TARGET`).
        lbe_alpha_min (`float`, *optional*, defaults to `0.5`):
            Floor of the targets: each layer is pulled towards `max(lbe_alpha_min, |α_l|)`; `0 ≤ α_min ≤ 20`.
        lbe_alpha_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Learning rate of α's own AdamW (no weight decay); `None`: the model's `learning_rate`. Either way it is
            multiplied by the main schedule's current factor.
        lbe_scale_by_task_loss (`bool`, *optional*, defaults to `True`):
            Multiply the term by the task loss, as the paper does (`β·mean_l(lbe_l)·L_task`; the entropies' gradient
            is weighted by `|L_task|`, so a negative task loss still pulls each layer towards its target). `False`
            adds `β·mean_l(lbe_l)` alone: for losses that are about 0 or change sign (TRL's GRPO and RLOO), where a
            term scaled by them does next to nothing.

        lbe_target_modules (`TargetModules`, i.e. `str`, `list[str | type[nn.Module]]` or `None`, *optional*, defaults to `None`):
            The layers to regularize, as PEFT's `target_modules`: module names matched exactly or as a dotted suffix,
            a regex string (on the command line `re:<regex>`), or module classes (from Python). `None`: the model's
            `hidden_states`, else its activation modules, else every `Linear`/`Conv` layer.
        lbe_ignore_padding (`bool`, *optional*, defaults to `True`):
            Leave padding out of token-level entropies (`attention_mask`); `False` takes every position, as the
            paper's code does.

        lbe_sync_entropy (`bool`, *optional*, defaults to `False`):
            Entropies over the global batch of all processes (like `SyncBatchNorm`), with gradients through the merge.
        lbe_fused (`bool`, *optional*, defaults to `True`):
            One fused reduction over all same-shaped layers; `False` runs the per-layer reference loop (same numbers).

        lbe_log_per_layer (`bool`, *optional*, defaults to `False`):
            Also log each layer's entropy as `batch_entropy/layer_<i>`.
        lbe_eval_entropy (`bool`, *optional*, defaults to `False`):
            Also report `<prefix>_batch_entropy_mean/min` from `evaluate()` and `predict()`.
    """

    lbe_beta: float = field(
        default=0.5,
        metadata={
            "help": "Weight β of the batch-entropy term: L = L_task + β·mean_l(lbe_l)·L_task. 0 turns LBE off and "
            "makes the trainer behave exactly like transformers.Trainer (entropies are still measured and logged)."
        },
    )
    lbe_alpha: float = field(
        default=0.5,
        metadata={
            "help": "Initial value α₀ of every layer's learnable batch-entropy target α_l (nats per unit, |α₀| <= 20). "
            "α is trained by an AdamW of its own (no weight decay; adam_beta1/2 and adam_epsilon of these "
            "arguments), whatever optimizer trains the model."
        },
    )
    lbe_alpha_min: float = field(
        default=0.5,
        metadata={
            "help": "Floor of the batch-entropy target (0 to 20 nats): each layer is pulled towards "
            "max(lbe_alpha_min, |α_l|), so no layer is allowed to lose all information about the input."
        },
    )
    lbe_alpha_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the α targets. Default (None): the model's learning_rate, as in the paper. "
            "It follows the model's schedule (warm-up, decay). When fine-tuning with a small learning rate (say "
            "2e-5) α hardly moves from α₀; set e.g. 1e-3 to let the targets adapt to each layer."
        },
    )
    lbe_scale_by_task_loss: bool = field(
        default=True,
        metadata={
            "help": "Multiply the batch-entropy term by the task loss, as the paper does: L = L_task + "
            "β·mean_l(lbe_l)·L_task, with the entropies' gradient weighted by |L_task| so that a negative task loss "
            "still pulls each layer towards its target. False: L = L_task + β·mean_l(lbe_l), for losses that are "
            "about 0 or change sign (policy-gradient losses such as GRPO's and RLOO's); choose a smaller β then."
        },
    )
    # Takes `TargetModules` (a regex string, names, or module classes); the hint is what the command line gives,
    # because HfArgumentParser accepts no union but `X | None` for a multi-value flag.
    lbe_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Which layers to regularize, PEFT style. A list of module names, each matched exactly or as a "
            "dotted suffix (`act` matches `encoder.3.act`), or a single entry `re:<regex>` matched against the full "
            "module name. From Python also a plain string (a regex) or module classes (e.g. [nn.ReLU]). "
            "Default (None): the model's `hidden_states` when it returns them (embeddings included), else the "
            "outputs of its activation modules (nn.ReLU, nn.GELU, ...), else of every Linear/Conv layer."
        },
    )
    lbe_ignore_padding: bool = field(
        default=True,
        metadata={
            "help": "Leave padding out of the batch-entropy of token-level activations: with an `attention_mask` in "
            "the batch (and `decoder_attention_mask`, or labels other than -100, for an encoder-decoder's decoder "
            "states), each unit's variance at a position is taken over the examples that have a real token there, "
            "and positions with fewer than two real tokens are left out. False takes every position, padding "
            "included, as the paper's code does. Packed (padding-free) batches are always measured per sequence."
        },
    )
    lbe_sync_entropy: bool = field(
        default=False,
        metadata={
            "help": "Compute batch-entropies over the global batch of all processes (like SyncBatchNorm), with "
            "gradients through the combination, so N processes with batch B/N match one process with batch B. "
            "Costs two all-reduces of U floats per layer shape per step; turn it on when the per-device batch is "
            "small (say below 16)."
        },
    )
    lbe_fused: bool = field(
        default=True,
        metadata={
            "help": "Compute the entropies of all same-shaped layers in one fused reduction (fewer kernels, less "
            "memory). False uses the reference per-layer loop; both give the same numbers."
        },
    )
    lbe_log_per_layer: bool = field(
        default=False,
        metadata={"help": "Also log each layer's batch-entropy as `batch_entropy/layer_<i>`."},
    )
    lbe_eval_entropy: bool = field(
        default=False,
        metadata={
            "help": "Also measure batch-entropies during evaluation and report them as `eval_batch_entropy_mean` "
            "and `eval_batch_entropy_min`. The evaluation loss is always the task loss alone."
        },
    )

    def __post_init__(self):
        _validate_lbe_settings(self)  # first: a bad lbe_* value fails before TrainingArguments sets up devices
        super().__post_init__()

    def to_dict(self):
        # Module classes are not JSON-serializable; keep their names so that logging integrations can show them.
        d = super().to_dict()
        targets = d.get("lbe_target_modules")
        if isinstance(targets, list):
            d["lbe_target_modules"] = [t if isinstance(t, str) else t.__name__ for t in targets]
        return d

    @property
    def lbe_settings(self) -> dict:
        """Every `lbe_*` field as a JSON-able dict (the model card's; the regularizer's files use the same keys)."""
        return {name: value for name, value in self.to_dict().items() if name.startswith("lbe_")}


@dataclass
class BatchEntropyConfig(BatchEntropyArguments, TrainingArguments):
    """Training arguments for [`BatchEntropyTrainer`]: all of `TrainingArguments`, plus the `lbe_*` settings of
    [`BatchEntropyArguments`] (layerwise batch-entropy regularization)."""


@dataclass
class BatchEntropySeq2SeqConfig(BatchEntropyArguments, Seq2SeqTrainingArguments):
    """Training arguments for [`BatchEntropySeq2SeqTrainer`]: all of `Seq2SeqTrainingArguments` (generation included),
    plus the `lbe_*` settings of [`BatchEntropyArguments`]."""


# The boolean `lbe_*` fields, read from the dataclass (annotations are strings here: `from __future__ import
# annotations`), so that a new one is converted from strings too.
_BOOL_FIELDS = tuple(f.name for f in dataclasses.fields(BatchEntropyArguments) if f.type in ("bool", bool))

_KNOWN = {TrainingArguments: BatchEntropyConfig, Seq2SeqTrainingArguments: BatchEntropySeq2SeqConfig}


@functools.cache
def batch_entropy_config(base: type) -> type:
    """The `TrainingArguments` subclass `base` plus the `lbe_*` fields: `BatchEntropyConfig` for `TrainingArguments`,
    `BatchEntropySeq2SeqConfig` for `Seq2SeqTrainingArguments`, else a new dataclass `<base>WithBatchEntropy`
    (e.g. for TRL's `SFTConfig`). Always the same class for the same `base`."""
    if issubclass(base, BatchEntropyArguments):
        return base
    if base in _KNOWN:
        return _KNOWN[base]
    if not (isinstance(base, type) and issubclass(base, TrainingArguments)):
        raise TypeError(f"batch_entropy_config needs a TrainingArguments subclass, got {base!r}.")
    namespace = {"__doc__": base.__doc__, "__reduce__": lambda self: (_rebuild, (base, self.__dict__.copy()))}
    return dataclass(type(f"{base.__name__}WithBatchEntropy", (BatchEntropyArguments, base), namespace))


def _rebuild(base: type, state: dict) -> BatchEntropyArguments:
    # Unpickling (Trainer saves the arguments with every checkpoint): the class is made again from its base, which
    # pickle finds by name, unlike the made class.
    args = object.__new__(batch_entropy_config(base))
    args.__dict__.update(state)
    return args


def with_batch_entropy_fields(args: TrainingArguments) -> BatchEntropyArguments:
    """`args` itself when it has the `lbe_*` fields, else the same values in `batch_entropy_config(type(args))` with
    the default `lbe_*` settings."""
    if isinstance(args, BatchEntropyArguments):
        return args
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    return batch_entropy_config(type(args))(**values)


def with_lbe_args(
    base_init: Any, pos_args: tuple, kwargs: dict[str, Any], default_class: type | None
) -> tuple[tuple, dict[str, Any]]:
    """The base trainer's constructor arguments with its `args` upgraded to carry the `lbe_*` fields (or, where none
    was given and the trainer has one, `default_class(output_dir="trainer_output")`), in the same position or keyword.

    Where `base_init` takes no `args` parameter, or the arguments do not bind to its signature, they are returned
    unchanged: the base constructor reports its own error, and the arguments it builds are upgraded after it."""
    try:
        signature = inspect.signature(base_init)
        bound = signature.bind_partial(*pos_args, **kwargs)
    except (TypeError, ValueError):
        return pos_args, kwargs
    if "args" not in signature.parameters:
        return pos_args, kwargs
    value = bound.arguments.get("args")
    if value is None and default_class is not None:
        bound.arguments["args"] = default_class(output_dir="trainer_output")
    elif value is not None:
        bound.arguments["args"] = with_batch_entropy_fields(value)
    return bound.args, bound.kwargs


def check_settings(prefix: str = "", **settings: float | str | None) -> dict[str, float | None]:
    """Validate the regularizer's numeric settings: the one place, used by `BatchEntropyConfig` (which passes
    `prefix="lbe_"`, so that messages name its fields) and by `BatchEntropyRegularizer`.

    Accepted keywords: `beta` (β ≥ 0; 0 turns LBE off), `alpha` (α₀, `|α₀| ≤ MAX_TARGET`), `alpha_min`
    (`0 ≤ α_min ≤ MAX_TARGET`), `alpha_learning_rate` (α's learning rate, ≥ 0; `None` allowed and kept); each finite.
    A string that reads as a number (`"5e-2"`, as YAML 1.1 reads that exponent form) is taken as that number. Returns
    them as floats.
    """
    checked = {}
    for name, value in settings.items():
        if value is None and name == "alpha_learning_rate":
            checked[name] = None
            continue
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{prefix}{name} must be a number, got {value!r}.") from None
        if not math.isfinite(value):
            raise ValueError(f"{prefix}{name} must be a finite number, got {value}.")
        if value < 0 and name != "alpha":
            hint = " (0 turns LBE off)" if name == "beta" else ""
            raise ValueError(f"{prefix}{name} must be >= 0{hint}, got {value}.")
        if name in ("alpha", "alpha_min") and abs(value) > MAX_TARGET:
            raise ValueError(
                f"{prefix}{name}={value} is out of range: entropy targets lie within ±{MAX_TARGET:g} nats per unit "
                f"(a unit at {MAX_TARGET:g} nats has a variance of about 1e16; the paper's targets are 0.2 to 2.6)."
            )
        checked[name] = value
    return checked


def _as_bool(name: str, value: Any) -> bool:
    """A boolean setting, also from the strings a YAML or JSON file may hold (`"true"`, `"False"`, `"1"`, `"no"`)."""
    if isinstance(value, bool):
        return value
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if isinstance(value, str) and value.strip().lower() in words:
        return words[value.strip().lower()]
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be true or false, got {value!r}.")


def _validate_lbe_settings(args: BatchEntropyArguments) -> None:
    """Reject `lbe_*` values that cannot work, naming the field and the fix; convert numbers and booleans given as
    strings (a YAML or JSON file's); normalize `lbe_target_modules`.

    The numeric settings are the regularizer's and are checked by its own rule (`check_settings`), so that a config
    that passes here builds a regularizer, and one message names each problem."""
    checked = check_settings(
        prefix="lbe_", beta=args.lbe_beta, alpha=args.lbe_alpha, alpha_min=args.lbe_alpha_min,
        alpha_learning_rate=args.lbe_alpha_learning_rate,
    )
    for name, value in checked.items():
        setattr(args, f"lbe_{name}", value)
    for name in _BOOL_FIELDS:
        setattr(args, name, _as_bool(name, getattr(args, name)))
    targets = args.lbe_target_modules
    if isinstance(targets, str):
        _compile_regex(targets)
    elif targets is not None:
        if isinstance(targets, type):
            targets = [targets]
        args.lbe_target_modules = list(targets)
        if not args.lbe_target_modules:
            raise ValueError("lbe_target_modules is an empty list: give module names, a regex, or None.")
        for target in args.lbe_target_modules:
            if isinstance(target, str):
                if target.startswith(REGEX_PREFIX):
                    _compile_regex(target[len(REGEX_PREFIX) :])
            elif not (isinstance(target, type) and issubclass(target, nn.Module)):
                raise TypeError(
                    f"lbe_target_modules entries must be module names (str) or nn.Module classes, got {target!r}."
                )


def _compile_regex(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"lbe_target_modules regex {pattern!r} does not compile: {err}.") from err
