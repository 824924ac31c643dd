"""GLUE metric, as an `evaluate` module kept beside `scripts/run_glue.py`, so that it loads without the Hub.

    >>> import evaluate
    >>> from glue_utils.metrics import glue_metric_path
    >>> metric = evaluate.load(glue_metric_path(), "mrpc")
    >>> metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75, 'f1': 0.6666666666666666}

Per task, the scores GLUE reports (Wang et al., 2019): Matthews correlation for CoLA; accuracy and F1 of the positive
class for MRPC and QQP; Pearson and Spearman correlation for STS-B; accuracy for the others. Computed with
scikit-learn and SciPy, and equal to the `glue` metric of the Hub (`evaluate-metric/glue`).
"""

import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  note={In the Proceedings of ICLR.},
  year={2019}
}
"""

_DESCRIPTION = """\
GLUE, the General Language Understanding Evaluation benchmark (https://gluebenchmark.com/), is a collection of
resources for training, evaluating, and analyzing natural language understanding systems. This module scores
predictions on one GLUE task, chosen by the configuration name.
"""

_KWARGS_DESCRIPTION = """
Computes the GLUE score(s) of one task.
Args:
    predictions: predicted labels: class ids, or real-valued scores for stsb.
    references: gold labels, in the same form.
Returns: depending on the task (the configuration name),
    "accuracy": accuracy (sst2, mnli, mnli_matched, mnli_mismatched, qnli, rte, wnli, hans, and mrpc, qqp),
    "f1": F1 of the positive class 1 (mrpc, qqp),
    "pearson": Pearson correlation (stsb),
    "spearmanr": Spearman rank correlation (stsb),
    "matthews_correlation": Matthews correlation (cola).
Examples:
    >>> glue_metric = evaluate.load(glue_metric_path(), "cola")
    >>> glue_metric.compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1])
    {'matthews_correlation': 0.5773502691896258}
"""

#: Configuration name -> the scores reported for it.
TASK_METRICS = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "mnli": ("accuracy",),
    "mnli_matched": ("accuracy",),
    "mnli_mismatched": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "hans": ("accuracy",),
}


def _accuracy(predictions, references) -> float:
    return float((predictions == references).mean())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Glue(evaluate.Metric):
    """The GLUE score(s) of the task named by the configuration (`evaluate.load(path, "rte")`)."""

    def _info(self):
        if self.config_name not in TASK_METRICS:
            raise KeyError(
                f"Unknown GLUE task {self.config_name!r} for the GLUE metric: load it as "
                f"evaluate.load(glue_metric_path(), <task>) with <task> one of {', '.join(TASK_METRICS)}."
            )
        # STS-B is scored on real-valued similarities, every other task on class ids.
        dtype = "float64" if self.config_name == "stsb" else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)}),
            codebase_urls=[],
            reference_urls=["https://gluebenchmark.com/"],
            # No "numpy" format: its formatter casts floats to float32, which would cost STS-B correlations their
            # last digits. Plain Python values are turned into float64/int64 arrays in _compute instead.
            format=None,
        )

    def _compute(self, predictions, references):
        if len(predictions) == 0:
            raise ValueError("The GLUE metric got no predictions: evaluate on at least one example.")
        task = self.config_name
        dtype = np.float64 if task == "stsb" else np.int64
        predictions, references = np.asarray(predictions, dtype=dtype), np.asarray(references, dtype=dtype)
        if task == "cola":
            return {"matthews_correlation": float(matthews_corrcoef(references, predictions))}
        if task == "stsb":
            return {
                "pearson": float(pearsonr(predictions, references)[0]),
                "spearmanr": float(spearmanr(predictions, references)[0]),
            }
        if task in ("mrpc", "qqp"):
            return {
                "accuracy": _accuracy(predictions, references),
                "f1": float(f1_score(y_true=references, y_pred=predictions)),
            }
        return {"accuracy": _accuracy(predictions, references)}
