"""Instruction-SFT batches: chat-templated conversations, loss on the assistant responses only.

Part of `train.data` (which re-exports `sft_data`); see its docstring for the batch contract.
"""

from __future__ import annotations

from typing import Literal

from prunepath_jax import text

from .data import TaskData, _check_len, _load_hf, _pad_id, _rows_to_arrays, encode_texts


def response_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """Splits the rendered conversation into `(text, is_response)` pieces.

    For each assistant message i, the template of `messages[:i]` with the generation prompt ends
    where the response starts, and the template of `messages[:i + 1]` ends where it ends; both
    must be prefixes of the whole conversation's rendering (otherwise the template rewrites
    earlier turns and no consistent mask exists: ValueError). Trailing whitespace after the
    end-of-turn token is template layout and is not trained on.
    """
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    pieces, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        start = len(prompt)
        if not (full.startswith(prompt) and full.startswith(through)) or not pos <= start <= len(
            through
        ):
            raise ValueError(
                f"the chat template does not render conversations prefix-stably at message {i} "
                "(an earlier turn or the generation prompt changes when later turns are added); "
                "response spans cannot be found"
            )
        end = start + len(full[start : len(through)].rstrip())
        pieces += [(full[pos:start], False), (full[start:end], True)]
        pos = end
    pieces.append((full[pos:], False))
    return [(t, r) for t, r in pieces if t]


def _messages(row: dict, field: str, at: str) -> list[dict]:
    if field not in row:
        raise ValueError(f"{at} has no field {field!r} (fields: {', '.join(map(str, row))})")
    msgs = row[field]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{at}: field {field!r} must be a non-empty list of messages")
    for j, m in enumerate(msgs):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError(f"{at}: message {j} needs string 'role' and 'content', got {m!r}")
    return msgs


def sft_data(
    tokenizer,
    source: str = "shipped",
    split: str = "train",
    seq_len: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    *,
    field: str = "messages",
    overflow: Literal["truncate", "skip"] = "truncate",
    max_context: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> TaskData:
    """Instruction-tuning batches: chat-templated conversations, loss on responses only.

    Each piece of `response_segments` is tokenised on its own (no special tokens added; the
    template writes them) and the pieces are concatenated, so a response is tokenised exactly as
    the model would generate it after the prompt, and the trained tokens decode exactly to the
    assistant contents plus their end-of-turn token. One example per conversation, right-padded.
    Longer than `seq_len + 1` tokens: "truncate" keeps the first `seq_len + 1` if at least one
    response token remains, otherwise the example is skipped; "skip" drops it. Conversations
    without an assistant turn are dropped. All of these are counted in `info`.
    """
    _check_len("seq_len", seq_len, max_context)
    if overflow not in ("truncate", "skip"):
        raise ValueError(f"overflow must be 'truncate' or 'skip', got {overflow!r}")
    if source in ("shipped", "default"):
        path = text.corpus_path(f"sft_{split}")
        rows, where = text.read_jsonl(path), str(path)
    elif text._looks_like_path(source):
        rows, where = text.read_jsonl(source), source
    else:
        rows, where = [dict(r) for r in _load_hf(source, split)], f"{source} [{split}]"
    convs, n_no_reply = [], 0
    for i, row in enumerate(rows):
        msgs = _messages(row, field, f"{where}: row {i + 1}")
        if any(m["role"] == "assistant" for m in msgs):
            convs.append(msgs)
        else:
            n_no_reply += 1
    segs = [response_segments(tokenizer, m) for m in convs]
    flat = [t for s in segs for t, _ in s]
    flat_ids, _ = encode_texts(tokenizer, flat, add_special_tokens=False) if flat else ([], [])
    examples, n_trunc, n_skip, k = [], 0, 0, 0
    for s in segs:
        ids, resp = [], []
        for _, is_resp in s:
            ids += flat_ids[k]
            resp += [float(is_resp)] * len(flat_ids[k])
            k += 1
        if len(ids) > seq_len + 1:
            if overflow == "skip" or sum(resp[1 : seq_len + 1]) == 0:
                n_skip += 1
                continue
            ids, resp, n_trunc = ids[: seq_len + 1], resp[: seq_len + 1], n_trunc + 1
        if sum(resp[1:]) == 0:
            n_skip += 1
            continue
        examples.append({"ids": ids[:-1], "targets": ids[1:], "loss": resp[1:]})
    if not examples:
        raise ValueError(
            f"empty dataset: no usable conversation in {where} ({len(rows)} rows: "
            f"{n_no_reply} without an assistant turn, {n_skip} too long for seq_len {seq_len})"
        )
    info = {"n_conversations": len(rows), "n_no_assistant": n_no_reply, "n_truncated": n_trunc,
            "n_skipped_long": n_skip, "pad_id": _pad_id(tokenizer)}  # fmt: skip
    arrays = _rows_to_arrays(examples, seq_len, _pad_id(tokenizer))
    info["n_loss_tokens"] = int(arrays["loss_mask"].sum())
    config = {"seq_len": seq_len, "field": field, "overflow": overflow}
    return TaskData(
        "sft", arrays, batch_size=batch_size, seed=seed, process_index=process_index,
        process_count=process_count, config=config, info=info, where=where,
    )  # fmt: skip
