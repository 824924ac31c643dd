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
    assert loaded.optimizer is None  # none was configured, none is saved
    with pytest.raises(FileNotFoundError, match="BatchEntropyTrainer"):
        BatchEntropyRegularizer.read_settings(tmp_path / "nothing")


def test_settings_use_the_config_field_names(tmp_path):
    from hf_batch_entropy import BatchEntropyConfig

    reg = BatchEntropyRegularizer(2, beta=0.3, alpha=0.7, alpha_min=0.1)
    config = BatchEntropyConfig(output_dir=str(tmp_path), lbe_beta=0.3, lbe_alpha=0.7, lbe_alpha_min=0.1)
    lbe_keys = {k: v for k, v in reg.settings().items() if k.startswith("lbe_")}
    assert lbe_keys and lbe_keys.items() <= config.lbe_settings.items()


def test_checkpoint_of_other_layers_is_a_clear_error(tmp_path):
    BatchEntropyRegularizer(3, layer_names=["emb", "l1", "l2"]).save_pretrained(tmp_path)
    # Same count, other layers: loading α would shuffle the targets silently.
    with pytest.raises(ValueError, match=r"other layers(.|\n)*\['emb', 'l1', 'l2'\](.|\n)*\['act0', 'act1', 'act2'\]"):
        BatchEntropyRegularizer(3, layer_names=["act0", "act1", "act2"]).load_state(tmp_path)
    with pytest.raises(ValueError, match="other layers"):
        BatchEntropyRegularizer(2, layer_names=["emb", "l1"]).load_state(tmp_path)


def test_alpha_optimizer_is_adamw_with_a_scaled_learning_rate():
    xs = layers()
    reg = BatchEntropyRegularizer(3, beta=1.0, alpha=3.0, alpha_min=0.0)
    reg.configure_optimizer(lr=0.1, betas=(0.8, 0.9), eps=1e-6)
    twin = torch.nn.Parameter(reg.alpha.detach().clone())
    reference = torch.optim.AdamW([twin], lr=0.1 * 0.25, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.0)
    for _ in range(3):
        reg(xs, torch.tensor(1.0)).loss.backward(retain_graph=True)
        twin.grad = reg.alpha.grad.clone()
        reg.step(lr_factor=0.25)
        reference.step()
        assert reg.alpha.grad is None  # cleared after every step
    torch.testing.assert_close(reg.alpha, twin, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="configure_optimizer"):
        BatchEntropyRegularizer(3).step()


