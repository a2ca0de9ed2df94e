"""Sequence-classification batches: labelled `.jsonl` rows, the shipped task, GLUE or HF by name.

Part of `train.data` (which serves `classification_data` and `GLUE_TASKS`); see its docstring for
the batch contract.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prunepath_jax import text

from .data import TaskData, _check_len, _load_hf, _pad_id, _rows_to_arrays, encode_texts

# GLUE task -> (text field, pair field); label is always "label" (-1 on the unlabelled test split).
GLUE_TASKS = {
    "cola": ("sentence", None),
    "sst2": ("sentence", None),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}


def _glue_task(source: str) -> str | None:
    for prefix in ("glue/", "glue:", "nyu-mll/glue:", "nyu-mll/glue/"):
        if source.lower().startswith(prefix):
            task = source[len(prefix) :].lower()
            if task not in GLUE_TASKS:
                raise ValueError(f"unknown GLUE task {task!r}; supported: {sorted(GLUE_TASKS)}"
                                 " (stsb is regression, not classification)")  # fmt: skip
            return task
    return None


def _cls_rows(source: str, split: str, fields: tuple) -> tuple[list[dict], str, list | None]:
    """Rows, a description, and label names when the source declares them."""
    if source in ("shipped", "default"):
        path = text.corpus_path(f"source_{split}")
        return text.read_jsonl(path), str(path), None
    task = _glue_task(source)
    if task is not None:
        hf_split = "validation_matched" if task == "mnli" and split == "validation" else split
        ds = _load_hf(f"nyu-mll/glue:{task}", hf_split)
        names = getattr(ds.features.get("label"), "names", None)
        return [dict(r) for r in ds], f"glue/{task} [{hf_split}]", names
    if text._looks_like_path(source):
        path = Path(source).expanduser()
        if path.suffix.lower() != ".jsonl" and path.is_file():
            raise ValueError(f"classification data must be a .jsonl file, got {path}")
        return text.read_jsonl(path), str(path), None
    ds = _load_hf(source, split)
    names = getattr(ds.features.get(fields[2]), "names", None)
    return [dict(r) for r in ds], f"{source} [{split}]", names


def classification_data(
    tokenizer,
    source: str = "shipped",
    split: str = "train",
    max_len: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    text_field: str = "text",
    text_pair_field: str | None = None,
    label_field: str = "label",
    *,
    num_labels: int | None = None,
    max_context: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> TaskData:
    """Sequence-classification batches from labelled `.jsonl` rows (or GLUE / HF by name).

    `"shipped"` is the corpus's 3-class task (which kind of work a passage comes from). GLUE
    tasks ("glue/sst2", "glue/mnli", ...) use their own field names; unlabelled rows (label -1,
    GLUE test splits) are dropped and counted. Texts are encoded with the tokenizer's special
    tokens ([CLS] ... [SEP] for BERT) and truncated to `max_len` (specials kept); rows whose
    encoding is empty are dropped and counted. `info["n_labels"]` is `num_labels` if given, else
    the number of label names, else max label + 1.
    """
    _check_len("max_len", max_len, max_context)
    glue = _glue_task(source)
    if glue is not None and text_field == "text" and text_pair_field is None:
        text_field, text_pair_field = GLUE_TASKS[glue]
    rows, where, names = _cls_rows(source, split, (text_field, text_pair_field, label_field))
    texts, pairs, labels, unlabelled = [], [], [], 0
    name_of: dict[int, str] = {}
    for i, row in enumerate(rows):
        at = f"{where}: row {i + 1}"
        for f in (text_field, text_pair_field, label_field):
            if f is not None and f not in row:
                raise ValueError(f"{at} has no field {f!r} (fields: {', '.join(map(str, row))})")
        label = row[label_field]
        if isinstance(label, bool) or not isinstance(label, int | np.integer):
            raise ValueError(f"{at}: label {label!r} is not an integer")
        if label < 0:
            unlabelled += 1
            continue
        for f in (text_field, text_pair_field):
            if f is not None and not isinstance(row[f], str):
                raise ValueError(f"{at}: field {f!r} is {type(row[f]).__name__}, not a string")
        if isinstance(row.get("label_name"), str):
            if name_of.setdefault(int(label), row["label_name"]) != row["label_name"]:
                raise ValueError(f"{at}: label {label} has two names ({name_of[int(label)]!r}, "
                                 f"{row['label_name']!r})")  # fmt: skip
        texts.append(row[text_field])
        pairs.append(row[text_pair_field] if text_pair_field else None)
        labels.append(int(label))
    if not labels:
        raise ValueError(f"empty dataset: no labelled row in {where} ({unlabelled} unlabelled)")
    ids, types = encode_texts(
        tokenizer, texts, pairs=pairs if text_pair_field else None, max_len=max_len
    )
    n_long = sum(len(i) == max_len for i in ids)  # at the cap: (probably) truncated
    examples, n_empty = [], 0
    for i, t, y in zip(ids, types, labels, strict=True):
        if not i:
            n_empty += 1
            continue
        ex = {"ids": i, "label": y}
        if text_pair_field:
            ex["types"] = t
        examples.append(ex)
    n_labels = max(labels) + 1
    if names:
        n_labels = max(n_labels, len(names))
    elif name_of:
        names = [name_of.get(k, str(k)) for k in range(n_labels)]
    if num_labels:
        if max(labels) >= num_labels:
            raise ValueError(f"{where}: label {max(labels)} >= num_labels {num_labels}")
        n_labels = num_labels
    info = {
        "n_labels": n_labels, "label_names": names, "n_unlabelled": unlabelled,
        "n_empty": n_empty, "n_at_max_len": int(n_long), "pad_id": _pad_id(tokenizer),
        "label_counts": np.bincount(labels, minlength=n_labels).tolist(),
    }  # fmt: skip
    arrays = _rows_to_arrays(examples, max_len, _pad_id(tokenizer))
    config = {"max_len": max_len, "fields": [text_field, text_pair_field, label_field],
              "n_labels": n_labels}  # fmt: skip
    return TaskData(
        "cls", arrays, batch_size=batch_size, seed=seed, process_index=process_index,
        process_count=process_count, config=config, info=info, where=where,
    )  # fmt: skip
