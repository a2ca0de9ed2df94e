"""Text loading, token packing and exact evaluation windows (pure Python/numpy, no JAX).

Training and evaluation share one notion of a "document" so that the same source gives the same
tokens everywhere. Sources are:

* ``"shipped"`` / ``"default"``: the public-domain corpus in ``prunepath_jax/corpus`` (works
  offline, see its README). The split picks the file: ``"train"``, ``"validation"``, or any other
  shipped name such as ``"source_validation"`` (a jsonl file, read through ``field``).
* a local ``.txt`` file: documents are separated by a line holding only a form feed (``\\f``),
  which is how the shipped corpus separates whole works. A file without form feeds is one
  document. Blank lines are *not* document breaks, because plays and poems use them inside a work
  and an end-of-sequence token after every paragraph would teach the model a false rhythm.
* a local ``.jsonl`` file: one JSON object per line, the text taken from ``field``.
* a Hugging Face dataset, ``"name"`` or ``"name:config"`` (``"roneneldan/TinyStories"``,
  ``"wikitext:wikitext-2-raw-v1"``), imported lazily so offline installs never need ``datasets``.

Whitespace-only documents are dropped everywhere: they add nothing but separator tokens.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
SHIPPED_NAMES = (
    "train",
    "validation",
    "source_train",
    "source_validation",
    "sft_train",
    "sft_validation",
)
SUPPORTED_SUFFIXES = (".txt", ".jsonl")
DOC_SEPARATOR = re.compile(r"\n?^\f$\n?", re.MULTILINE)
_HF_NAME = re.compile(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?(:[\w.\-]+)?")
_FILE_LIKE = (".json", ".csv", ".tsv", ".parquet", ".gz", ".zst", ".md", ".text", ".arrow")


def corpus_path(name: str) -> Path:
    """Path of a shipped corpus file, by short name (``"train"``) or file name (``"train.txt"``).

    Raises:
        ValueError: ``name`` is not a shipped file.
        FileNotFoundError: the file is known but missing, which means the package was installed
            without its data files (check ``package-data`` in ``pyproject.toml``).
    """
    stem = name.removesuffix(".txt").removesuffix(".jsonl")
    if stem not in SHIPPED_NAMES:
        raise ValueError(f"unknown shipped corpus file {name!r}; known: {', '.join(SHIPPED_NAMES)}")
    suffix = ".txt" if stem in ("train", "validation") else ".jsonl"
    path = CORPUS_DIR / f"{stem}{suffix}"
    if not path.is_file():
        raise FileNotFoundError(
            f"shipped corpus file {path} is missing (package installed without its corpus data?)"
        )
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file; blank lines are skipped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a line is not valid JSON or not an object; the message names the line number
            so the broken record can be found in a large file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append(row)
    return rows


def split_documents(text: str) -> list[str]:
    """Split ``.txt`` contents into documents at form-feed lines, dropping blank documents."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [doc.strip("\n") for doc in DOC_SEPARATOR.split(text) if doc.strip()]


def read_texts(source: str, split: str = "train", field: str = "text") -> list[str]:
    """Read a list of documents from the shipped corpus, a local file, or a Hugging Face dataset.

    Args:
        source: ``"shipped"``/``"default"``, a ``.txt``/``.jsonl`` path, or a Hugging Face dataset
            name (``"name"`` or ``"name:config"``). See the module docstring for the formats.
        split: which split; for the shipped corpus any shipped name, for Hugging Face the dataset
            split. Ignored for local files, where the file itself is the split.
        field: the text field of jsonl records and Hugging Face rows.

    Returns:
        Non-empty documents, in source order.

    Raises:
        FileNotFoundError: a local path (or shipped file) does not exist.
        ValueError: unsupported extension, broken jsonl, missing or non-string field, or no
            non-empty document at all.
        ImportError / ConnectionError: a Hugging Face name without ``datasets`` installed, or
            without network access and no local cache.
    """
    path = local_text_path(source, split)
    if path is None:
        return _nonempty(_read_hf(source, split, field), f"{source} [{split}]")

    if path.suffix.lower() == ".txt":
        docs = split_documents(path.read_text(encoding="utf-8"))
    else:
        docs = [_field(row, field, f"{path}:{i + 1}") for i, row in enumerate(read_jsonl(path))]
    return _nonempty(docs, str(path))