def test_alpha_optimizer_state_travels_with_the_files(tmp_path):
    xs = layers()
    reg = BatchEntropyRegularizer(3, beta=1.0, alpha=3.0, alpha_min=0.0, layer_names=["a", "b", "c"])
    reg.configure_optimizer(lr=0.1)
    for _ in range(2):
        reg(xs, torch.tensor(1.0)).loss.backward(retain_graph=True)
        reg.step()
    reg.save_pretrained(tmp_path)
    loaded = BatchEntropyRegularizer.from_pretrained(tmp_path)
    assert loaded.settings() == reg.settings() and loaded.settings()["optimizer"]["lr"] == 0.1
    for key in ("exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(loaded.optimizer.state[loaded.alpha][key], reg.optimizer.state[reg.alpha][key])
    # The next step of the restored regularizer is the next step of the original one.
    for r in (reg, loaded):
        r(xs, torch.tensor(1.0)).loss.backward(retain_graph=True)
        r.step()
    torch.testing.assert_close(loaded.alpha, reg.alpha, rtol=0, atol=0)


def test_non_finite_settings_are_rejected():
    for kwargs in ({"beta": float("nan")}, {"alpha": float("inf")}, {"alpha_min": float("nan")}):
        with pytest.raises(ValueError, match="finite"):
            BatchEntropyRegularizer(2, **kwargs)


def test_unchecked_regularizer_reads_nothing_on_the_host(monkeypatch):
    reg = BatchEntropyRegularizer(3, check_finite=False)
    xs = layers()
    xs[1] = xs[1].detach().clone()
    xs[1][0, 0] = float("nan")

    def forbidden(*args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = reg(xs, torch.tensor(1.0))  # no error, no synchronization: the caller checks the entropies later
    monkeypatch.undo()
    assert torch.isnan(out.entropies[1]) and torch.isfinite(out.entropies[[0, 2]]).all()


def test_constructor_validates():
    with pytest.raises(ValueError, match="at least one layer"):
        BatchEntropyRegularizer(0)
    with pytest.raises(ValueError, match="layer names"):
        BatchEntropyRegularizer(2, layer_names=["a"])


@pytest.mark.parametrize(
    ("field", "value"),
    [("beta", -1.0), ("alpha_min", -0.5), ("alpha", float("nan")), ("beta", float("inf")),
     ("alpha_learning_rate", -1e-3), ("alpha_learning_rate", float("nan")), ("alpha", -3.0), ("beta", 0.0)],
)
def test_the_config_validates_with_the_regularizers_rule(tmp_path, field, value):
    """One rule for the lbe_* numbers: the config rejects exactly what the regularizer rejects, with the same message
    under the config's field name."""
    from hf_batch_entropy import BatchEntropyConfig

    def regularizer_error():
        try:
            if field == "alpha_learning_rate":
                BatchEntropyRegularizer(2).configure_optimizer(lr=value)
            else:
                BatchEntropyRegularizer(2, **{field: value})
        except ValueError as err:
            return str(err)
        return None

    def config_error():
        try:
            BatchEntropyConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **{f"lbe_{field}": value})
        except ValueError as err:
            return str(err)
        return None

    expected = regularizer_error()
    assert config_error() == (None if expected is None else "lbe_" + expected)
    assert (expected is None) == (field == "alpha" and value == -3.0 or value == 0.0)


@pytest.mark.parametrize("task_loss", [2.0, -2.0, -1e-3])
def test_negative_task_loss_still_pulls_each_entropy_towards_its_target(task_loss):
    """Scaled by the task loss, the term's value is the paper's `β·mean(lbe)·L_task` for every sign, but its gradient
    with respect to the entropies is weighted by `|L_task|`: a step down the gradient moves every layer's entropy
    towards its target (one layer below it, one above), and α towards the entropies, for a negative loss as for a
    positive one; the task's own gradient is scaled by `1 + β·mean(lbe)`, as in the paper."""
    torch.manual_seed(0)
    narrow = (0.05 * torch.randn(32, 8)).requires_grad_()
    wide = (3.0 * torch.randn(32, 8)).requires_grad_()
    h = batch_entropies([narrow, wide]).detach()
    assert h[0] < h[1]
    reg = BatchEntropyRegularizer(2, beta=1.0, alpha=float(h.mean()), alpha_min=0.0)
    task = torch.tensor(task_loss, requires_grad=True)
    out = reg([narrow, wide], task)
    lbe = (h - reg.targets().detach()) ** 2
    torch.testing.assert_close(out.lbe_loss, lbe.mean() * task.detach())  # the paper's value, sign included
    grads = torch.autograd.grad(out.loss, [narrow, wide, task, reg.alpha])
    torch.testing.assert_close(grads[2], 1 + lbe.mean())  # the task's gradient, scaled by 1 + β·mean(lbe) > 0
    step = 1e-3 / abs(task_loss)
    moved = batch_entropies([narrow - step * grads[0], wide - step * grads[1]]).detach()
    targets = reg.targets().detach()
    assert ((moved - targets).abs() < (h - targets).abs()).all(), (h, moved, targets)
    # α moves towards the entropies: up for the wide layer's target (below it), down for the narrow one's.
    assert grads[3][0] > 0 and grads[3][1] < 0


def test_without_scaling_by_the_task_loss_the_term_is_added():
    xs = layers()
    reg = BatchEntropyRegularizer(3, beta=0.1, alpha=0.5, alpha_min=0.2, scale_by_task_loss=False)
    for value in (2.0, 0.0, -3.0):
        task = torch.tensor(value, requires_grad=True)
        out = reg(xs, task)
        torch.testing.assert_close(out.lbe_loss, 0.1 * out.lbe_per_layer.mean())
        torch.testing.assert_close(out.loss, task + 0.1 * out.lbe_per_layer.mean())
        assert torch.autograd.grad(out.loss, task)[0] == 1.0  # the task's gradient untouched
