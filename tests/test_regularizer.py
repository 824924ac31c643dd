"""The LBE loss and its state."""

import pytest
import torch

from hf_batch_entropy import BatchEntropyRegularizer, batch_entropies


def layers(seed=0, n=3):
    torch.manual_seed(seed)
    return [(torch.randn(8, 5) * (i + 1) * 0.3).requires_grad_() for i in range(n)]


def test_loss_is_the_paper_formula():
    reg = BatchEntropyRegularizer(3, beta=0.5, alpha=0.5, alpha_min=0.2)
    with torch.no_grad():
        reg.alpha.copy_(torch.tensor([0.1, -0.8, 1.5]))
    xs = layers()
    task = torch.tensor(2.0, requires_grad=True)
    out = reg(xs, task)
    h = batch_entropies(xs)
    targets = torch.tensor([0.2, 0.8, 1.5])  # max(α_min, |α|)
    lbe = (h - targets) ** 2
    torch.testing.assert_close(out.entropies, h)
    torch.testing.assert_close(out.targets, targets)
    torch.testing.assert_close(out.lbe_per_layer, lbe)
    torch.testing.assert_close(out.loss, task + 0.5 * lbe.mean() * task)
    torch.testing.assert_close(out.lbe_loss, 0.5 * lbe.mean() * task)


def test_alpha_is_pulled_towards_the_entropy():
    xs = layers()
    reg = BatchEntropyRegularizer(3, beta=1.0, alpha=3.0, alpha_min=0.0)
    reg(xs, torch.tensor(1.0)).loss.backward()
    # Every H_l < 3 = α_l, so descending the loss lowers every α_l.
    assert (reg.alpha.grad > 0).all()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in xs)


def test_beta_zero_leaves_the_loss_alone():
    reg = BatchEntropyRegularizer(3, beta=0.0)
    task = torch.tensor(1.7, requires_grad=True)
    out = reg(layers(), task)
    assert out.loss is task
    assert out.lbe_loss.item() == 0.0
    assert out.entropies.shape == (3,)


def test_layer_count_change_is_an_error():
    reg = BatchEntropyRegularizer(3)
    with pytest.raises(ValueError, match="same layers at every step"):
        reg(layers(n=2), torch.tensor(1.0))


def test_non_finite_activations_are_an_error():
    reg = BatchEntropyRegularizer(3, layer_names=["emb", "l1", "l2"])
    xs = layers()
    xs[1] = xs[1].detach().clone()
    xs[1][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="l1"):
        reg(xs, torch.tensor(1.0))
    xs[1][0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        reg(xs, torch.tensor(1.0))


def test_save_and_load_roundtrip(tmp_path):
    reg = BatchEntropyRegularizer(4, beta=0.3, alpha=0.7, alpha_min=0.1, layer_names=list("abcd"))
    with torch.no_grad():
        reg.alpha.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    reg.save_pretrained(tmp_path)
    loaded = BatchEntropyRegularizer.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.alpha, reg.alpha)
    assert loaded.settings() == reg.settings()
    with pytest.raises(ValueError, match="has 4 layers"):
        BatchEntropyRegularizer(3).load_alpha(tmp_path)
    with pytest.raises(FileNotFoundError, match="BatchEntropyTrainer"):
        BatchEntropyRegularizer.read_settings(tmp_path / "nothing")


def test_constructor_validates():
    with pytest.raises(ValueError, match="at least one layer"):
        BatchEntropyRegularizer(0)
    with pytest.raises(ValueError, match="layer names"):
        BatchEntropyRegularizer(2, layer_names=["a"])
