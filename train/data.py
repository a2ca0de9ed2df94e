"""Deterministic, resumable training batches for causal LM, classification and instruction SFT.

Every task is turned once, up front, into fixed-shape per-example arrays (tokenising is the slow
part and must not depend on the batch order); the iterator then only permutes and slices them. So
the batch at (seed, epoch, step) is a pure function of the data and the configuration, which is
what makes the state tiny (`{seed, epoch, step}` plus a fingerprint) and a resumed run's batches
equal an uninterrupted run's.

The batch contract (the train step relies on it exactly): every batch is a dict of numpy arrays

* ``tokens`` int32 ``[B, T]``; ``targets`` int32 ``[B, T]`` (next-token targets; 0 for cls);
* ``loss_mask`` float32 ``[B, T]`` (lm: every position; sft: only the assistant responses with
  their end-of-turn token; cls: 0); ``token_mask`` float32 ``[B, T]`` (1 real token, 0 padding);
* ``labels`` int32 ``[B]`` (cls label, else 0); ``last_index`` int32 ``[B]`` (last real token);
* classification with a text pair also has ``token_types`` int32 ``[B, T]`` (BERT segment ids).

``B`` is this process's share, ``global_batch // process_count`` rows: every process computes the
same global order and keeps its own contiguous slice, so hosts read disjoint data. One-pass
evaluation batches (`eval_batches`) add ``example_mask`` float32 ``[B]`` (0 on filler rows).

Shuffling uses ``numpy.random.default_rng((seed, epoch))``; numpy keeps that stream stable within
a version, so resume on the same environment (the fingerprint does not cover numpy itself).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np

from prunepath_jax import text

BATCH_KEYS = ("tokens", "targets", "loss_mask", "token_mask", "labels", "last_index")
STATE_VERSION = 1
TASKS = ("lm", "cls", "sft")


class TaskData:
    """An infinite, deterministic, resumable iterator over fixed-shape batches of one dataset.

    Attributes:
        kind: "lm", "cls" or "sft".
        arrays: per-example arrays (leading dimension `n_examples`), the batch keys.
        batch_size: the global batch (all processes together).
        local_batch: rows this process gets per batch.
        info: what was built (counts of truncated/skipped examples, n_labels, label names...).
        fingerprint: sha256 of the data and the configuration; a saved state must carry it.
    """

    def __init__(
        self,
        kind: str,
        arrays: dict[str, np.ndarray],
        *,
        batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        config: dict,
        info: dict | None = None,
        where: str = "",
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index ({process_index}) < process_count "
                             f"({process_count})")  # fmt: skip
        if batch_size % process_count:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by process_count {process_count}: "
                "every process must feed the same number of rows"
            )
        n = len(arrays["tokens"])
        if n == 0:
            raise ValueError(f"empty dataset: no usable example in {where or kind}")
        if n < batch_size:
            raise ValueError(
                f"{where or kind} has {n} examples, fewer than one batch of {batch_size}"
            )
        self.kind, self.arrays, self.seed = kind, arrays, int(seed)
        self.batch_size, self.process_index, self.process_count = (
            batch_size,
            process_index,
            (process_count),
        )
        self.local_batch = batch_size // process_count
        self.config = {"kind": kind, "batch_size": batch_size, **config}
        self.info = dict(info or {})
        self.fingerprint = _fingerprint(self.config, arrays)
        self.epoch, self.step = 0, 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    def with_seed(self, seed: int) -> TaskData:
        """The same examples in another shuffle, from the start, without tokenizing again (e.g.
        calibration batches that must not move this iterator)."""
        own = {k: v for k, v in self.config.items() if k not in ("kind", "batch_size")}
        return TaskData(self.kind, self.arrays, batch_size=self.batch_size, seed=seed,
                        process_index=self.process_index, process_count=self.process_count,
                        config=own, info=self.info)  # fmt: skip

    @property
    def n_examples(self) -> int:
        return len(self.arrays["tokens"])

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch; the shuffled remainder of each epoch is dropped."""
        return self.n_examples // self.batch_size

    @property
    def seq_len(self) -> int:
        return self.arrays["tokens"].shape[1]

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's example order, a pure function of (seed, epoch)."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            rng = np.random.default_rng((self.seed, epoch))
            self._order_cache = (epoch, rng.permutation(self.n_examples))
        return self._order_cache[1]

    def _rows(self, global_idx: np.ndarray) -> np.ndarray:
        lo = self.process_index * self.local_batch
        return global_idx[lo : lo + self.local_batch]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = self.batch_size
        idx = self.order(self.epoch)[self.step * b : (self.step + 1) * b]
        batch = {k: v[self._rows(idx)] for k, v in self.arrays.items()}
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch

    def get_state(self) -> dict:
        """JSON-serialisable position; the same for every process (it holds no process index)."""
        return {
            "version": STATE_VERSION,
            "kind": self.kind,
            "fingerprint": self.fingerprint,
            "seed": self.seed,
            "epoch": self.epoch,
            "step": self.step,
            "batches_seen": self.epoch * self.steps_per_epoch + self.step,
        }

    def set_state(self, state: dict) -> None:
        """Continues from `state`; raises ValueError if it belongs to other data or settings."""
        if not isinstance(state, dict):
            raise ValueError(f"data state must be a dict, got {type(state).__name__}")
        missing = [k for k in ("version", "kind", "fingerprint", "seed", "epoch", "step")
                   if k not in state]  # fmt: skip
        if missing:
            raise ValueError(f"data state is missing {missing}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"data state version {state['version']} != {STATE_VERSION}")
        if state["kind"] != self.kind:
            raise ValueError(f"data state is for task {state['kind']!r}, this is {self.kind!r}")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                "data state does not belong to this dataset: its fingerprint differs (the data, "
                "tokenizer, seq_len/max_len, batch_size or fields changed since it was saved)"
            )
        if state["seed"] != self.seed:
            raise ValueError(f"data state has seed {state['seed']}, this iterator {self.seed}")
        epoch, step = state["epoch"], state["step"]
        if not (isinstance(epoch, int) and epoch >= 0):
            raise ValueError(f"data state epoch must be an int >= 0, got {epoch!r}")
        if not (isinstance(step, int) and 0 <= step < self.steps_per_epoch):
            raise ValueError(
                f"data state step must be in [0, {self.steps_per_epoch}), got {step!r}"
            )
        self.epoch, self.step = epoch, step

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """One pass in data order (no shuffle), every example once, this process's rows.

        The last batch is filled with all-padding rows so a jitted evaluation sees one shape;
        ``example_mask`` is 0 on them (and their token/loss masks are 0). Does not move the
        training position.
        """
        n, b = self.n_examples, self.batch_size
        for lo in range(0, n, b):
            idx = np.arange(lo, lo + b)
            rows = self._rows(idx)
            valid = rows < n
            src = np.where(valid, rows, 0)
            batch = {k: v[src].copy() for k, v in self.arrays.items()}
            fill = ~valid
            if fill.any():
                for k, v in batch.items():
                    v[fill] = self.info.get("pad_id", 0) if k == "tokens" else 0
            batch["example_mask"] = valid.astype(np.float32)
            yield batch


