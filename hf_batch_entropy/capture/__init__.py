"""Where the regularized activations come from.

Two sources, one interface (`Capture`: `prepare_inputs` → forward → `collect` → `restore`, inside `capturing()`), and
one place that chooses between them, `select_capture`:

- `HiddenStatesCapture`: a Transformers model's own `hidden_states` (`output_hidden_states=True`): embeddings plus
  every layer's output; encoder and decoder ones for encoder-decoder models.
- `ForwardHookCapture`: forward hooks on chosen submodules of any `nn.Module` (an MLP, a CNN, a timm backbone). The
  modules are chosen PEFT-style (`lbe_target_modules`: names matched exactly or as a dotted suffix, a regex, or module
  classes), by default the activation modules (`nn.ReLU`, `nn.GELU`, …), else every `Linear`/`Conv` layer.

Hooks record only inside `capturing()` (the training forward), so evaluation, generation and the recomputation of
gradient checkpointing cost nothing, and `collect` hands the tensors over and forgets them, so no activation outlives
its step.

**Which forward is measured.** A trainer's loss may run the model more than once: a reference forward under
`no_grad` (TRL's DPO on a PEFT model without `ref_model`), a second no-grad forward for logits or metrics (TRL's SFT
with `label_smoothing_factor` or `compute_loss_func`), a KL forward before the policy's (TRL's KTO). Both sources
measure one forward of the model per `capturing()` block, the same one: the first that computes gradients when the
block does (training), else the first (evaluation). Watched by hooks on the model itself (`_ForwardWatch`), which also
keep the keyword inputs of that forward (`inputs_seen`: its `attention_mask` is the one its activations have, whatever
the trainer's batch holds) and ask it for its hidden states where the caller built its own keywords. Activations
computed without gradients inside a block with gradients (a stop-gradient branch) are left out; inside reentrant
gradient checkpointing (which runs the checkpointed blocks under `no_grad` and recomputes them in the backward,
unseen) they are an error, since LBE's gradient could not reach the layers before them.

**Choosing the source** needs no forward of its own: `select_capture` decides from the model where it can, and
otherwise (a Transformers model that may or may not return hidden states) records both in the first forward it sees
and keeps one (`CaptureSelection`). So a trainer whose `compute_loss` gets batches that are not model keywords
(prompt and completion ids, advantages) is never re-run on them.

Which positions of the captured activations are real tokens is `tokens.py`'s concern, not this package's. A
functional activation (`F.relu(x)` inside `forward`) has no module to hook: expose it as a module
(`self.act = nn.ReLU()`), or target the layer whose output you want (e.g. the `Linear` before it).

The modules: `base` (the `Capture` interface), `targets` (which modules hooks go on), `watch` (which forward is the
measured one), `hidden_states`, `hooks` with `towers` (which inputs an activation belongs to), and `selection`.
"""

from .base import Capture
from .hidden_states import HiddenStatesCapture, accepts_hidden_states
from .hooks import ForwardHookCapture
from .selection import CaptureSelection, select_capture
from .targets import default_target_modules, resolve_target_modules

__all__ = [
    "Capture",
    "CaptureSelection",
    "ForwardHookCapture",
    "HiddenStatesCapture",
    "accepts_hidden_states",
    "default_target_modules",
    "resolve_target_modules",
    "select_capture",
]
