"""The guard against a silent run without LBE (`hf_batch_entropy.guard`): which logging windows are errors, and what
the error names."""

import pytest

from hf_batch_entropy.guard import RegularizationGuard


def window(guard, *kinds):
    for kinds_of_one in kinds:
        guard.count("micro_batches")
        for kind in kinds_of_one:
            guard.count(kind)


def test_a_window_with_a_regularized_step_passes_and_the_next_starts_empty():
    guard = RegularizationGuard()
    window(guard, ["ours"], ["ours", "regularized"])
    guard.check(0.5, "T")
    guard.check(0.5, "T")  # an empty window (no training step since) is not an error


def test_each_check_ends_its_window():
    """A regularized window does not carry over: the next window, with no regularized step, is an error."""
    guard = RegularizationGuard()
    window(guard, ["ours", "regularized"])
    guard.check(0.5, "T")
    window(guard, ["ours"], ["ours"])
    with pytest.raises(RuntimeError, match="regularized none of the 2 training batch"):
        guard.check(0.5, "T")


def test_beta_zero_is_never_an_error():
    guard = RegularizationGuard()
    window(guard, [], [])
    guard.check(0.0, "T")


def test_a_compute_loss_that_bypasses_the_mixin_is_named():
    guard = RegularizationGuard()
    window(guard, [], [])
    with pytest.raises(RuntimeError, match=r"2 training batch.*OwnLoss\.compute_loss never reached.*lbe_beta=0\.5"):
        guard.check(0.5, "OwnLoss")


def test_batches_of_one_sequence_are_named():
    guard = RegularizationGuard()
    window(guard, ["ours"], ["ours"])
    with pytest.raises(RuntimeError, match="single sequence.*per_device_train_batch_size is 1.*packed"):
        guard.check(0.5, "T")


def test_one_batch_of_one_after_regularized_ones_passes_but_not_in_a_new_run():
    guard = RegularizationGuard()
    window(guard, ["ours", "regularized"])
    guard.check(0.5, "T")
    window(guard, ["ours"])  # the last batch of the epoch, logged on its own
    guard.check(0.5, "T")
    guard.start_run()
    window(guard, ["ours"])
    with pytest.raises(RuntimeError, match="single sequence"):
        guard.check(0.5, "T")


def test_a_window_of_short_last_batches_alone_passes_even_in_a_new_run():
    """An epoch's last batch with fewer sequences than a full batch (one), unregularized: not a silent run without
    LBE, also where it is all a resumed run has left."""
    guard = RegularizationGuard()
    guard.start_run()
    window(guard, ["ours", "tails"])
    guard.check(0.5, "T")
    window(guard, ["ours", "tails"], ["ours"])  # a full batch of one sequence among them: still an error
    with pytest.raises(RuntimeError, match="single sequence"):
        guard.check(0.5, "T")


# --- before training -------------------------------------------------------------------------------------------------


def test_a_batch_of_one_is_an_error_unless_pooled_or_packed(monkeypatch):
    import hf_batch_entropy.entropy.reference as entropy
    from hf_batch_entropy.guard import check_batch_size

    with pytest.raises(ValueError, match="at least 2 examples.*per_device_train_batch_size is 1"):
        check_batch_size(1, 1, False, False)
    check_batch_size(2, 2, False, False)
    check_batch_size(1, 1, False, True)  # one packed row may hold several sequences
    monkeypatch.setattr(entropy, "_sync_active", lambda sync: sync)  # as in a group of several processes
    check_batch_size(1, 1, True, False)


def test_a_model_with_nothing_to_measure_is_told_by_its_structure():
    import torch
    from torch import nn

    from conftest import TinyMLP, tiny_bert
    from hf_batch_entropy.guard import check_model, nothing_to_measure

    class Scalars(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.zeros(()))

        def forward(self, x, **kwargs):
            return x * self.a

    assert nothing_to_measure(Scalars()) and not nothing_to_measure(TinyMLP()) and not nothing_to_measure(tiny_bert())
    with pytest.raises(ValueError, match="Scalars returns no hidden states and has no activation.*lbe_target_modules"):
        check_model(Scalars(), None)
    check_model(TinyMLP(), None)
    check_model(TinyMLP(), ["stem"])
    with pytest.raises(ValueError, match="matches no module of TinyMLP"):
        check_model(TinyMLP(), ["nope"])