def _fingerprint(config: dict, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------- tokenising


def _plain_hf(tokenizer, max_len: int | None = None):
    """A copy of the `tokenizers.Tokenizer` inside `tokenizer` with padding off and truncation at
    `max_len` (or off). Some shipped tokenizer.json files enable fixed padding/truncation (the
    MiniLM one pads every encoding to 128), which must not leak into training data; the caller's
    tokenizer is never modified. None when `tokenizer` wraps no `tokenizers.Tokenizer`."""
    raw = getattr(tokenizer, "tok", None)
    if raw is None or not hasattr(raw, "to_str"):
        return None
    from tokenizers import Tokenizer as HFTokenizer

    copy = HFTokenizer.from_str(raw.to_str())
    copy.no_padding()
    if max_len is None:
        copy.no_truncation()
    else:
        copy.enable_truncation(max_length=max_len, strategy="longest_first")
    return copy


def encode_texts(
    tokenizer,
    texts: Sequence[str],
    *,
    pairs: Sequence[str] | None = None,
    add_special_tokens: bool = True,
    max_len: int | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids (and segment ids) of many texts, as `tokenizer.encode` would give them.

    Special tokens come from the tokenizer's post-processor ([CLS] a [SEP] b [SEP] for BERT) and,
    like `Tokenizer.encode`, a BOS when `add_bos` is set and missing. Truncation to `max_len`
    keeps the special tokens (longest-first between the two texts of a pair).
    """
    add_bos = add_special_tokens and getattr(tokenizer, "add_bos", False)
    bos = getattr(tokenizer, "bos_id", None)
    extra = 1 if add_bos and bos is not None else 0
    raw = _plain_hf(tokenizer, None if max_len is None else max_len - extra)
    if raw is None:  # any object with encode(text, add_special_tokens=...)
        if pairs is not None:
            raise ValueError("text pairs need a tokenizer wrapping a `tokenizers.Tokenizer`")
        ids = [list(tokenizer.encode(t, add_special_tokens=add_special_tokens)) for t in texts]
        ids = [i[:max_len] if max_len else i for i in ids]
        return ids, [[0] * len(i) for i in ids]
    inputs = list(texts) if pairs is None else list(zip(texts, pairs, strict=True))
    encs = raw.encode_batch(inputs, add_special_tokens=add_special_tokens)
    ids, types = [], []
    for e in encs:
        i, t = list(e.ids), list(e.type_ids)
        if extra and (not i or i[0] != bos):
            i, t = [bos, *i], [0, *t]
        ids.append(i)
        types.append(t)
    return ids, types


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_id", None)
    return 0 if pad is None else int(pad)


def _check_len(name: str, value: int, max_context: int | None) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if max_context is not None and value > max_context:
        raise ValueError(f"{name} {value} is larger than the model's context {max_context}")


def _rows_to_arrays(rows: list[dict], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Ragged examples {"ids", "targets", "loss", "types", "label"} -> padded batch arrays."""
    n = len(rows)
    out = {
        "tokens": np.full((n, seq_len), pad_id, np.int32),
        "targets": np.zeros((n, seq_len), np.int32),
        "loss_mask": np.zeros((n, seq_len), np.float32),
        "token_mask": np.zeros((n, seq_len), np.float32),
        "labels": np.zeros((n,), np.int32),
        "last_index": np.zeros((n,), np.int32),
    }
    with_types = any("types" in r for r in rows)
    if with_types:
        out["token_types"] = np.zeros((n, seq_len), np.int32)
    for i, r in enumerate(rows):
        m = len(r["ids"])
        out["tokens"][i, :m] = r["ids"]
        out["token_mask"][i, :m] = 1.0
        out["last_index"][i] = m - 1
        if "targets" in r:
            out["targets"][i, :m] = r["targets"]
            out["loss_mask"][i, :m] = r["loss"]
        if "label" in r:
            out["labels"][i] = r["label"]
        if with_types:
            out["token_types"][i, :m] = r["types"]
    return out


# ------------------------------------------------------------------------------- causal LM


def lm_data(
    tokenizer,
    source: str = "shipped",
    split: str = "train",
    seq_len: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    *,
    field: str = "text",
    max_context: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> TaskData:
    """Causal-LM batches: documents tokenised once, packed into windows of `seq_len + 1`.

    Documents come from `text.read_texts` (the shipped corpus, a .txt/.jsonl file, or a Hugging
    Face dataset name), are tokenised without special tokens and joined with EOS after each (the
    same stream `eval.sweep.tokenize_stream` scores). Windows do not overlap and have no padding:
    `tokens = w[:-1]`, `targets = w[1:]`, every position counts.
    """
    _check_len("seq_len", seq_len, max_context)
    docs = text.read_texts(source, split=split, field=field)
    ids, _ = encode_texts(tokenizer, docs, add_special_tokens=False)
    windows = text.pack_tokens(ids, seq_len + 1, getattr(tokenizer, "eos_id", None))
    n = len(windows)
    arrays = {
        "tokens": np.ascontiguousarray(windows[:, :-1]),
        "targets": np.ascontiguousarray(windows[:, 1:]),
        "loss_mask": np.ones((n, seq_len), np.float32),
        "token_mask": np.ones((n, seq_len), np.float32),
        "labels": np.zeros((n,), np.int32),
        "last_index": np.full((n,), seq_len - 1, np.int32),
    }
    n_tokens = int(sum(len(i) for i in ids) + len(ids))
    info = {"n_documents": len(docs), "n_tokens": n_tokens, "n_tokens_used": n * (seq_len + 1)}
    info["pad_id"] = _pad_id(tokenizer)
    where = f"{source} [{split}] ({n_tokens} tokens, windows of {seq_len + 1})"
    return TaskData(
        "lm", arrays, batch_size=batch_size, seed=seed, process_index=process_index,
        process_count=process_count, config={"seq_len": seq_len, "field": field}, info=info,
        where=where,
    )  # fmt: skip


# ------------------------------------------------------------------------------- loading


def _load_hf(name: str, split: str):
    from prunepath_jax.text import load_hf_dataset

    return load_hf_dataset(name, split)


def make_data(
    task: Literal["lm", "cls", "sft"],
    tokenizer,
    source: str = "shipped",
    split: str = "train",
    *,
    seq_len: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    max_context: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    **task_kwargs,
) -> TaskData:
    """One entry point for the three tasks (`seq_len` is the classification `max_len`)."""
    common = dict(
        batch_size=batch_size, seed=seed, max_context=max_context, process_index=process_index,
        process_count=process_count, **task_kwargs,
    )  # fmt: skip
    if task == "lm":
        return lm_data(tokenizer, source, split, seq_len, **common)
    if task == "cls":
        from .classification import classification_data

        return classification_data(tokenizer, source, split, max_len=seq_len, **common)
    if task == "sft":
        from .sft import sft_data

        return sft_data(tokenizer, source, split, seq_len, **common)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def __getattr__(name: str):
    """`sft_data` and `response_segments` live in `train/sft.py` (chat-template span finding),
    `classification_data` and `GLUE_TASKS` in `train/classification.py`; they are served from
    here lazily, so the three tasks share one import without an import cycle."""
    if name in ("sft_data", "response_segments"):
        from . import sft

        return getattr(sft, name)
    if name in ("classification_data", "GLUE_TASKS"):
        from . import classification

        return getattr(classification, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
