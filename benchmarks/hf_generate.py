"""The peer users would otherwise run: Hugging Face transformers' torch `generate` on the GPU,
same shapes as `decode.py` (random bf16 weights), eager (dynamic cache) and static cache.

Decode tokens/s is measured as (N2 - N1) / (t(N2) - t(N1)) from two greedy generations with a
forced length, so prefill and launch set-up cancel out.

    python benchmarks/hf_generate.py --shapes smollm2-135m llama-3.2-1b llama-3-8b
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prunepath_jax.config import PRESETS  # noqa: E402


def hf_config(cfg) -> LlamaConfig:
    rope = None
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope = {
            "rope_type": rs.kind,
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position,
        }
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        rope_theta=cfg.rope_theta,
        rope_scaling=rope,
        tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=cfg.max_position,
    )


def timed_generate(model, ids, n, cache_impl):
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    if cache_impl:
        kw["cache_implementation"] = cache_impl
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["smollm2-135m"], choices=sorted(PRESETS))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--n1", type=int, default=32)
    ap.add_argument("--n2", type=int, default=160)
    ap.add_argument("--out", default="results/hf_generate.jsonl")
    a = ap.parse_args()
    rows = []
    torch.set_default_dtype(torch.bfloat16)
    for name in a.shapes:
        with torch.device("cuda"):
            model = LlamaForCausalLM(hf_config(PRESETS[name])).eval()
        ids = torch.randint(0, PRESETS[name].vocab_size, (1, a.prompt_len), device="cuda")
        for mode in ("eager", "static"):
            impl = "static" if mode == "static" else None
            with torch.no_grad():
                timed_generate(model, ids, a.n1, impl)  # warm-up / compile
                timed_generate(model, ids, a.n2, impl)
                t1 = timed_generate(model, ids, a.n1, impl)
                t2 = timed_generate(model, ids, a.n2, impl)
            tok_s = (a.n2 - a.n1) / (t2 - t1)
            row = {"shape": name, "mode": mode, "decode_tok_s": tok_s, "us_per_token": 1e6 / tok_s}
            row["torch"] = torch.__version__
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
