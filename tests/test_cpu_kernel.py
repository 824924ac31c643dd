"""The compiled CPU kernel of the estimator (`hf_batch_entropy.cpu_kernel`): bit-identical to PyTorch's operators in
values and gradients (so results do not depend on which path ran), taken only where it knows ATen's summation order,
and a clean fallback where it cannot be built or is turned off."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import TinyMLP, make_args, vector_dataset
from hf_batch_entropy import BatchEntropyTrainer, batch_entropies, cpu_kernel


def _kernel_available() -> bool:
    return cpu_kernel.handles([torch.zeros(2, 8)], None)


needs_kernel = pytest.mark.skipif(
    not _kernel_available(),
    reason="no CPU kernel here (no C++ compiler or ninja, not x86-64, or ATen's AVX-512 kernels)",
)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the chunks the kernel computes (forward) and differentiates (backward)."""
    calls = {"forward": 0, "backward": 0}
    forward, backward = cpu_kernel.squared_deviations, cpu_kernel.squared_deviations_backward

    def counted_forward(*args, **kwargs):
        calls["forward"] += 1
        return forward(*args, **kwargs)

    def counted_backward(*args, **kwargs):
        calls["backward"] += 1
        return backward(*args, **kwargs)

    monkeypatch.setattr(cpu_kernel, "squared_deviations", counted_forward)
    monkeypatch.setattr(cpu_kernel, "squared_deviations_backward", counted_backward)
    return calls


@pytest.fixture
def fresh_state(monkeypatch):
    """The kernel's load state as in a new process (restored afterwards)."""
    monkeypatch.setattr(cpu_kernel, "_state", {})


def _operators_only(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "handles", lambda layers, mask: False)


def _layers(batch: int, units: int, count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, units, generator=g) * torch.rand(units, generator=g) * 3
             + torch.randn(units, generator=g) * 20).requires_grad_() for _ in range(count)]


def _values_and_gradients(layers: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    layers = [x.detach().clone().requires_grad_() for x in layers]
    entropies = batch_entropies(layers)
    weights = torch.randn(len(layers), generator=torch.Generator().manual_seed(1))
    (entropies * weights).sum().backward()
    return entropies.detach(), [x.grad for x in layers]


# Batches that exercise every level of ATen's cascade (16 rows, 256, 4096) and its leftovers; widths with and without
# leftover columns (U mod 32), and narrower than one vector.
SHAPES = [(2, 8), (3, 5), (17, 2), (16, 33), (100, 1000), (257, 64), (4100, 9), (31, 40), (64, 256)]


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("batch", "units"), SHAPES, ids=[f"B{b}-U{u}" for b, u in SHAPES])
def test_values_and_gradients_are_bit_identical_to_the_operators(monkeypatch, kernel_calls, threads, batch, units):
    torch.set_num_threads(threads)  # restored by conftest
    layers = _layers(batch, units, 5, seed=batch * 1000 + units)
    got, got_grads = _values_and_gradients(layers)
    assert kernel_calls["forward"] >= 1 and kernel_calls["backward"] >= 1  # the kernel ran
    assert cpu_kernel.status() == "compiled"
    _operators_only(monkeypatch)
    want, want_grads = _values_and_gradients(layers)
    assert torch.equal(got, want)
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert torch.equal(a, b), f"gradient of layer {i}"


@needs_kernel
def test_a_given_mean_gives_the_operators_squares():
    """Across processes the mean is the global one, given to the chunk: the squared deviations from it."""
    layers = [x.detach() for x in _layers(40, 48, 3, seed=3)]
    mean = torch.randn(3, 1, 48, generator=torch.Generator().manual_seed(4)) * 20
    squares, returned = cpu_kernel.squared_deviations(layers, mean)
    assert returned is mean
    stacked = torch.stack(layers)
    assert torch.equal(squares, (stacked - mean).square().sum(dim=1))


