"""Issue 4's quality table: PrunePath training vs the baselines a user would otherwise pick.

Trains, with the same data, steps and optimiser, (1) PrunePath (progressive tau schedule to
`--tau`), (2) a static top-k MoEfication model (k = `--static-k` experts per token throughout),
(3) the dense model (fine-tuning baseline); and evaluates, on held-out text (LM) or held-out
passages (classification), (4) the fast training-free initialisation alone and (5) the dense
fine-tuned model converted afterwards (experts + router init, no further training). Every
PrunePath-structured model is swept over tau and static k; the table reports each method at
25/50/75% FFN sparsity (tau curves interpolated linearly in sparsity on log-perplexity or
accuracy; static k is exact at k = 36/24/12 of 48).

    python scripts/train_quality.py lm  --source default --steps 60 240 100 --out results/quality
    python scripts/train_quality.py cls --source minilm  --steps 30 120 30  --out results/quality
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

TARGETS = (0.25, 0.5, 0.75)
TAUS = (1.05, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


def interpolate(rows: list[dict], metric: str, log: bool) -> dict[float, float | None]:
    """Metric at each target sparsity from a tau curve (None outside the measured range)."""
    pts = sorted((r["sparsity"], r[metric]) for r in rows if r["setting"] == "tau")
    s = np.array([p[0] for p in pts])
    v = np.array([p[1] for p in pts], np.float64)
    v = np.log(v) if log else v
    out = {}
    for t in TARGETS:
        if len(s) < 2 or t < s.min() - 1e-9 or t > s.max() + 1e-9:
            out[t] = None
        else:
            x = float(np.interp(t, s, v))
            out[t] = float(np.exp(x)) if log else x
    return out


def static_points(rows: list[dict], metric: str, e: int) -> dict[float, float | None]:
    by_k = {r["k"]: r[metric] for r in rows if r["setting"] == "static_k"}
    return {t: by_k.get(round((1 - t) * e)) for t in TARGETS}


def teal_points(rows: list[dict], metric: str) -> dict[float, float | None]:
    """TEAL's rows (magnitude thresholds calibrated to each target, no router) by target."""
    from prunepath_jax.eval.sweep import teal_label

    by_label = {r["label"]: r[metric] for r in rows if r["setting"] == "teal"}
    return {t: by_label.get(teal_label(t)) for t in TARGETS}


def record(table, out_dir, prefix, method, rows, metric, log, dense):
    """Appends `method`'s rows at each target sparsity to `table` (tau curve interpolated,
    static k exact, TEAL where the sweep ran it) and writes its raw sweep rows to
    `<out_dir>/<prefix>_<method>.jsonl`."""
    curve = interpolate(rows, metric, log=log)
    static = static_points(rows, metric, rows[-1]["n_experts"])
    teal = teal_points(rows, metric)
    short = "ppl" if metric == "ppl" else "acc"
    for t in TARGETS:
        table.append({"method": method, "target_sparsity": t, f"{short}_tau": curve[t],
                      f"{short}_static_k": static[t], f"{short}_teal": teal[t],
                      f"dense_{short}": dense})  # fmt: skip
    (Path(out_dir) / f"{prefix}_{method.split()[0]}.jsonl").write_text(
        "".join(json.dumps(r, default=str) + "\n" for r in rows)
    )


