"""The trainer's LBE metrics: summed on the device per mode, reduced across processes once per window.

A training step or an evaluation batch adds its values to its mode's tally (`"train"`, `"eval"`) as device tensors,
so the step never waits for the host; `flush` reads the window's sums once (one `reduce` across processes, one host
read), checks them for NaN/inf entropies and turns them into means:

- per measured forward pass (`measured` counts those): `batch_entropy_mean`, `batch_entropy_min`, `lbe_alpha_mean`;
- per layer over the passes that measured it (`layers_measured`): `batch_entropy_per_layer`, a list;
- per optimizer step and process, as `Trainer`'s `"loss"` (`PER_STEP`): `task_loss`, `lbe_loss`.

`logs` names them as the trainer logs them (`batch_entropy/layer_<i>` with `lbe_log_per_layer`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .regularizer import nonfinite_message, raise_if_nonfinite

logger = logging.getLogger(__name__)

__all__ = ["PER_STEP", "MetricTally"]

# Metrics summed per logging window that are per optimizer step, like Trainer's "loss"; the others are per measured
# forward pass (`measured` counts those).
PER_STEP = ("task_loss", "lbe_loss")


class MetricTally:
    """Sums of named metrics per mode, kept on the device until `flush`.

    Args:
        clock: returns the current optimizer step (`trainer.state.global_step`); a mode's window starts at the step of
            its first value since the last flush.
    """

    def __init__(self, clock: Callable[[], int]):
        self._clock = clock
        self._sums: dict[str, dict[str, torch.Tensor]] = {}  # mode → name → sum on the device
        self._start: dict[str, int] = {}
        self._warned_unmeasured = False
        self._warned_nonfinite = False

    def add(self, mode: str, **values: torch.Tensor) -> None:
        """Add named values to this mode's tally (sums on the device, nothing read on the host)."""
        tally = self._sums.get(mode)
        if tally is None:
            tally = self._sums[mode] = {}
            self._start[mode] = self._clock()
        for name, value in values.items():
            value = value.detach().float()
            tally[name] = tally[name] + value if name in tally else value.clone()

    def add_pass(
        self, mode: str, entropies: torch.Tensor, measured: torch.Tensor | None = None, **extra: torch.Tensor
    ) -> None:
        """The metrics of one forward pass: entropy mean/min over the measured layers, per-layer values and counts,
        NaN/inf count. `entropies` `(L,)`; `measured` `(L,)` bool says which layers had a batch-entropy (`None`: all);
        a pass without any counts in `passes` but not in `measured`, so that the means are over the passes that
        measured something."""
        ones = torch.ones((), device=entropies.device)
        if measured is None:
            mean, low, any_measured = entropies.mean(), entropies.min(), ones
            layers, per_layer = torch.ones_like(entropies), entropies
        else:
            weight = measured.to(entropies.dtype)
            any_measured = measured.any().to(entropies.dtype)
            mean = (entropies * weight).sum() / weight.sum().clamp_min(1)
            low = torch.where(measured, entropies, torch.inf).min().nan_to_num(posinf=0.0)
            layers, per_layer = weight, entropies * weight
        self.add(
            mode,
            passes=ones,
            measured=any_measured,
            batch_entropy_mean=mean,
            batch_entropy_min=low,
            batch_entropy_per_layer=per_layer,
            layers_measured=layers,
            nonfinite=(~torch.isfinite(entropies)).float(),
            **extra,
        )

    def window_start(self, mode: str) -> int:
        """The step at which this mode's open window started (the current step when none is open)."""
        return self._start.get(mode, self._clock())

    def discard(self, mode: str | None = None) -> None:
        """Forget this mode's open window (every mode's with `None`), unread."""
        if mode is None:
            self._sums, self._start = {}, {}
        else:
            self._sums.pop(mode, None)

    def flush(
        self,
        mode: str,
        layer_names: Sequence[str],
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        num_processes: int = 1,
        steps: int = 1,
        strict: bool = True,
    ) -> dict[str, Any]:
        """This mode's tally summed across processes (one `reduce` of one flat tensor), then forgotten; raises a
        `FloatingPointError` naming the layers (`layer_names`) whose entropies were NaN/inf, or with `strict=False`
        (the entropies are only measured, not in the loss) warns once and reports them as they are.

        Returns the means: entropy metrics per measured forward pass, `PER_STEP` ones per process and optimizer step
        (`steps`: the window's optimizer steps), `batch_entropy_per_layer` as a list. Empty when nothing was tallied.
        """
        tally = self._sums.pop(mode, None)
        if not tally:
            return {}
        names = list(tally)
        flat = torch.cat([tally[name].reshape(-1) for name in names])
        if reduce is not None and num_processes > 1:
            flat = reduce(flat)
        values, offset, listed = {}, 0, flat.tolist()
        for name in names:
            size = tally[name].numel()
            values[name] = listed[offset] if tally[name].dim() == 0 else listed[offset : offset + size]
            offset += size
        if "nonfinite" in values:
            nonfinite = torch.tensor(values.pop("nonfinite"))
            if strict:
                raise_if_nonfinite(nonfinite, layer_names)
            elif not self._warned_nonfinite and (message := nonfinite_message(nonfinite, layer_names)):
                logger.warning(f"{message} The entropies are only measured (lbe_beta=0): training goes on as "
                               "Trainer's would. Said once.")
                self._warned_nonfinite = True
        measured = values.pop("measured", 0.0)
        passes = values.pop("passes", 0.0)
        layers = values.pop("layers_measured", None)
        if passes > measured and not self._warned_unmeasured:
            logger.warning(
                f"{int(passes - measured)} batch(es) had no position where two sequences hold a real token (e.g. all "
                "but one example empty): they have no batch-entropy and trained on the task loss alone. Said once."
            )
            self._warned_unmeasured = True
        means = {}
        for name, value in values.items():
            if name in PER_STEP:
                means[name] = value / num_processes
                means[name] /= steps
            elif name == "batch_entropy_per_layer" and layers is not None:
                means[name] = [v / n if n else float("nan") for v, n in zip(value, layers)]
            elif measured:
                means[name] = [v / measured for v in value] if isinstance(value, list) else value / measured
        return means

    @staticmethod
    def logs(means: dict[str, Any], prefix: str = "", per_layer: bool = False) -> dict[str, float]:
        """`flush`'s means as log entries, `prefix` before each name; the per-layer list as `batch_entropy/layer_<i>`
        entries where `per_layer` (`lbe_log_per_layer`), else left out."""
        logs = {f"{prefix}{name}": value for name, value in means.items() if name != "batch_entropy_per_layer"}
        if per_layer and "batch_entropy_per_layer" in means:
            logs.update((f"{prefix}batch_entropy/layer_{i}", v) for i, v in enumerate(means["batch_entropy_per_layer"]))
        return logs
