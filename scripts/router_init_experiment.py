"""Perplexity vs realised FFN sparsity on SmolLM2-135M-Instruct: zero router vs fitted router.

Converts the real model (G = 32, E = 48 experts per layer) once per gate mode, fits the routers
training-free (`prunepath_jax.router_init`) on shipped train text, and measures perplexity on
shipped validation text at τ values chosen to hit target sparsities. The zero router (uniform
p: the first k experts by index, a static pruning) and the dense model are the references.

τ per target sparsity: the realised sparsity of a fitted router depends on the input, so τ is
interpolated from a τ grid measured on a few *train* windows not used for calibration (the
deployable procedure); the table reports the sparsity realised on the validation text. The zero
router's sparsity is input-independent: τ = (k + 0.5)/E gives exactly k experts.

Usage (CPU, ~20-30 min on 2 shared cores):
    PRUNEPATH_CACHE=/tmp/ppcache python scripts/router_init_experiment.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prunepath_jax import router_init
from prunepath_jax.config import PrunePathConfig
from prunepath_jax.convert import to_prunepath
from prunepath_jax.loading import load_pretrained
from prunepath_jax.nn import route_args
from prunepath_jax.text import Windows, eval_windows, pack_tokens, read_texts

ROOT = Path(__file__).resolve().parents[1]


@nnx.jit
def _nll_step(model, inputs_bt, targets_bt, mask_bt, tau):
    """Masked NLL sum, token count and Σ k/E over layers and real tokens, for one batch."""
    mask = mask_bt.astype(jnp.float32)
    args = None if model.cfg.prunepath is None else route_args(model.cfg, tau, mask)
    out = model(inputs_bt, ffn_args=args)
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
    nll_bt = -jnp.take_along_axis(logp, targets_bt[..., None], axis=-1)[..., 0]
    frac = jnp.float32(0.0)
    if args is not None:
        e = model.cfg.d_ff // model.cfg.prunepath.group_size
        frac = sum(jnp.sum(s.k_t * mask) for s in out.ffn_stats) / (e * len(out.ffn_stats))
    return jnp.sum(nll_bt * mask), jnp.sum(mask), frac


def evaluate(model, windows, tau: float, batch: int) -> dict:
    """Perplexity and realised sparsity (1 − mean k/E over layers and scored tokens)."""
    nll = n = kfrac = 0.0
    for lo in range(0, len(windows.inputs), batch):
        sl = slice(lo, lo + batch)
        a, b, c = _nll_step(
            model,
            jnp.asarray(windows.inputs[sl]),
            jnp.asarray(windows.targets[sl]),
            jnp.asarray(windows.mask[sl]),
            jnp.float32(tau),
        )
        nll, n, kfrac = nll + float(a), n + float(b), kfrac + float(c)
    sparsity = 0.0 if model.cfg.prunepath is None else 1.0 - kfrac / n
    return {"ppl": float(np.exp(nll / n)), "sparsity": sparsity, "tokens": int(n)}


def tau_for_sparsity(model, probe, targets, grid, batch) -> list[float]:
    """τ per target sparsity, interpolated on a τ grid measured on `probe` windows."""
    s = np.array([evaluate(model, probe, t, batch)["sparsity"] for t in grid])
    order = np.argsort(s)  # sparsity falls as τ grows
    return [float(np.interp(target, s[order], np.asarray(grid)[order])) for target in targets]


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True)
        return out.stdout.decode().strip()
    except OSError:
        return "unknown"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--probe-windows", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument(
        "--extra-temperature", type=float, nargs="*", default=[1.0], help="gate none only"
    )
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--gates", nargs="+", default=["none", "sigmoid"])
    ap.add_argument("--no-shift", action="store_true", help="also fit sigmoid without a shift")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "results" / "router_init.jsonl"))
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    pre = load_pretrained("default", progress=False)
    tok, dense = pre.tokenizer, pre.model
    ids = [tok.encode(d, add_special_tokens=False) for d in read_texts("shipped", "train")]
    rows = pack_tokens(ids, args.seq_len + 1, tok.eos_id)  # +1: probe rows need their targets
    pick = np.random.default_rng(args.seed).permutation(len(rows))
    n_cal = args.calib_tokens // args.seq_len
    calib = rows[pick[:n_cal], :-1]
    probe_rows = rows[pick[n_cal : n_cal + args.probe_windows]]
    probe = Windows(probe_rows[:, :-1], probe_rows[:, 1:], np.ones_like(probe_rows[:, 1:], bool))
    val_ids = [tok.encode(d, add_special_tokens=False) for d in read_texts("shipped", "validation")]
    stream = np.concatenate([np.asarray(v + [tok.eos_id], np.int32) for v in val_ids])
    stream = stream[: args.eval_tokens + 1]
    win = eval_windows(stream, args.seq_len)
    batches = [(calib[i : i + args.batch], None) for i in range(0, n_cal, args.batch)]

    results = []

    def record(name, gate, tau, r, target=None):
        row = {"router": name, "gate": gate, "tau": tau, "target_sparsity": target, **r}
        results.append(row)
        print(
            f"{name:>22s} {gate:>8s} tau={tau:6.4f} sparsity={r['sparsity']:.3f} "
            f"ppl={r['ppl']:.3f}",
            flush=True,
        )

    record("dense", "-", float("nan"), evaluate(dense, win, 1.0, args.batch))
    e = dense.cfg.d_ff // args.group_size
    models = {}
    for gate in args.gates:
        models[gate], _ = to_prunepath(
            dense, PrunePathConfig(group_size=args.group_size, gate=gate), progress=False
        )
    zero_taus = [(round((1 - s) * e) + 0.5) / e for s in args.sparsity]
    for gate, model in models.items():
        for s, tau in zip(args.sparsity, zero_taus, strict=True):
            record("zero", gate, tau, evaluate(model, win, tau, args.batch), s)
        if gate == "sigmoid":
            record("zero", gate, 1.05, evaluate(model, win, 1.05, args.batch))

    t0 = time.perf_counter()
    first = next(iter(models.values()))
    xs = router_init.capture_ffn_inputs(first, batches)
    t_capture = time.perf_counter() - t0
    print(f"capture: {len(xs[0])} tokens x {len(xs)} layers in {t_capture:.1f}s", flush=True)
    t_main = args.temperature
    variants = [(g, "auto" if g == "sigmoid" else None, t_main) for g in args.gates]
    if args.no_shift and "sigmoid" in args.gates:
        variants.append(("sigmoid", None, t_main))
    if "none" in args.gates:
        variants += [("none", None, t) for t in args.extra_temperature if t != t_main]
    reports = {}
    grid = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95]
    for gate, shift, temp in variants:
        model = nnx.clone(models[gate])
        name = f"fitted T={temp:g}" + (
            "" if gate == "none" else " +shift" if shift else " no shift"
        )
        model, rep = router_init.fit_routers(
            model,
            xs,
            steps=args.steps,
            lr=args.lr,
            temperature=temp,
            gate_shift=shift,
            seed=args.seed,
        )
        rep["seconds"]["capture"] = t_capture
        reports[name] = rep
        summ = router_init.summarise(rep)
        print(f"{name}: fit {rep['seconds']['fit']:.1f}s {json.dumps(summ)}", flush=True)
        taus = tau_for_sparsity(model, probe, args.sparsity, grid, args.batch)
        for s, tau in zip(args.sparsity, taus, strict=True):
            record(name, gate, tau, evaluate(model, win, tau, args.batch), s)
        record(name, gate, 1.05, evaluate(model, win, 1.05, args.batch))

    print("\n| router | gate | target s | tau | realised s | ppl |\n|---|---|---|---|---|---|")
    for r in results:
        ts = "-" if r["target_sparsity"] is None else f"{r['target_sparsity']:.2f}"
        print(
            f"| {r['router']} | {r['gate']} | {ts} | {r['tau']:.4f} | {r['sparsity']:.3f} "
            f"| {r['ppl']:.3f} |"
        )
    row = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "command": " ".join(["scripts/router_init_experiment.py", *(argv or sys.argv[1:])]),
        "host": f"{os.uname().machine} {os.cpu_count()} cpus",
        "model": "SmolLM2-135M-Instruct (default)",
        "options": vars(args),
        "calib_tokens": int(len(xs[0])),
        "eval_tokens": results[0]["tokens"],
        "results": results,
        "router_init": {
            k: {
                "summary": router_init.summarise(v),
                "seconds": v["seconds"],
                "layers": [
                    {
                        f: lr[f]
                        for f in (
                            "ce_before",
                            "ce_after",
                            "ce_after_heldout",
                            "top1_agreement",
                            "k90",
                            "gate_shift",
                            "k_mean",
                            "err_none",
                            "err_before",
                        )
                        if f in lr
                    }
                    for lr in v["layers"]
                ],
            }
            for k, v in reports.items()
        },  # fmt: skip
        "seconds": time.perf_counter() - t_start,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"appended to {args.out}; total {row['seconds']:.0f}s")


if __name__ == "__main__":
    main()