@needs_kernel
def test_training_is_bit_identical_with_and_without_the_kernel(tmp_path, monkeypatch, kernel_calls):
    def train(directory):
        torch.manual_seed(0)
        trainer = BatchEntropyTrainer(model=TinyMLP(depth=6, width=32), train_dataset=vector_dataset(),
                                      args=make_args(directory, max_steps=3, learning_rate=1e-2, lbe_alpha=0.8))
        trainer.train()
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, trainer.regularizer.alpha.detach()

    with_kernel, alpha = train(tmp_path / "kernel")
    assert kernel_calls["forward"] > 0 and kernel_calls["backward"] > 0
    _operators_only(monkeypatch)
    with_operators, alpha_operators = train(tmp_path / "operators")
    assert torch.equal(alpha, alpha_operators)
    for name in with_kernel:
        assert torch.equal(with_kernel[name], with_operators[name]), name


@needs_kernel
def test_chunks_it_does_not_know_take_the_operators(kernel_calls):
    g = torch.Generator().manual_seed(0)
    plain = torch.randn(8, 16, generator=g)
    assert cpu_kernel.handles([plain, plain], None)
    assert not cpu_kernel.handles([plain], torch.ones(8, 16))  # masked
    assert not cpu_kernel.handles([plain.bfloat16()], None)  # another dtype
    assert not cpu_kernel.handles([torch.randn(8, 1, generator=g)], None)  # one unit: ATen sums it as a row
    assert not cpu_kernel.handles([plain, torch.randn(16, 8, generator=g).t()], None)  # not contiguous
    assert not cpu_kernel.handles([torch.randn(8, 4, 4, generator=g)], None)  # not (B, U)
    assert not cpu_kernel.handles([torch.nn.Parameter(plain)], None)  # a subclass
    masks = [torch.ones(8, 4, dtype=torch.long)] * 2
    batch_entropies([torch.randn(8, 4, 3, generator=g) for _ in range(2)], masks=masks)
    assert kernel_calls["forward"] == 0


def test_aten_kernels_of_another_width_take_the_operators(monkeypatch, fresh_state):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(cpu_kernel, "_build", lambda: pytest.fail("must not compile for AVX-512 kernels"))
    assert not cpu_kernel.handles([torch.randn(8, 16)], None)
    assert cpu_kernel.status() == "operators: ATen's AVX512 kernels (another summation order)"


def test_a_failed_build_falls_back_to_the_operators_with_one_warning(monkeypatch, fresh_state):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpu_kernel, "_eight_lane_aten", lambda: True)
    layers = _layers(8, 16, 3, seed=0)
    with pytest.warns(RuntimeWarning, match="could not compile its CPU kernel.*Ninja is required.*pip install ninja"):
        got = batch_entropies(layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tried once: no second warning, no second attempt
        again = batch_entropies(layers)
    assert torch.equal(got, again)
    assert cpu_kernel.status() == ("operators: the kernel could not be built "
                                   "(RuntimeError: Ninja is required to load C++ extensions)")
    torch.testing.assert_close(got, batch_entropies(layers, fused=False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_the_environment_variable_turns_it_off(monkeypatch, fresh_state, value):
    monkeypatch.setenv(cpu_kernel.ENV_VAR, value)
    monkeypatch.setattr(cpu_kernel, "_build", lambda: pytest.fail("must not compile when turned off"))
    monkeypatch.setattr(cpu_kernel, "_eight_lane_aten", lambda: True)
    assert not cpu_kernel.handles([torch.randn(8, 16)], None)
    assert cpu_kernel.status() == "operators: turned off (HF_BATCH_ENTROPY_CPU_KERNEL)"


def test_a_bad_environment_value_names_the_variable(monkeypatch, fresh_state):
    monkeypatch.setenv(cpu_kernel.ENV_VAR, "maybe")
    monkeypatch.setattr(cpu_kernel, "_eight_lane_aten", lambda: True)
    with pytest.raises(ValueError, match="HF_BATCH_ENTROPY_CPU_KERNEL='maybe'.*use 1.*or 0"):
        cpu_kernel.handles([torch.randn(8, 16)], None)


def test_the_per_layer_path_is_unchanged_by_the_kernel(monkeypatch):
    """The operators' own path (kept for masks, other dtypes and hosts) still matches the reference."""
    _operators_only(monkeypatch)
    layers = _layers(16, 24, 4, seed=5)
    torch.testing.assert_close(batch_entropies(layers), batch_entropies(layers, fused=False), atol=1e-5, rtol=1e-5)
