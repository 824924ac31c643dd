"""The estimator against the formula, written out by hand."""

import math

import pytest
import torch

from hf_batch_entropy import batch_entropies, batch_entropy
from hf_batch_entropy.entropy import entropy_from_variance


def reference(x: torch.Tensor) -> float:
    """H = mean_u ½·ln(π·e·σ_u² + 1), σ_u the unbiased std over the batch, in float64 and plain Python."""
    rows = x.double().reshape(x.shape[0], -1)
    b = rows.shape[0]
    total = 0.0
    for u in range(rows.shape[1]):
        col = rows[:, u].tolist()
        mean = sum(col) / b
        var = sum((v - mean) ** 2 for v in col) / (b - 1)
        total += 0.5 * math.log(math.pi * math.e * var + 1)
    return total / rows.shape[1]


def test_matches_formula_on_random_activations():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 5) * torch.linspace(0.1, 4.0, 15).reshape(3, 5)
    assert batch_entropy(x).item() == pytest.approx(reference(x), rel=1e-6)


def test_known_values():
    # Two examples ±1: σ² = 2 for every unit, so H = ½·ln(2πe + 1).
    x = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    assert batch_entropy(x).item() == pytest.approx(0.5 * math.log(2 * math.pi * math.e + 1), rel=1e-6)
    # A constant layer carries no information: H = 0 exactly, and its gradient is finite.
    dead = torch.zeros(8, 4, requires_grad=True)
    h = batch_entropy(dead)
    h.backward()
    assert h.item() == 0.0
    assert torch.isfinite(dead.grad).all()


def test_float32_whatever_the_input_dtype():
    torch.manual_seed(0)
    x = torch.randn(32, 64) * 300  # variance 9e4 overflows fp16 (max 65504)
    for dtype in (torch.float16, torch.bfloat16):
        h = batch_entropy(x.to(dtype))
        assert h.dtype == torch.float32
        assert torch.isfinite(h)
        assert h.item() == pytest.approx(reference(x.to(dtype)), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert batch_entropy(x).dtype == torch.float32
        assert batch_entropy(x).item() == pytest.approx(reference(x), rel=1e-6)


def test_gradient_matches_autograd_of_the_formula():
    torch.manual_seed(0)
    x = torch.randn(8, 6, requires_grad=True)
    batch_entropy(x).backward()
    x2 = x.detach().clone().requires_grad_()
    (0.5 * torch.log(math.pi * math.e * x2.std(dim=0) ** 2 + 1)).mean().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_batch_of_one_is_an_error():
    with pytest.raises(ValueError, match="at least 2 examples"):
        batch_entropy(torch.randn(1, 4))
    with pytest.raises(ValueError, match="at least 2 examples"):
        batch_entropies([torch.randn(4, 3), torch.randn(1, 3)])


def test_batch_entropies_match_per_layer_reference():
    torch.manual_seed(0)
    xs = [torch.randn(8, 4) * s for s in (0.1, 1.0, 3.0)] + [torch.randn(8, 2, 3)]
    expected = torch.tensor([reference(x) for x in xs], dtype=torch.float32)
    torch.testing.assert_close(batch_entropies(xs), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(batch_entropies(xs, fused=False), expected, rtol=1e-6, atol=1e-6)


def test_entropy_from_variance_is_the_formula():
    var = torch.tensor([0.0, 1.0, 10.0])
    expected = 0.5 * torch.log(math.pi * math.e * var + 1)
    torch.testing.assert_close(entropy_from_variance(var), expected)


def test_mismatched_batch_sizes_and_empty_input_are_errors():
    with pytest.raises(ValueError, match="batch dimension"):
        batch_entropies([torch.randn(4, 3), torch.randn(6, 3)])
    with pytest.raises(ValueError, match="no activations"):
        batch_entropies([])