def local_text_path(source: str, split: str = "train") -> Path | None:
    """The file ``read_texts`` would read for ``source`` (None: a Hugging Face dataset name),
    checked without reading it, so a command can reject a wrong path before it loads a model.

    Raises:
        FileNotFoundError: a local path (or shipped file) does not exist.
        ValueError: a directory, or an unsupported extension.
    """
    if source in ("shipped", "default"):
        return corpus_path(split)
    if not _looks_like_path(source):
        return None
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; expected a {' or '.join(SUPPORTED_SUFFIXES)}")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise ValueError(
            f"unsupported file type {path.suffix!r} for {path}; "
            f"supported: {', '.join(SUPPORTED_SUFFIXES)} (or a Hugging Face dataset name)"
        )
    return path


def _looks_like_path(source: str) -> bool:
    """Local file unless it looks like ``org/name[:config]`` and nothing exists at that path."""
    if Path(source).expanduser().exists():
        return True
    if source.startswith(("/", "./", "../", "~", ".\\")) or "\\" in source:
        return True
    if Path(source).suffix.lower() in SUPPORTED_SUFFIXES + _FILE_LIKE:
        return True
    return _HF_NAME.fullmatch(source) is None


def _field(row: dict, field: str, where: str) -> str:
    if field not in row:
        raise ValueError(f"{where}: record has no field {field!r} (fields: {', '.join(row)})")
    value = row[field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} is {type(value).__name__}, expected a string")
    return value


def _nonempty(docs: list[str], where: str) -> list[str]:
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"no non-empty text in {where}")
    return docs


def load_hf_dataset(name: str, split: str):
    """A Hugging Face `datasets` split ("path" or "path:config"), imported lazily: online users
    only; offline, or without the package, a clear error says what is missing."""
    try:
        import datasets  # optional dependency, only for online users
    except ImportError:
        raise ImportError(
            f"reading Hugging Face dataset {name!r} needs the `datasets` package: "
            "pip install 'prunepath_jax[hf]' (or pip install datasets), plus network access; "
            "offline, use a local .txt/.jsonl file"
        ) from None
    path, _, config = name.partition(":")
    try:
        return datasets.load_dataset(path, config or None, split=split)
    except Exception as e:  # datasets raises many types for offline / missing data
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConnectionError(
            f"could not load Hugging Face dataset {name!r} split {split!r} "
            f"({type(e).__name__}: {first}); this needs network access or a local HF cache"
        ) from e


def _read_hf(name: str, split: str, field: str) -> list[str]:
    ds = load_hf_dataset(name, split)
    if field not in ds.column_names:
        raise ValueError(f"{name} has no column {field!r} (columns: {', '.join(ds.column_names)})")
    return [str(t) for t in ds[field]]


