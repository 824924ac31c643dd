"""Measuring a forward that `Trainer` runs itself, outside `compute_loss`: an unlabelled prediction batch, or the
labelled forward `Seq2SeqTrainer` runs for the loss after generating (`lbe_eval_entropy`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["measuring_forward"]


@contextlib.contextmanager
def measuring_forward(
    model: torch.nn.Module,
    capture: Any,
    handle_output: Callable[[Any], Any],
    measured: Callable[[dict[str, Any]], bool] | None = None,
) -> Iterator[None]:
    """Around the first forward of `model` in this block whose keywords satisfy `measured` (any, by default): record
    it with `capture` and replace its outputs by `handle_output(outputs)` (which measures the captured activations and
    returns the outputs the caller would have had without LBE).

    The capture records inside that forward only (its block opens when the forward starts, before the capture's own
    hooks run, and closes when it ends), so other forwards of the block (generation's) are not seen."""
    state = {"open": None, "done": False}

    def before(module, args, kwargs):
        if state["done"] or state["open"] is not None or (measured is not None and not measured(kwargs)):
            return None
        stack = contextlib.ExitStack()
        stack.enter_context(capture.capturing())
        state["open"] = stack
        return args, capture.prepare_inputs(kwargs)

    def after(module, args, kwargs, output):
        stack = state["open"]
        if stack is None:
            return output
        state["open"], state["done"] = None, True
        stack.close()
        return handle_output(output)

    # `before` first, so that the capture's own hooks on the model see its block open.
    handles = [model.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
               model.register_forward_hook(after, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if state["open"] is not None:  # the forward raised
            state["open"].close()
