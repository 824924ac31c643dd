"""Mixed precision: batch-entropies are computed in float32 under bf16 and fp16 (autocast, low-precision activations,
fp16 gradient scaling), an fp16 variance that over- or underflows fp16 stays finite and exact, and a NaN or inf
activation stops training with a clear error instead of a silent NaN loss.

CPU tests run everywhere; the fp16 `Trainer` run (GradScaler) and the CUDA bf16 run need a GPU and are skipped
without one (`scripts/gpu_check.sh` runs them).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hf_batch_entropy.regularizer as regularizer_module
from conftest import TinyMLP, make_args, tiny_bert, token_dataset, vector_dataset
from hf_batch_entropy import BatchEntropyRegularizer, BatchEntropyTrainer, batch_entropies, batch_entropy

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def reference(x: torch.Tensor) -> float:
    """H of the given values, in float64."""
    rows = x.double().reshape(x.shape[0], -1)
    return (0.5 * torch.log1p(math.pi * math.e * rows.var(dim=0))).mean().item()


# --- fp16 values whose variance fp16 cannot hold ---------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
def test_fp16_variance_above_fp16_range(fused):
    g = torch.Generator().manual_seed(0)
    layers = [(torch.randn(32, 64, generator=g) * 300).half().requires_grad_() for _ in range(3)]
    assert torch.isinf((layers[0].float().var(dim=0)).half()).any()  # the variance itself overflows fp16 (> 65504)
    h = batch_entropies(layers, fused=fused)
    assert h.dtype == torch.float32 and torch.isfinite(h).all()
    for value, x in zip(h.tolist(), layers):
        assert value == pytest.approx(reference(x.detach()), rel=1e-5)
    # Gradients: finite, in fp16, and equal to the float64 ones. Scaled up as fp16 training scales the loss, so that
    # the comparison is not of fp16 subnormals.
    (h.sum() * 2.0**16).backward()
    for x in layers:
        x64 = x.detach().double().requires_grad_()
        (0.5 * torch.log1p(math.pi * math.e * x64.var(dim=0)) * 2.0**16 / 64).sum().backward()
        assert x.grad.dtype == torch.float16 and torch.isfinite(x.grad).all()
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("fused", [True, False])
def test_fp16_variance_below_fp16_range(fused):
    # Values ~1e-4: their squared deviations (~1e-8) are below fp16's smallest subnormal (6e-8) and vanish in fp16
    # arithmetic, so an fp16 computation would call these layers dead. In float32 they are not.
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(32, 16, generator=g) * 1e-4).half()
    naive = ((x - x.mean(dim=0)) ** 2).sum(dim=0) / 31
    assert (naive == 0).float().mean() > 0.5
    h = batch_entropies([x, x.clone()], fused=fused)
    assert (h > 0).all()
    assert h[0].item() == pytest.approx(reference(x), rel=1e-4)


def test_fp16_autocast_activations_are_measured_in_float32():
    """A network run under fp16 autocast on CPU: its Linear outputs are fp16 (and large); the regularizer's entropies
    are float32, equal to the float64 values of those fp16 activations, and the whole loss backpropagates finitely."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 32))
    with torch.no_grad():
        net[0].weight.mul_(300)
    reg = BatchEntropyRegularizer(num_layers=2, beta=0.5, alpha=0.8, alpha_min=0.1)
    x = torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.float16):
        h1 = net[0](x)
        h2 = net[1](h1)
        task = h2.float().pow(2).mean() * 1e-6
        assert h1.dtype == h2.dtype == torch.float16
        out = reg([h1, h2], task)
    assert out.entropies.dtype == torch.float32
    assert out.entropies[0].item() == pytest.approx(reference(h1.detach()), rel=1e-5)
    assert out.entropies[1].item() == pytest.approx(reference(h2.detach()), rel=1e-5)
    out.loss.backward()
    grads = [p.grad for p in net.parameters()] + [reg.alpha.grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# --- NaN and inf ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bad", ["nan", "fp16 overflow"])
def test_non_finite_activation_raises(fused, bad):
    layers = [torch.randn(8, 4) for _ in range(3)]
    if bad == "nan":
        layers[1][3, 2] = float("nan")
    else:
        layers = [x.half() for x in layers]
        layers[1][3, 2] = 7e4  # above fp16's maximum: stored as inf
        assert torch.isinf(layers[1]).any()
    reg = BatchEntropyRegularizer(num_layers=3, fused=fused, layer_names=["a", "b", "c"])
    with pytest.raises(FloatingPointError, match=r"NaN or inf for 1 layer\(s\): b\b"):
        reg(layers, torch.tensor(1.0))


def test_trainer_stops_on_a_nan_activation(tmp_path):
    dataset = vector_dataset()
    for row in dataset.rows:
        row["x"] = row["x"].clone()
        row["x"][0] = float("nan")
    trainer = BatchEntropyTrainer(model=TinyMLP(), args=make_args(tmp_path), train_dataset=dataset)
    with pytest.raises(FloatingPointError, match="Batch-entropy is NaN or inf"):
        trainer.train()


# --- Trainer runs in mixed precision ---------------------------------------------------------------------------------


class EntropySpy:
    """Records the dtypes of the activations the regularizer receives and the entropies it computes."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[list[torch.dtype], torch.Tensor]] = []
        real = regularizer_module.batch_entropies

        def spy(activations, **kwargs):
            result = real(activations, **kwargs)
            entropies = result[0] if isinstance(result, tuple) else result  # (entropies, measured) where asked
            self.calls.append(([a.dtype for a in activations], entropies.detach().float().cpu().clone()))
            return result

        monkeypatch.setattr(regularizer_module, "batch_entropies", spy)

    def take(self):
        calls, self.calls = self.calls, []
        return calls


def _train(tmp_path, model_name: str, device: str = "cpu", **precision):
    torch.manual_seed(0)
    if model_name == "mlp":  # forward hooks on Tanh modules: the activations arrive in the autocast dtype
        model, dataset = TinyMLP(depth=4, width=32), vector_dataset()
    else:  # hidden_states (Accelerate hands model outputs back in float32)
        model, dataset = tiny_bert(), token_dataset()
    args = make_args(
        tmp_path,
        use_cpu=device == "cpu",
        max_steps=4,
        logging_steps=1,
        learning_rate=1e-2,
        lbe_alpha=0.8,
        lbe_alpha_min=0.1,
        **precision,
    )
    trainer = BatchEntropyTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    return trainer


def _compare(spy, tmp_path, model_name, device, low, expect_dtype):
    _train(tmp_path / "fp32", model_name, device)
    fp32 = spy.take()
    trainer = _train(tmp_path / "low", model_name, device, **low)
    mixed = spy.take()
    assert len(fp32) == len(mixed) == 4
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    diffs = []
    for (dtypes32, h32), (dtypes_low, h_low) in zip(fp32, mixed):
        assert set(dtypes32) == {torch.float32}
        assert expect_dtype in dtypes_low, dtypes_low
        assert torch.isfinite(h_low).all()
        diffs.append((h_low - h32).abs().max().item())
    assert max(diffs) < 1e-2, diffs
    assert max(diffs) > 0, "the low-precision run computed exactly the float32 numbers: was autocast on?"
    return trainer


@pytest.mark.parametrize("model_name", ["mlp", "bert"])
def test_bf16_autocast_cpu_run_matches_float32(tmp_path, monkeypatch, model_name):
    spy = EntropySpy(monkeypatch)
    _compare(spy, tmp_path, model_name, "cpu", {"bf16": True}, torch.bfloat16 if model_name == "mlp" else torch.float32)


@cuda
@pytest.mark.parametrize("model_name", ["mlp", "bert"])
def test_bf16_cuda_run_matches_float32(tmp_path, monkeypatch, model_name):
    spy = EntropySpy(monkeypatch)
    _compare(spy, tmp_path, model_name, "cuda", {"bf16": True}, torch.bfloat16 if model_name == "mlp" else torch.float32)


@cuda
@pytest.mark.parametrize("model_name", ["mlp", "bert"])
def test_fp16_cuda_run_with_gradient_scaling_matches_float32(tmp_path, monkeypatch, model_name):
    spy = EntropySpy(monkeypatch)
    trainer = _compare(
        spy, tmp_path, model_name, "cuda", {"fp16": True}, torch.float16 if model_name == "mlp" else torch.float32
    )
    assert trainer.accelerator.scaler is not None  # fp16 trains with a GradScaler
    assert torch.isfinite(trainer.regularizer.alpha).all()


@cuda
def test_fp16_cuda_large_activations_stay_finite(tmp_path, monkeypatch):
    """Tanh inputs scaled so that the first layer's pre-activations (fp16) are in the hundreds: finite entropies and a
    finite, trained α; where fp16 overflows (inf), the FloatingPointError would say so."""
    spy = EntropySpy(monkeypatch)
    torch.manual_seed(0)
    model = TinyMLP(depth=3, width=32)
    with torch.no_grad():
        model.stem.weight.mul_(300)
    args = make_args(tmp_path, use_cpu=False, fp16=True, max_steps=3, lbe_target_modules=["stem", "blocks.0.0"])
    trainer = BatchEntropyTrainer(model=model, args=args, train_dataset=vector_dataset())
    trainer.train()
    calls = spy.take()
    assert calls and all(torch.float16 in dtypes for dtypes, _ in calls)
    assert all(torch.isfinite(h).all() for _, h in calls)
    assert torch.isfinite(trainer.regularizer.alpha).all()


def test_batch_entropy_under_fp16_autocast_is_float32():
    x = (torch.randn(16, 8) * 300).half()
    with torch.autocast("cpu", dtype=torch.float16):
        h = batch_entropy(x)
        hs = batch_entropies([x, x])
    assert h.dtype == hs.dtype == torch.float32
    assert h.item() == pytest.approx(reference(x), rel=1e-5)
    torch.testing.assert_close(hs, torch.stack([h, h]))
