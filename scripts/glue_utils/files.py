"""Local GLUE data files: CSV, TSV or JSON lines, including the original GLUE TSV files exactly as the GLUE benchmark
distributes them (CoLA without a header line, MRPC's `Quality / #1 String / #2 String` header behind a UTF-8
byte-order mark, RTE's text labels, quote characters that are text, not quoting), into a `datasets.DatasetDict` with
the Hub's column names and label ids.

Every problem with a file (unknown format, empty file, a missing column, a label outside the task's label set, a row
with the wrong number of fields) raises `GlueDataError`, a `ValueError` whose message names the file, the line or the
column, and what to do about it.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .tasks import GLUE_TASKS, LABEL_COLUMN, GlueTask, LabelSpec, get_glue_task

__all__ = ["GlueDataError", "Table", "load_glue_files", "read_table"]

#: Columns that number rows; never taken for a sentence when the sentence columns are inferred.
_INDEX_COLUMNS = frozenset({"index", "idx", "id", "guid"})

#: File extensions understood by `read_table`, and their format.
_FORMATS = {".tsv": "tsv", ".csv": "csv", ".json": "json", ".jsonl": "json"}


class GlueDataError(ValueError):
    """A data file cannot be used: the message names the file and the column, label or line at fault."""


# ---------------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Table:
    """The raw content of a data file: its column names, and per row its values and line number (for errors)."""

    path: str
    columns: list[str]
    rows: list[list[Any]]
    line_numbers: list[int]

    def column(self, name: str) -> list[Any]:
        """The values of column `name`, in file order."""
        index = self.columns.index(name)
        return [row[index] for row in self.rows]


def _file_format(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in _FORMATS:
        raise GlueDataError(
            f"{path}: unsupported file type {suffix or '(no extension)'!r}. Use a .tsv (tab-separated, quote "
            "characters are text, as in the GLUE distribution), .csv (comma-separated, standard quoting) or "
            ".json/.jsonl (JSON lines: one object per line) file."
        )
    return _FORMATS[suffix]


def read_table(path: str | os.PathLike, task: GlueTask | None = None) -> Table:
    """Read a TSV, CSV or JSON-lines file into a `Table`, checking that it is well-formed.

    * TSV is read with quoting disabled (`csv.QUOTE_NONE`), as GLUE's files must be: their sentences contain `"`
      characters that are text, and a quoting reader would merge rows.
    * A UTF-8 byte-order mark (MRPC's header has one) is dropped, so the first column keeps its plain name.
    * A file without a header line is recognised when `task` describes one (CoLA's train and dev files): if the first
      row names none of the task's columns and has as many fields as the task's headerless layout.
    * JSON: one object per line (JSON lines), or a single JSON array of objects.

    Raises:
        GlueDataError: for an unsupported extension, a missing or empty file, a row with the wrong number of fields,
            a JSON line that is not an object.
    """
    path = os.fspath(path)
    fmt = _file_format(path)
    if not os.path.isfile(path):
        raise GlueDataError(f"{path}: no such file.")
    # utf-8-sig drops a byte-order mark when there is one and reads plain UTF-8 otherwise.
    with open(path, encoding="utf-8-sig", newline="") as handle:
        if fmt == "json":
            table = _read_json(path, handle.read())
        else:
            table = _read_delimited(path, handle, fmt, task)
    if not table.rows:
        what = f"only a header line ({', '.join(table.columns)})" if table.columns else "nothing"
        raise GlueDataError(f"{path}: the file is empty: it holds {what} and no data rows.")
    return table


def _read_delimited(path: str, handle: Iterable[str], fmt: str, task: GlueTask | None) -> Table:
    if fmt == "tsv":
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(handle)
    rows: list[list[str]] = []
    line_numbers: list[int] = []
    for row in reader:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank lines (a trailing newline, say) are no rows
        rows.append(row)
        line_numbers.append(reader.line_num)
    if not rows:
        return Table(path, [], [], [])

    first = rows[0]
    if task is not None and task.headerless_columns and _is_data_row(first, task):
        columns = list(task.headerless_columns)
    else:
        columns = [name.strip() for name in first]
        rows, line_numbers = rows[1:], line_numbers[1:]
        duplicates = sorted({name for name in columns if columns.count(name) > 1})
        if duplicates:
            raise GlueDataError(f"{path}: the header line repeats the column name(s) {', '.join(duplicates)}.")

    for row, line in zip(rows, line_numbers):
        if len(row) != len(columns):
            hint = (
                " Sentences containing tabs are not possible in a TSV file; check the file for a broken line."
                if fmt == "tsv"
                else " Quote values that contain commas."
            )
            raise GlueDataError(
                f"{path}, line {line}: {len(row)} fields, but the header has {len(columns)} "
                f"({', '.join(columns)}).{hint}"
            )
    return Table(path, columns, rows, line_numbers)


def _is_data_row(row: list[str], task: GlueTask) -> bool:
    """Whether the first row of a file of `task` is data, not a header (CoLA's train/dev files have no header)."""
    known = {"index", LABEL_COLUMN, *task.headerless_columns}
    for key in (*task.sentence_keys, LABEL_COLUMN):
        if key is not None:
            known.update(task.column_names(key))
    return len(row) == len(task.headerless_columns) and not any(cell.strip() in known for cell in row)


def _read_json(path: str, text: str) -> Table:
    records: list[tuple[int, Any]] = []
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise GlueDataError(f"{path}: not valid JSON ({err}).") from err
        records = [(i + 1, item) for i, item in enumerate(data)]  # "line" = position in the array here
    else:
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((line_number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise GlueDataError(
                    f"{path}, line {line_number}: not valid JSON ({err}). JSON files must hold one object per line "
                    "(JSON lines) or a single array of objects."
                ) from err
    columns: list[str] = []
    seen: set[str] = set()
    for line_number, record in records:
        if not isinstance(record, dict):
            raise GlueDataError(
                f"{path}, line {line_number}: expected a JSON object with the example's columns, got "
                f"{type(record).__name__}."
            )
        for key in record:
            if key not in seen:
                seen.add(key)
                columns.append(key)
    # A key missing from some records reads as None there; the column checks report it if that column is needed.
    rows = [[record.get(name) for name in columns] for _, record in records]
    return Table(path, columns, rows, [line for line, _ in records])


# ---------------------------------------------------------------------------------------------------------------------
# From a file to the task's columns
# ---------------------------------------------------------------------------------------------------------------------



def _find_column(table: Table, names: tuple[str, ...]) -> str | None:
    """The first of `names` that `table` has (exact match first, then ignoring case)."""
    for name in names:
        if name in table.columns:
            return name
    lowered = {column.lower(): column for column in table.columns}
    for name in names:
        if name.lower() in lowered:
            return lowered[name.lower()]
    return None


def _require_column(table: Table, canonical: str, task: GlueTask | None, role: str) -> str:
    names = task.column_names(canonical) if task is not None else (canonical,)
    found = _find_column(table, names)
    if found is not None:
        return found
    accepted = " or ".join(repr(name) for name in names)
    where = f"task {task.name!r}" if task is not None else "this run"
    hint = ""
    if task is None:
        guess = _guess_task(table)
        if guess:
            hint = f" The columns look like the original GLUE {guess.upper()} file: pass --task_name {guess}."
    raise GlueDataError(
        f"{table.path}: missing column {accepted} ({role} for {where}). The file has the columns "
        f"{', '.join(repr(c) for c in table.columns)}.{hint}"
    )


def _guess_task(table: Table) -> str | None:
    """A GLUE task whose original column names the table has (for a hint when --task_name was not given)."""
    for task in GLUE_TASKS.values():
        if task.column_aliases and all(
            _find_column(table, task.column_names(key)) for key in (*task.sentence_keys, LABEL_COLUMN) if key
        ) and any(_find_column(table, aliases) for aliases in task.column_aliases.values()):
            return task.name
    return None


def _text_column(table: Table, column: str) -> list[str]:
    values = table.column(column)
    for value, line in zip(values, table.line_numbers):
        if not isinstance(value, str):
            raise GlueDataError(
                f"{table.path}, line {line}: column {column!r} must hold text, got {value!r}"
                + (" (the key is missing from this record)." if value is None else ".")
            )
    return values


def _parse_labels(table: Table, column: str, spec: LabelSpec) -> list[int] | list[float]:
    """The label column as class ids (names or ids accepted) or, for regression, as floats."""
    values = table.column(column)
    if spec.is_regression:
        parsed: list[float] = []
        for value, line in zip(values, table.line_numbers):
            number = _as_float(value)
            if number is None:
                raise GlueDataError(
                    f"{table.path}, line {line}: column {column!r} holds {value!r}, but this is a regression task: "
                    "labels must be numbers."
                )
            parsed.append(number)
        return parsed

    names = spec.label_names or []
    lookup = {name.lower(): i for i, name in enumerate(names)}
    ids: list[int] = []
    bad: dict[str, int] = {}  # offending value -> first line it is on
    for value, line in zip(values, table.line_numbers):
        label_id = _as_label_id(value, lookup, len(names), allow_ids=spec.task is not None)
        if label_id is None:
            bad.setdefault(repr(value), line)
            continue
        ids.append(label_id)
    if bad:
        shown = ", ".join(f"{value} (line {line})" for value, line in list(bad.items())[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        source = f"task {spec.task.name!r}" if spec.task is not None else "the training file"
        raise GlueDataError(
            f"{table.path}: column {column!r} has labels outside the label set of {source}: {shown}{more}. "
            f"Expected one of {', '.join(names)}"
            + (f" (or their ids 0..{len(names) - 1})." if spec.task is not None else ".")
            + (" Is --task_name right for this file?" if spec.task is not None else "")
        )
    return ids


def _is_int_text(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _is_real_valued(values: list[Any]) -> bool:
    """Whether labels are real numbers (regression): all numeric, and some float-typed or not integral text."""
    if not all(_as_float(v) is not None for v in values):
        return False
    return any(isinstance(v, float) or (isinstance(v, str) and not _is_int_text(v.strip())) for v in values)


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _as_label_id(value: Any, lookup: dict[str, int], num_labels: int, allow_ids: bool) -> int | None:
    """A class id from a label name (any case) or, when `allow_ids`, from an id (int or digit string).

    GLUE files write some labels as names (RTE: `entailment`) and some as ids (CoLA: `1`), so a task accepts both;
    labels inferred from a custom training file are names only (their values `1`, `2` are names, not ids).
    """
    if isinstance(value, bool) or value is None:
        return None
    text = value.strip() if isinstance(value, str) else str(value)
    if text.lower() in lookup:
        return lookup[text.lower()]
    if allow_ids and _is_int_text(text) and not isinstance(value, float):
        label_id = int(text)
        return label_id if 0 <= label_id < num_labels else None
    return None


def _infer_spec(train: Table) -> LabelSpec:
    """Sentence columns and labels of a custom (non-GLUE) training file, as transformers' run_glue infers them."""
    label_column = _require_column(train, LABEL_COLUMN, None, "the label")
    candidates = [c for c in train.columns if c != label_column and c.lower() not in _INDEX_COLUMNS]
    if "sentence1" in candidates and "sentence2" in candidates:
        keys: tuple[str, str | None] = ("sentence1", "sentence2")
    elif len(candidates) >= 2:
        keys = (candidates[0], candidates[1])
    elif candidates:
        keys = (candidates[0], None)
    else:
        raise GlueDataError(
            f"{train.path}: no sentence column: besides {label_column!r} it has only "
            f"{', '.join(repr(c) for c in train.columns if c != label_column) or 'no columns'}."
        )

    values = train.column(label_column)
    if _is_real_valued(values):
        return LabelSpec(keys, None)  # real-valued labels: regression
    texts = [str(v).strip() if v is not None else "" for v in values]
    if "" in texts:
        line = train.line_numbers[texts.index("")]
        raise GlueDataError(f"{train.path}, line {line}: empty value in column {label_column!r}.")
    distinct = set(texts)
    if all(_is_int_text(d) for d in distinct):
        names = [str(v) for v in sorted(int(d) for d in distinct)]  # numeric order: "2" before "10"
    else:
        names = sorted(distinct)
    if len(names) < 2:
        raise GlueDataError(
            f"{train.path}: column {label_column!r} has a single label ({names[0]!r}); classification needs at "
            "least two."
        )
    return LabelSpec(keys, names)


def _to_columns(table: Table, spec: LabelSpec, *, labels: str) -> dict[str, list]:
    """The sentence and label columns of `table` under their canonical names.

    Args:
        labels: `"required"` (train/validation), `"optional"` (test: kept when present) or `"drop"`.
    """
    columns: dict[str, list] = {}
    for role, key in zip(("the first sentence", "the second sentence"), spec.sentence_keys):
        if key is not None:
            columns[key] = _text_column(table, _require_column(table, key, spec.task, role))
    if labels == "drop":
        return columns
    if labels == "optional":
        names = spec.task.column_names(LABEL_COLUMN) if spec.task is not None else (LABEL_COLUMN,)
        label_column = _find_column(table, names)
        if label_column is None:
            return columns
    else:
        label_column = _require_column(table, LABEL_COLUMN, spec.task, "the label")
    columns[LABEL_COLUMN] = _parse_labels(table, label_column, spec)
    return columns


def load_glue_files(
    data_files: Mapping[str, str | os.PathLike], task: GlueTask | str | None = None
) -> tuple[Any, LabelSpec]:
    """Load local train/validation/test files into a `datasets.DatasetDict` with the task's columns.

    Args:
        data_files: Split name -> file. Splits whose name starts with `"test"` may lack labels (the labels are kept
            when present); all others must have them.
        task: The GLUE task (or its name) that fixes the sentence columns, the label names and their ids. Without
            one, the columns and labels are inferred from the `"train"` file as transformers' run_glue does: the
            label column is `label`; the sentences are `sentence1`/`sentence2` when present, else the first one or
            two other columns (index columns skipped); labels are regression when they are real numbers, else
            the sorted distinct values.

    Returns:
        `(datasets, spec)`: the `DatasetDict` (sentence columns and `label`: int64 class ids, or float32 for
        regression) and the `LabelSpec` describing the columns and labels.

    Raises:
        GlueDataError: for any problem with a file, naming the file and the column, label or line.
    """
    import datasets

    if isinstance(task, str):
        task = get_glue_task(task)
    if not data_files:
        raise GlueDataError("No data files given: pass at least --train_file or --validation_file.")
    tables = {split: read_table(path, task) for split, path in data_files.items()}
    if task is not None:
        spec = LabelSpec(task.sentence_keys, list(task.label_names) if task.label_names else None, task)
    else:
        labelled = [s for s in ("train", "validation") if s in tables] or [next(iter(tables))]
        spec = _infer_spec(tables[labelled[0]])

    features: dict[str, Any] = {key: datasets.Value("string") for key in spec.sentence_keys if key}
    label_feature = datasets.Value("float32") if spec.is_regression else datasets.Value("int64")
    splits = {}
    for split, table in tables.items():
        columns = _to_columns(table, spec, labels="optional" if split.startswith("test") else "required")
        split_features = dict(features)
        if LABEL_COLUMN in columns:
            split_features[LABEL_COLUMN] = label_feature
        # Named, so that what reads `.split` (the model card's metadata) says which split the results come from.
        splits[split] = datasets.Dataset.from_dict(columns, features=datasets.Features(split_features), split=split)
    return datasets.DatasetDict(splits), spec