def train_cfg(a, name: str, **kw):
    from prunepath_jax.train.config import TrainConfig

    w, d, h = a.steps
    base = dict(
        source=a.source, out_dir=str(Path(a.work) / f"{a.task}_{name}"), task=a.task,
        data="shipped", seq_len=a.seq_len, batch_size=a.batch, warmup_steps=w, decay_steps=d,
        hold_steps=h, tau_target=a.tau, router_init_tokens=a.init_tokens,
        compute_dtype=a.compute, save_every=10**6, keep=1, eval_every=0, tensorboard=False,
        progress=False, gate=a.gate, lr_backbone=a.lr_backbone,
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


def train_all(a) -> dict[str, dict]:
    from prunepath_jax.train.loop import run

    k = a.static_k
    plan = {
        "prunepath": {},
        "static_topk": {"sparse": "static_topk", "static_k": k},
        "dense_ft": {"sparse": "dense", "router_init_tokens": 0},
    }
    done = {}
    for name, kw in plan.items():
        cfg = train_cfg(a, name, **kw)
        t0 = time.perf_counter()
        summary = run(cfg, report=print)
        summary["seconds"] = time.perf_counter() - t0
        print(f"[{name}] trained {summary['step']} steps in {summary['seconds']:.0f} s: "
              f"{summary['last']}", flush=True)  # fmt: skip
        done[name] = {"out_dir": cfg.out_dir, "seconds": summary["seconds"],
                      "last": summary["last"]}  # fmt: skip
    return done


def convert_with_init(model, tok, a, task_data=None):
    """Experts + training-free router init (what `prunepath convert --init-routers` does)."""
    from prunepath_jax.config import PrunePathConfig
    from prunepath_jax.convert import to_prunepath
    from prunepath_jax.router_init import init_routers

    pp, _ = to_prunepath(model, PrunePathConfig(32, "paper", a.gate), progress=False)
    if task_data is None:
        from prunepath_jax.demo import calibration_batches

        batches = calibration_batches(tok, a.init_tokens)
    else:
        batches = [(b["tokens"], b["token_mask"]) for b in task_data.eval_batches()]
    pp, _ = init_routers(pp, batches, max_tokens=a.init_tokens, seed=0)
    return pp


def evaluate_lm_all(a, trained) -> list[dict]:
    from prunepath_jax.checkpoint import restore_model
    from prunepath_jax.demo import calibration_batches
    from prunepath_jax.eval.sweep import sweep
    from prunepath_jax.loading import load_any

    src = load_any(a.source, progress=False)
    tok = src.tokenizer
    kw = dict(seq_len=512, batch_size=8, max_tokens=a.eval_tokens, progress=False)
    # TEAL (the training-free baseline users pick) on the dense weights, calibrated on the
    # training text that initialises the routers
    teal = dict(teal=TARGETS, teal_calib=list(calibration_batches(tok, a.init_tokens)))
    table = []

    t0 = time.perf_counter()

    def add(method, rows, dense_ppl=None):
        record(table, a.out, "lm", method, rows, "ppl", True, dense_ppl)
        print(f"[eval] {method}: {len(rows)} rows, {time.perf_counter() - t0:.0f} s", flush=True)

    ks = (36, 24, 12)
    base = sweep(convert_with_init(src.model, tok, a), tok, taus=a.taus, static_k=ks,
                 reference=src.model, out_dir=Path(a.work) / "sw_init", **teal, **kw)  # fmt: skip
    base_dense = base[0]["ppl"]
    add("init_only (training-free)", base, base_dense)
    for name in ("prunepath", "static_topk"):
        m = restore_model(trained[name]["out_dir"]).model
        rows = sweep(m, tok, taus=a.taus, static_k=ks, out_dir=Path(a.work) / f"sw_{name}", **kw)
        add(f"{name} (trained)", rows)
    ft = restore_model(trained["dense_ft"]["out_dir"]).model
    rows = sweep(convert_with_init(ft, tok, a), tok, taus=a.taus, static_k=ks, reference=ft,
                 out_dir=Path(a.work) / "sw_ft", **teal, **kw)  # fmt: skip
    add("dense_ft + conversion (post-hoc)", rows, rows[0]["ppl"])
    table.append({"method": "dense (original)", "target_sparsity": 0.0, "dense_ppl": base_dense})
    table.append({"method": "dense_ft", "target_sparsity": 0.0, "dense_ppl": rows[0]["ppl"]})
    return table


def evaluate_cls_all(a, trained) -> list[dict]:
    from prunepath_jax.checkpoint import restore_model
    from prunepath_jax.eval.classify import classification_sweep, evaluate_classification
    from prunepath_jax.train.data import make_data

    table = []
    ft = restore_model(trained["dense_ft"]["out_dir"])
    tok = ft.tokenizer
    val = make_data("cls", tok, "shipped", "validation", seq_len=a.seq_len, batch_size=a.batch)
    train = make_data("cls", tok, "shipped", "train", seq_len=a.seq_len, batch_size=a.batch)
    ks = (36, 24, 12)
    dense_acc = evaluate_classification(ft.model, list(val.eval_batches()))["accuracy"]

    def add(method, rows):
        record(table, a.out, "cls", method, rows, "accuracy", False, dense_acc)

    post = convert_with_init(ft.model, tok, a, task_data=train)
    add("dense_ft + conversion (post-hoc)",
           classification_sweep(post, val, a.taus, static_k=ks, out_dir=Path(a.work) / "c_ft",
                                progress=False))  # fmt: skip
    for name in ("prunepath", "static_topk"):
        m = restore_model(trained[name]["out_dir"]).model
        add(f"{name} (trained)",
               classification_sweep(m, val, a.taus, static_k=ks, progress=False,
                                    out_dir=Path(a.work) / f"c_{name}"))  # fmt: skip
    table.append({"method": "dense_ft", "target_sparsity": 0.0, "dense_acc": dense_acc})
    return table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", choices=["lm", "cls"])
    ap.add_argument("--source", default="default")
    ap.add_argument("--steps", type=int, nargs=3, default=[60, 240, 100],
                    help="warm-up, decay, hold")  # fmt: skip
    ap.add_argument("--tau", type=float, default=0.5, help="tau_target (aim: ~60%% sparsity)")
    ap.add_argument("--static-k", type=int, default=19, help="static top-k baseline (19/48: 60%%)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--init-tokens", type=int, default=8192)
    ap.add_argument("--eval-tokens", type=int, default=None)
    ap.add_argument("--compute", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--gate", default="sigmoid", choices=["sigmoid", "none"])
    ap.add_argument("--lr-backbone", type=float, default=1e-4)
    ap.add_argument("--taus", type=float, nargs="+", default=list(TAUS))
    ap.add_argument("--work", default="runs/quality")
    ap.add_argument("--out", default="results/quality")
    a = ap.parse_args(argv)
    from common import header

    Path(a.out).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trained = train_all(a)
    table = evaluate_lm_all(a, trained) if a.task == "lm" else evaluate_cls_all(a, trained)
    info = {**header(), "task": a.task, "args": vars(a), "trained": trained,
            "seconds": time.perf_counter() - t0}  # fmt: skip
    rows = [{**info, **r} for r in table]
    with (Path(a.out) / f"{a.task}_table.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")
    for r in table:
        print(r)


if __name__ == "__main__":
    main()
