"""The bundled GLUE metric (`scripts/glue_utils/metrics/glue/glue.py`): loads offline, scores as GLUE defines it.

Expected values are worked out by hand in the comments, not computed by the libraries under test.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import evaluate
import numpy as np
import pytest

from glue_utils.metrics import GLUE_METRIC_PATH, glue_metric_path, load_glue_metric


def test_path_is_a_local_evaluate_module():
    # evaluate.load(<folder>) needs <folder>/<folder name>.py.
    assert glue_metric_path() == GLUE_METRIC_PATH
    assert os.path.isfile(os.path.join(glue_metric_path(), "glue.py"))


def test_cola_matthews_correlation():
    # predictions 1 0 1 1 vs references 1 0 0 1: TP=2, TN=1, FP=1, FN=0
    # MCC = (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 2 / sqrt(3·2·2·1) = 1/sqrt(3)
    metric = evaluate.load(glue_metric_path(), "cola")
    result = metric.compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1])
    assert result.keys() == {"matthews_correlation"}
    assert result["matthews_correlation"] == pytest.approx(1 / math.sqrt(3))


def test_cola_constant_predictions_score_zero():
    # All-"acceptable" predictions carry no information: MCC 0 (GLUE's convention; the denominator is 0).
    result = load_glue_metric("cola").compute(predictions=[1, 1, 1, 1], references=[1, 0, 0, 1])
    assert result["matthews_correlation"] == 0.0


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_accuracy_and_f1(task):
    # predictions 0 1 1 0 1 vs references 0 1 0 0 1: 4 of 5 right; TP=2, FP=1, FN=0 -> P=2/3, R=1, F1=0.8
    result = evaluate.load(glue_metric_path(), task).compute(
        predictions=[0, 1, 1, 0, 1], references=[0, 1, 0, 0, 1]
    )
    assert result == pytest.approx({"accuracy": 0.8, "f1": 0.8})


def test_f1_is_of_the_positive_class():
    # references 1 1 0 0, predictions 1 0 0 0: TP=1, FN=1, FP=0 -> P=1, R=1/2, F1=2/3 (class 0 would give 0.8)
    result = load_glue_metric("mrpc").compute(predictions=[1, 0, 0, 0], references=[1, 1, 0, 0])
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["accuracy"] == pytest.approx(0.75)


def test_stsb_pearson_and_spearman():
    # x = 1 2 3 4, y = 1 2 3 5: dx = −1.5 −.5 .5 1.5, dy = −1.75 −.75 .25 2.25
    # Σdx·dy = 6.5, Σdx² = 5, Σdy² = 8.75 -> r = 6.5 / sqrt(43.75); y is monotone in x -> Spearman 1
    result = evaluate.load(glue_metric_path(), "stsb").compute(
        predictions=[1.0, 2.0, 3.0, 4.0], references=[1.0, 2.0, 3.0, 5.0]
    )
    assert result.keys() == {"pearson", "spearmanr"}
    assert result["pearson"] == pytest.approx(6.5 / math.sqrt(43.75), abs=1e-12)  # float64 throughout
    assert result["spearmanr"] == pytest.approx(1.0)


def test_stsb_spearman_on_ranks():
    # Ranks 1 3 2 4 vs 1 2 3 4: Σd² = 2 -> ρ = 1 − 6·2 / (4·15) = 0.8; on ranks Pearson equals it.
    result = load_glue_metric("STS-B").compute(predictions=np.array([1.0, 3.0, 2.0, 4.0]), references=[1, 2, 3, 4])
    assert result == pytest.approx({"pearson": 0.8, "spearmanr": 0.8})


@pytest.mark.parametrize("task", ["sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "hans"])
def test_accuracy_tasks(task):
    # 3 of 4 right (MNLI has three classes)
    result = evaluate.load(glue_metric_path(), task).compute(predictions=[0, 2, 1, 1], references=[0, 2, 1, 0])
    assert result == {"accuracy": 0.75}


def test_batches_are_accumulated():
    metric = load_glue_metric("rte")
    metric.add_batch(predictions=[0, 1], references=[0, 1])
    metric.add_batch(predictions=[1, 1], references=[0, 1])
    assert metric.compute() == {"accuracy": 0.75}


def test_task_name_spellings():
    assert load_glue_metric("SST-2").config_name == "sst2"
    assert load_glue_metric("CoLA").config_name == "cola"
    assert load_glue_metric("mnli_mismatched").config_name == "mnli_mismatched"


def test_unknown_task_names_the_choices():
    with pytest.raises(KeyError, match=r"Unknown GLUE task 'squad'.*cola, sst2, mrpc"):
        evaluate.load(glue_metric_path(), "squad")


def test_no_predictions_is_a_clear_error():
    with pytest.raises(ValueError, match="no predictions"):
        load_glue_metric("rte").compute(predictions=[], references=[])
