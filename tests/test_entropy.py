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


# --- padding ------------------------------------------------------------------------------------------------------


def masked_reference(x: torch.Tensor, mask: torch.Tensor) -> float:
    """The masked formula, by hand: per position t the examples with a real token there; positions with < 2 left out."""
    x, mask = x.double(), mask.bool()
    values = []
    for t in range(x.shape[1]):
        if int(mask[:, t].sum()) < 2:
            continue
        rows = x[mask[:, t], t].reshape(int(mask[:, t].sum()), -1)
        for u in range(rows.shape[1]):
            col = rows[:, u].tolist()
            mean = sum(col) / len(col)
            var = sum((v - mean) ** 2 for v in col) / (len(col) - 1)
            values.append(0.5 * math.log(math.pi * math.e * var + 1))
    return sum(values) / len(values)


def _ragged(seed: int = 0):
    """4 sequences (lengths 8, 6, 3, 1) of 5 units, right-padded to 10 with garbage, and their mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 10, 5, generator=g) * torch.linspace(0.2, 3.0, 5)
    lengths = [8, 6, 3, 1]
    mask = torch.zeros(4, 10, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    x = torch.where(mask.bool()[..., None], x, torch.full_like(x, 1e3))  # padding: large, constant values
    return x, mask


@pytest.mark.parametrize("fused", [True, False])
def test_masked_estimator_matches_the_formula(fused):
    x, mask = _ragged()
    assert batch_entropy(x, mask).item() == pytest.approx(masked_reference(x, mask), rel=1e-6)
    h = batch_entropies([x, x * 0.5, x[:, :, :3]], fused=fused, masks=[mask, mask, mask])
    for value, layer in zip(h.tolist(), [x, x * 0.5, x[:, :, :3]]):
        assert value == pytest.approx(masked_reference(layer, mask), rel=1e-5)


def _pad(x: torch.Tensor, to: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    b, t, d = x.shape
    garbage = torch.randn(b, to - t, d, generator=torch.Generator().manual_seed(1)) * 50
    ones, zeros = torch.ones(b, t, dtype=torch.long), torch.zeros(b, to - t, dtype=torch.long)
    if side == "right":
        return torch.cat([x, garbage], 1), torch.cat([ones, zeros], 1)
    return torch.cat([garbage, x], 1), torch.cat([zeros, ones], 1)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("fused", [True, False])
def test_padding_does_not_change_the_entropies_or_the_lbe_loss(side, fused):
    from hf_batch_entropy import BatchEntropyRegularizer

    torch.manual_seed(0)
    layers = [(torch.randn(4, 8, 6) * (i + 1) * 0.4).requires_grad_() for i in range(3)]
    padded = [_pad(x.detach(), 16, side) for x in layers]
    padded_layers = [p.requires_grad_() for p, _ in padded]
    masks = [m for _, m in padded]
    reg = BatchEntropyRegularizer(3, beta=0.5, alpha=1.0, alpha_min=0.2, fused=fused)
    task = torch.tensor(1.3)
    plain, masked = reg(layers, task), reg(padded_layers, task, masks)
    torch.testing.assert_close(masked.entropies, plain.entropies, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked.lbe_loss, plain.lbe_loss, atol=1e-5, rtol=1e-5)
    # The gradients reach the real tokens as without padding, and never the padding.
    plain.loss.backward()
    masked.loss.backward()
    real = slice(0, 8) if side == "right" else slice(8, 16)
    pad = slice(8, 16) if side == "right" else slice(0, 8)
    for x, p in zip(layers, padded_layers):
        torch.testing.assert_close(p.grad[:, real], x.grad, atol=1e-6, rtol=1e-4)
        assert (p.grad[:, pad] == 0).all()
    # Unmasked, padding is counted as information: the paper's code (lbe_ignore_padding=False).
    assert not torch.allclose(reg(padded_layers, task).entropies, plain.entropies, atol=1e-3)


def test_masks_leave_unmasked_layers_unchanged():
    torch.manual_seed(0)
    tokens, image = torch.randn(6, 4, 5), torch.randn(6, 3, 8, 8)
    mask = torch.ones(6, 4, dtype=torch.long)
    mask[0, 3] = 0
    both = batch_entropies([tokens, image], masks=[mask, None])
    assert both[1].item() == batch_entropies([image])[0].item()
    assert both[0].item() == pytest.approx(masked_reference(tokens, mask), rel=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        batch_entropies([image], masks=[mask])
    with pytest.raises(ValueError, match="one per layer"):
        batch_entropies([tokens, image], masks=[mask])


def test_masked_sync_path_matches_the_local_one(monkeypatch):
    """The path that merges statistics across processes, run in a one-process gloo group: with masks it must give
    the local result (per-position counts travel with the sums)."""
    import torch.distributed as dist

    import hf_batch_entropy.entropy.reference as entropy

    x, mask = _ragged()
    layers = [x.clone().requires_grad_(), (x * 0.3).requires_grad_()]
    local = batch_entropies(layers, masks=[mask, mask])
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    try:
        monkeypatch.setattr(entropy, "_sync_active", lambda sync: sync)
        synced = batch_entropies(layers, masks=[mask, mask], sync=True)
        unmasked = batch_entropies(layers, sync=True)
        synced.sum().backward()  # the backward all-reduces too
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(synced, local, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(unmasked, batch_entropies(layers), atol=1e-6, rtol=1e-6)
    reference = [layer.detach().clone().requires_grad_() for layer in layers]
    batch_entropies(reference, masks=[mask, mask]).sum().backward()
    for layer, ref in zip(layers, reference):
        torch.testing.assert_close(layer.grad, ref.grad, atol=1e-6, rtol=1e-5)


# --- masks by selection ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_at_padded_positions_is_harmless(fused, bad):
    x, mask = _ragged()
    dirty = torch.where(mask.bool()[..., None], x, torch.full_like(x, bad))
    layers = [x.clone().requires_grad_(), (x * 0.5).requires_grad_()]
    dirty_layers = [dirty.clone().requires_grad_(), (dirty * 0.5).requires_grad_()]
    clean = batch_entropies(layers, masks=[mask, mask], fused=fused)
    values = batch_entropies(dirty_layers, masks=[mask, mask], fused=fused)
    torch.testing.assert_close(values, clean)
    values.sum().backward()
    clean.sum().backward()
    for d, c in zip(dirty_layers, layers):
        assert torch.isfinite(d.grad).all()
        torch.testing.assert_close(d.grad, c.grad)
    assert torch.isfinite(batch_entropy(dirty, mask))


@pytest.mark.parametrize("fused", [True, False])
def test_a_layer_without_two_real_tokens_at_any_position_is_not_measured_and_never_nan(fused):
    """A batch of two in which one example is empty: no position has two real tokens, so the masked layer has no
    batch-entropy. It is reported as not measured, with value 0 and gradient 0, never NaN; unmasked layers are."""
    x = torch.randn(2, 5, 4, requires_grad=True)
    image = torch.randn(2, 6, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    values, measured = batch_entropies([x, image], masks=[mask, None], fused=fused, return_measured=True)
    assert measured.tolist() == [False, True]
    assert values[0].item() == 0.0 and torch.isfinite(values).all()
    values.sum().backward()
    assert (x.grad == 0).all() and torch.isfinite(image.grad).all()
    assert batch_entropy(x, mask).item() == 0.0
    full = torch.ones(2, 5, dtype=torch.long)
    assert batch_entropies([x], masks=[full], return_measured=True)[1].tolist() == [True]
    assert batch_entropies([x], return_measured=True)[1] is None  # no mask: every layer is measured


def test_the_measurable_rule_is_one_function(monkeypatch):
    """`is_measurable` decides for the estimator (and the trainer): 2 examples, or any number where pooled."""
    import hf_batch_entropy.entropy.reference as entropy

    assert entropy.is_measurable(2, sync=False) and not entropy.is_measurable(1, sync=True)
    with pytest.raises(ValueError, match="at least 2 examples"):
        batch_entropies([torch.randn(1, 3)])
    monkeypatch.setattr(entropy, "is_measurable", lambda batch_size, sync: False)
    with pytest.raises(ValueError, match="at least 2 examples"):  # the estimator asks the rule, it keeps none of its own
        batch_entropy(torch.randn(5, 3))
