"""How far two *XLA* computations of the same PrunePath model drift apart on real text.

Why. Routing is a hard threshold (cumulative mass < tau): a bf16 rounding difference in a hidden
state can move one token's mass across tau, that layer then reads another expert set, and the
difference grows through the later layers. So "same greedy tokens as the XLA path" cannot hold
for any second implementation with another summation order — not even for XLA's own gather path.
This script measures that floor on the real SmolLM2 (converted as in ``smollm2_decode.py``): the
masked and the gather compute paths (both XLA, same weights, same routing rule) on 8 prompts of
32 validation tokens, per tau and dtype: layers whose k per token is identical, the first
layer that differs, last-position max |Δlogit| and argmax agreement. The kernel backends' own
drift (``smollm2_decode.py``'s ``prefill_logits`` rows) is read against it.

    python scripts/routing_sensitivity.py --out results/routing_sensitivity.jsonl   # CPU, ~2 min
    python scripts/routing_sensitivity.py --checkpoint runs/smollm2-lm   # a trained model

Each row also carries the routers' mean entropy (nats, over layers and the prompts' tokens), its
fraction of log E, and the FFN sparsity of the gather pass (read the drift at matched sparsity).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from common import header, write_rows  # noqa: E402
from smollm2_decode import converted, prompts  # noqa: E402

from prunepath_jax.checkpoint import restore_model  # noqa: E402
from prunepath_jax.loading import load_any  # noqa: E402
from prunepath_jax.nn import route_args, set_compute  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--taus", nargs="+", type=float, default=[0.9, 0.5])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--checkpoint", help="a trained/converted PrunePath checkpoint instead")
    ap.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="router-fit target temperature T (default: router_init's)",
    )
    ap.add_argument("--out", default="results/routing_sensitivity.jsonl")
    a = ap.parse_args()
    head = header()
    fit = {} if a.temperature is None else {"temperature": a.temperature}
    source = a.checkpoint or (
        f"{a.model} (converted, routers fitted on {a.calib_tokens} tokens"
        + (f", T = {a.temperature:g})" if fit else ")")
    )
    for dt in a.dtypes:
        if a.checkpoint:
            restored = restore_model(a.checkpoint, dtype=getattr(jnp, dt))
            model, tok = restored.model, restored.tokenizer or load_any("default").tokenizer
        else:
            pre, model = converted(a.model, getattr(jnp, dt), a.calib_tokens, **fit)
            tok = pre.tokenizer
        x = jnp.asarray(prompts(tok, 8), jnp.int32)
        log_e = float(np.log(model.cfg.n_experts))
        for tau in a.taus:
            got = {}
            for mode in ("masked", "gather"):
                set_compute(model, mode)
                res = model(x, ffn_args=route_args(model.cfg, tau))
                lg = np.asarray(res.logits[:, -1].astype(jnp.float32))
                stats = [s for s in res.ffn_stats if s is not None]
                ent = float(np.mean([float(s.entropy_mean) for s in stats]))
                k_mean = float(np.mean([float(s.k_mean) for s in stats]))
                got[mode] = (lg, [np.asarray(s.k_t) for s in stats])
            (la, ka), (lb, kb) = got["masked"], got["gather"]
            eq = [bool(np.array_equal(u, v)) for u, v in zip(ka, kb, strict=True)]
            r = {**head, "model": source, "dtype": dt, "tau": tau,
                 "compare": "masked vs gather (both XLA)",
                 "router_entropy_mean": ent, "entropy_frac_of_uniform": ent / log_e,
                 "sparsity": 1.0 - k_mean / model.cfg.n_experts,
                 "k_t_equal_layers": sum(eq), "n_layers": len(eq),
                 "first_differing_layer": eq.index(False) if False in eq else None,
                 "max_abs_dlogit": float(np.max(np.abs(la - lb))),
                 "argmax_agree": float(np.mean(la.argmax(-1) == lb.argmax(-1)))}  # fmt: skip
            write_rows(a.out, [r])
            print(json.dumps({k: v for k, v in r.items() if k not in head}), flush=True)


if __name__ == "__main__":
    main()
