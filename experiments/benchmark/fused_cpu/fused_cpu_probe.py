"""What a fused CPU kernel for the estimator would buy: `scripts/benchmark.py` with the fused path's float32 CPU
passes replaced by small C++ loops, compiled on the spot. The research probe that preceded the package's own kernel
(`hf_batch_entropy/cpu_kernel.py`, which rounds as PyTorch's operators do); kept for its `--in_place` variant. It
needs a C++ compiler and `ninja`, and it is not bit-identical to the estimator (its sums run in another order).

    python experiments/benchmark/fused_cpu_probe.py [--in_place] --cases mlp256 --steps 5 --warmup 2 --rounds 8 \
        --memory_steps 2 --memory_repeats 3 --output experiments/benchmark/results/zen2_default_threads_fused_probe.json

Every argument but `--in_place` goes to `scripts/benchmark.py`; the JSON's note says the probe ran. What is replaced,
for a chunk of unmasked float32 layers `(B, U)` on the CPU (anything else takes the package's own code):

- forward: per layer, the batch mean and `Σ_b (x − μ)²` in two passes over the layer (the second from the cache),
  the layers split over the threads (`at::parallel_for`), with no stacked copy;
- backward: every layer's gradient `2·(x − μ)·grad` in one call, the layers split over the threads, into fresh
  tensors (the package's own backward loop, `cpu_kernel.squared_deviations_backward`, the same arithmetic as the
  probe's first runs); autograd still adds each to the model's own gradient (one `add_` per layer);
- backward with `--in_place`: no gradient for the layers from the estimator's node; a pre-hook on each layer's own
  autograd node adds `2·(x − μ)·grad` into the model's gradient of that layer, in place. Safe here only because the
  benchmark's MLP hands every layer a fresh gradient of its own (a residual block's addition passes one tensor to two
  branches, which this would corrupt).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>

// Per layer l of L float32 (B, U) tensors: mean[l] = Σ_b x / B and squares[l] = Σ_b (x − mean)², each (U,).
std::vector<at::Tensor> squared_deviations(const std::vector<at::Tensor>& layers) {
  const int64_t L = layers.size(), B = layers[0].size(0), U = layers[0].size(1);
  auto squares = at::empty({L, U}, layers[0].options());
  auto means = at::empty({L, 1, U}, layers[0].options());
  std::vector<const float*> x(L);
  for (int64_t l = 0; l < L; ++l) x[l] = layers[l].data_ptr<float>();
  float* sq = squares.data_ptr<float>();
  float* mu = means.data_ptr<float>();
  at::parallel_for(0, L, 1, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      const float* xl = x[l];
      float* m = mu + l * U;
      float* s = sq + l * U;
      for (int64_t u = 0; u < U; ++u) { m[u] = 0.f; s[u] = 0.f; }
      for (int64_t b = 0; b < B; ++b) {
        const float* row = xl + b * U;
        for (int64_t u = 0; u < U; ++u) m[u] += row[u];
      }
      for (int64_t u = 0; u < U; ++u) m[u] /= static_cast<float>(B);
      for (int64_t b = 0; b < B; ++b) {
        const float* row = xl + b * U;
        for (int64_t u = 0; u < U; ++u) { const float d = row[u] - m[u]; s[u] += d * d; }
      }
    }
  });
  return {squares, means};
}

// grad += 2·(x − mean[l])·g[l], in place: layer l's term added into the model's gradient of that layer, (B, U).
void add_squared_deviations_grad_(at::Tensor grad, const at::Tensor& x, const at::Tensor& means, const at::Tensor& g,
                                  int64_t l) {
  const int64_t B = x.size(0), U = x.size(1);
  float* y = grad.data_ptr<float>();
  const float* xl = x.data_ptr<float>();
  const float* m = means.data_ptr<float>() + l * U;
  const float* gl = g.data_ptr<float>() + l * U;
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* row = xl + b * U;
      float* o = y + b * U;
      for (int64_t u = 0; u < U; ++u) o[u] += (row[u] - m[u]) * (2.f * gl[u]);
    }
  });
}
"""


def _load_kernels():
    from torch.utils.cpp_extension import load_inline

    # -O3 without -march: the loops are vectorized for the x86-64 baseline, the same on every kernel set the
    # benchmark is run with.
    return load_inline(
        name="lbe_fused_cpu_probe",
        cpp_sources=_SOURCE,
        functions=["squared_deviations", "add_squared_deviations_grad_"],
        extra_cflags=["-O3"],
        verbose=False,
    )


