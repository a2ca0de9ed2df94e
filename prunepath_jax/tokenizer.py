"""Tokenizer: a `tokenizers.Tokenizer` plus the bits of `tokenizer_config.json` generation needs
(special tokens, BOS handling, the Jinja chat template). No transformers at run time."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


def _token_str(v) -> str | None:
    if isinstance(v, dict):  # AddedToken serialised as a dict
        return v.get("content")
    return v


class Tokenizer:
    """Encode/decode text and render chat prompts."""

    def __init__(self, tok: _HFTokenizer, config: dict | None = None):
        self.tok = tok
        self.config = dict(config or {})
        self.chat_template: str | None = self.config.get("chat_template")
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.pad_token = _token_str(self.config.get("pad_token"))
        self.add_bos = bool(self.config.get("add_bos_token", False))
        self.bos_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        pad = self.tok.token_to_id(self.pad_token) if self.pad_token else None
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> Tokenizer:
        d = Path(directory)
        if not (d / "tokenizer.json").exists():
            raise FileNotFoundError(f"{d}: no tokenizer.json")
        config = {}
        if (d / "tokenizer_config.json").exists():
            config = json.loads((d / "tokenizer_config.json").read_text())
        if "chat_template" not in config and (d / "chat_template.jinja").exists():
            config["chat_template"] = (d / "chat_template.jinja").read_text()
        return cls(_HFTokenizer.from_file(str(d / "tokenizer.json")), config)

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        self.tok.save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None:
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Renders `messages` with the checkpoint's Jinja chat template (as transformers does)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; pass plain text instead")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise jinja2.exceptions.TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        template = env.from_string(self.chat_template)
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def stop_ids(self, extra: tuple[int, ...] = ()) -> tuple[int, ...]:
        """Token ids that end generation: the EOS token, plus `extra` (the model config's)."""
        ids = set(extra)
        if self.eos_id is not None:
            ids.add(self.eos_id)
        return tuple(sorted(ids))
