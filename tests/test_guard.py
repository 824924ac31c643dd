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
