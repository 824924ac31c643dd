"""The trainer's metric tally (`hf_batch_entropy.tally`): sums on the device, one reduce and one host read per window,
means per measured pass, per layer and per optimizer step, NaN/inf entropies an error naming the layers."""

import logging

import pytest
import torch

from hf_batch_entropy.tally import MetricTally


class Clock:
    def __init__(self):
        self.step = 0

    def __call__(self):
        return self.step


def test_means_per_pass_per_layer_and_per_step():
    clock = Clock()
    tally = MetricTally(clock)
    clock.step = 4
    tally.add_pass("train", torch.tensor([1.0, 3.0]), lbe_alpha_mean=torch.tensor(2.0))
    tally.add_pass("train", torch.tensor([2.0, 6.0]), torch.tensor([False, True]), lbe_alpha_mean=torch.tensor(4.0))
    tally.add("train", task_loss=torch.tensor(6.0), lbe_loss=torch.tensor(2.0))
    clock.step = 7
    assert tally.window_start("train") == 4 and tally.window_start("eval") == 7
    means = tally.flush("train", ["a", "b"], steps=2)
    assert means["batch_entropy_mean"] == pytest.approx((2.0 + 6.0) / 2)  # each pass: the mean of its measured layers
    assert means["batch_entropy_min"] == pytest.approx((1.0 + 6.0) / 2)
    assert means["batch_entropy_per_layer"] == pytest.approx([1.0, (3.0 + 6.0) / 2])  # layer a measured once
    assert means["lbe_alpha_mean"] == pytest.approx(3.0)
    assert means["task_loss"] == 3.0 and means["lbe_loss"] == 1.0  # per optimizer step
    assert tally.flush("train", ["a", "b"]) == {}  # forgotten once read


def test_modes_never_mix_and_discard_forgets_one():
    tally = MetricTally(lambda: 0)
    tally.add_pass("train", torch.tensor([1.0]))
    tally.add_pass("eval", torch.tensor([5.0]))
    tally.discard("eval")
    tally.add_pass("eval", torch.tensor([7.0]))
    assert tally.flush("eval", ["a"])["batch_entropy_mean"] == 7.0
    assert tally.flush("train", ["a"])["batch_entropy_mean"] == 1.0
    tally.add_pass("train", torch.tensor([1.0]))
    tally.discard()
    assert tally.flush("train", ["a"]) == {}


def test_one_reduce_per_window_across_processes():
    reduced = []

    def reduce(flat):
        reduced.append(flat.clone())
        return flat * 2  # as a sum over two processes with equal values

    tally = MetricTally(lambda: 0)
    tally.add_pass("train", torch.tensor([1.0, 2.0]))
    tally.add("train", task_loss=torch.tensor(3.0))
    means = tally.flush("train", ["a", "b"], reduce, num_processes=2)
    assert len(reduced) == 1 and reduced[0].dim() == 1
    assert means["batch_entropy_mean"] == pytest.approx(1.5) and means["task_loss"] == 3.0  # per process


def test_nonfinite_entropies_raise_naming_the_layers():
    tally = MetricTally(lambda: 0)
    tally.add_pass("train", torch.tensor([1.0, float("nan"), 2.0]))
    with pytest.raises(FloatingPointError, match="1 layer.*blocks.1"):
        tally.flush("train", ["blocks.0", "blocks.1", "blocks.2"])


def test_a_pass_that_measured_nothing_is_out_of_the_means_and_said_once(caplog):
    tally = MetricTally(lambda: 0)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            tally.add_pass("train", torch.tensor([4.0]))
            tally.add_pass("train", torch.tensor([0.0]), torch.tensor([False]))
            means = tally.flush("train", ["a"])
            assert means["batch_entropy_mean"] == 4.0 and means["batch_entropy_per_layer"] == [4.0]
    assert sum("no batch-entropy" in r.getMessage() for r in caplog.records) == 1


def test_adding_reads_nothing_on_the_host(monkeypatch):
    tally = MetricTally(lambda: 0)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, name=name, **k: pytest.fail(f"Tensor.{name} read"))
    tally.add_pass("train", torch.tensor([1.0, 2.0]), torch.tensor([True, False]), lbe_alpha_mean=torch.tensor(1.0))
    tally.add("train", task_loss=torch.tensor(1.0))


def test_logs_name_the_metrics_and_the_layers_on_request():
    means = {"batch_entropy_mean": 1.0, "batch_entropy_per_layer": [0.5, 1.5]}
    assert MetricTally.logs(means, "eval_") == {"eval_batch_entropy_mean": 1.0}
    assert MetricTally.logs(means, per_layer=True) == {
        "batch_entropy_mean": 1.0, "batch_entropy/layer_0": 0.5, "batch_entropy/layer_1": 1.5}