def install(in_place: bool = False) -> Callable[[], None]:
    """Route the fused path's unmasked float32 CPU chunks through the C++ loops. `in_place`: the backward returns no
    gradient for the layers; a pre-hook on each layer's autograd node adds its term into the model's gradient there.
    Returns a function that puts the package's own code back; its `calls` counts the chunks the C++ loops computed
    (`forward`) and differentiated (`backward`), so a caller can tell they ran."""
    import torch

    from hf_batch_entropy import cpu_kernel, entropy

    kernels = _load_kernels()
    if cpu_kernel._module() is None:  # its backward is the package's own
        raise RuntimeError(f"fused_cpu_probe needs the package's CPU kernel: {cpu_kernel.status()}")
    original_forward = entropy._SquaredDeviations.forward
    original_backward = entropy._SquaredDeviations.backward
    original_plain = entropy._chunk_squared_deviations
    # As the class holds them (staticmethod objects), so that restoring them does not turn them into methods.
    held = {name: vars(entropy._SquaredDeviations)[name] for name in ("forward", "backward")}
    calls = {"forward": 0, "backward": 0}

    def handled(mean, layers, mask) -> bool:
        return (mean is None and mask is None and layers[0].device.type == "cpu"
                and all(x.dtype == torch.float32 and x.dim() == 2 and x.is_contiguous() for x in layers))

    def plain(mean, layers, mask, workspace, kernel):
        if not handled(mean, layers, mask):
            return original_plain(mean, layers, mask, workspace, kernel)
        return tuple(kernels.squared_deviations(list(layers)))

    def add_term(box: dict, index: int, grad_outputs):
        # The engine runs this node after the estimator's (the estimator's node is one of its inputs' consumers), so
        # the box is filled. Only for the probe: the incoming gradient is assumed to be the model's own fresh tensor.
        layers, means, grad = box["backward"]
        model_grad = grad_outputs[0]
        if model_grad is None or not model_grad.is_contiguous():
            raise RuntimeError("fused_cpu_probe --in_place needs a contiguous gradient from the model for every layer")
        kernels.add_squared_deviations_grad_(model_grad, layers[index], means, grad, index)
        box["left"] -= 1
        if box["left"] == 0:
            # The box, reached from the layers' nodes through these hooks, holds the layers: emptied, it no longer
            # closes a reference cycle that would keep the step's graph alive until Python's garbage collector runs.
            box.clear()
        return None

    def forward(ctx, mean, mask, workspace, kernel, *layers):
        if not handled(mean, layers, mask):
            ctx.probe = False
            return original_forward(ctx, mean, mask, workspace, kernel, *layers)
        ctx.probe = True
        calls["forward"] += 1
        squares, means = kernels.squared_deviations(list(layers))
        ctx.save_for_backward(means, *layers)
        if in_place:
            ctx.box = {}
            for index, x in enumerate(layers):
                x.grad_fn.register_prehook(functools.partial(add_term, ctx.box, index))
        return squares

    def backward(ctx, grad):
        if not ctx.probe:
            return original_backward(ctx, grad)
        means, *layers = ctx.saved_tensors
        calls["backward"] += 1
        if in_place:
            ctx.box["backward"] = (layers, means, grad.contiguous())
            ctx.box["left"] = len(layers)
            return (None, None, None, None, *([None] * len(layers)))
        # The package's backward loop: the same arithmetic as the probe's (x − μ)·2g, into fresh tensors.
        return (None, None, None, None, *cpu_kernel.squared_deviations_backward(layers, grad, means))

    def restore() -> None:
        entropy._chunk_squared_deviations = original_plain
        for name, method in held.items():
            setattr(entropy._SquaredDeviations, name, method)

    restore.calls = calls
    entropy._chunk_squared_deviations = plain
    entropy._SquaredDeviations.forward = staticmethod(forward)
    entropy._SquaredDeviations.backward = staticmethod(backward)
    return restore


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    in_place = "--in_place" in argv
    if in_place:
        argv.remove("--in_place")
    install(in_place)
    from experiments.benchmark.cli import main as benchmark_main

    note = ("fused CPU probe: experiments/benchmark/fused_cpu_probe.py (C++ forward and backward loops"
            + (", the backward's term added in place into the model's gradient)" if in_place else ")"))
    if "--note" in argv:
        i = argv.index("--note")
        argv[i + 1] = f"{note}; {argv[i + 1]}"
    else:
        argv += ["--note", note]
    benchmark_main(argv)


if __name__ == "__main__":
    main()