def pack_tokens(token_ids: Sequence[Sequence[int]], seq_len: int, eos_id: int | None) -> np.ndarray:
    """Concatenate tokenised documents into fixed-length rows for training.

    ``eos_id`` is appended after every document (so it separates consecutive documents and the
    stream is the same however the documents were batched); ``None`` concatenates with no
    separator. The ragged tail that does not fill a whole row is dropped, so rows never contain
    padding. For next-token training pass ``seq_len + 1`` and slice inputs/targets from each row.

    Returns:
        ``int32`` array ``[n_rows, seq_len]``; ``n_rows`` may be 0 if there are too few tokens.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    stream = _concat(token_ids, eos_id)
    n = stream.size // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def _concat(token_ids: Sequence[Sequence[int]], eos_id: int | None) -> np.ndarray:
    parts: list[np.ndarray] = []
    eos = None if eos_id is None else np.array([eos_id], dtype=np.int32)
    for doc in token_ids:
        parts.append(np.asarray(doc, dtype=np.int32).reshape(-1))
        if eos is not None:
            parts.append(eos)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


class Windows(NamedTuple):
    """Evaluation windows: ``inputs[i, j]`` predicts ``targets[i, j]``, counted where ``mask``."""

    inputs: np.ndarray  # int32 [n, seq_len]
    targets: np.ndarray  # int32 [n, seq_len]
    mask: np.ndarray  # bool [n, seq_len]


def eval_windows(
    tokens: Sequence[int] | np.ndarray,
    seq_len: int,
    stride: int | None = None,
    pad_id: int = 0,
    bos_id: int | None = None,
) -> Windows:
    """Cut one long token stream into windows whose masks count every target exactly once.

    Summing per-token losses under ``mask`` and dividing by ``mask.sum()`` gives the exact
    perplexity of the whole stream: no token is dropped (the last window is padded with
    ``pad_id`` and masked out) and none is counted twice.

    Args:
        tokens: the stream, e.g. a whole validation file tokenised in one go.
        seq_len: model context per window.
        stride: start offset between windows; ``None`` (= ``seq_len``) gives non-overlapping
            windows. A smaller stride re-reads earlier tokens as context but only scores the
            targets no earlier window scored, which gives each prediction more context.
        pad_id: filler for the positions past the end of the stream.
        bos_id: if given, prepended so that the first real token is also predicted; without it
            the first token has no context and is never a target (``len(tokens) - 1`` targets).
    """
    stride = seq_len if stride is None else stride
    if seq_len < 1 or not 1 <= stride <= seq_len:
        raise ValueError(f"need seq_len >= 1 and 1 <= stride <= seq_len, got {seq_len}, {stride}")
    stream = np.asarray(tokens, dtype=np.int32).reshape(-1)
    if bos_id is not None:
        stream = np.concatenate([np.array([bos_id], dtype=np.int32), stream])
    n_targets = stream.size - 1  # target t (1-based stream index) is predicted from t-1
    if n_targets < 1:
        empty = np.zeros((0, seq_len), dtype=np.int32)
        return Windows(empty, empty.copy(), np.zeros((0, seq_len), dtype=bool))
    starts = [0]
    while starts[-1] + seq_len < n_targets:
        starts.append(starts[-1] + stride)
    padded = np.full(starts[-1] + seq_len + 1, pad_id, dtype=np.int32)
    padded[: stream.size] = stream
    idx = np.asarray(starts)[:, None] + np.arange(seq_len)[None, :]
    inputs, targets = padded[idx], padded[idx + 1]
    # Target index of window w, position j is starts[w] + j + 1; count it only if it exists and
    # lies beyond everything the previous window counted.
    prev_end = np.concatenate([[0], np.asarray(starts[:-1]) + seq_len])[:, None]
    mask = (idx + 1 > prev_end) & (idx + 1 <= n_targets)
    return Windows(inputs, targets, mask)


def iterate_windows(
    tokens: Sequence[int] | np.ndarray,
    seq_len: int,
    batch_size: int,
    stride: int | None = None,
    pad_id: int = 0,
    bos_id: int | None = None,
) -> Iterator[Windows]:
    """Yield :func:`eval_windows` in batches of exactly ``batch_size`` rows.

    The last batch is filled with fully masked rows so that a jitted evaluation step sees one
    static shape and never recompiles.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    win = eval_windows(tokens, seq_len, stride=stride, pad_id=pad_id, bos_id=bos_id)
    for lo in range(0, len(win.inputs), batch_size):
        part = [a[lo : lo + batch_size] for a in win]
        short = batch_size - len(part[0])
        if short:
            part = [np.concatenate([a, _fill(a, short, pad_id)]) for a in part]
        yield Windows(*part)


def _fill(a: np.ndarray, rows: int, pad_id: int) -> np.ndarray:
    return np.full((rows, a.shape[1]), False if a.dtype == bool else pad_id, dtype=a.dtype)
