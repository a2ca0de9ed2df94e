"""`prunepath` command line (tyro subcommands): demo, convert, sweep, generate, info, bench."""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Annotated, Literal

import tyro

DTYPES = Literal["float32", "bfloat16"]
IMPLS = Literal["model", "auto", "xla", "triton", "pallas", "megastep"]


def _load(model: str, dtype: str):
    """A Hugging Face / GGUF / default model, or a prunepath_jax Orbax checkpoint directory."""
    import jax.numpy as jnp

    from prunepath_jax.loading import load_any

    return load_any(model, dtype=getattr(jnp, dtype))


def _prompts(tok, texts: list[str], chat: bool) -> list[list[int]]:
    if chat and tok.chat_template:
        texts = [
            tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
            for t in texts
        ]
    return [tok.encode(t) for t in texts]


@dataclasses.dataclass
class Generate:
    """Generate text with a model (greedy by default)."""

    prompt: tuple[str, ...] = ("What is the capital of France?",)
    """One or more prompts; several are decoded together as one batch."""
    model: str = "default"
    """"default" (SmolLM2-135M-Instruct), a Hugging Face directory, a .gguf file or a hub id."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0 means greedy."""
    top_p: float = 1.0
    seed: int = 0
    chat: bool = True
    """Wrap each prompt in the model's chat template (when it has one)."""
    dtype: DTYPES = "float32"
    tau: float = 1.05
    """PrunePath budget (PrunePath checkpoints only); > 1 uses every expert."""
    implementation: IMPLS = "model"
    """"model": the model's own XLA paths; "auto": the fastest measured kernels on a GPU (one
    prompt: the whole decode step in one launch, where it runs); or one backend (generate's
    `implementation`)."""

    def run(self) -> None:
        from prunepath_jax.generate import SamplingConfig, generate
        from prunepath_jax.nn import route_args
        from prunepath_jax.routing import check_tau

        check_tau(self.tau)  # before loading: a bad budget is an error for a dense model too
        pre = _load(self.model, self.dtype)
        tok = pre.tokenizer
        if tok is None:
            raise SystemExit(f"{self.model}: no tokenizer found; cannot generate text")
        ids = _prompts(tok, list(self.prompt), self.chat)
        t0 = time.perf_counter()
        out = generate(
            pre.model,
            ids,
            self.max_new_tokens,
            sampling=SamplingConfig(self.temperature, self.top_p, self.seed),
            stop_ids=tok.stop_ids(pre.config.eos_token_ids),
            pad_id=tok.pad_id,
            ffn_args=route_args(pre.config, self.tau) if pre.config.prunepath else None,
            progress=True,
            implementation=None if self.implementation == "model" else self.implementation,
        )
        dt = time.perf_counter() - t0
        for p, o in zip(self.prompt, out, strict=True):
            print(f"### {p}\n{tok.decode(o)}\n")
        n = sum(map(len, out))
        print(f"[{n} tokens in {dt:.2f} s including compilation]")


@dataclasses.dataclass
class Info:
    """Print a model's architecture and parameter count."""

    model: str = "default"

    def run(self) -> None:
        from rich.console import Console
        from rich.table import Table

        pre = _load(self.model, "float32")
        table = Table(title=f"{pre.source}")
        table.add_column("field")
        table.add_column("value")
        for k, v in pre.config.to_dict().items():
            table.add_row(k, str(v))
        table.add_row("parameters (approx.)", f"{pre.config.n_params / 1e6:.1f} M")
        if pre.tokenizer is not None:
            table.add_row("tokenizer vocab", str(pre.tokenizer.vocab_size))
            table.add_row("chat template", "yes" if pre.tokenizer.chat_template else "no")
        Console().print(table)


@dataclasses.dataclass
class Convert:
    """Dense checkpoint -> PrunePath model (balanced k-means experts, zero router) -> Orbax
    checkpoint that `prunepath_jax.checkpoint.restore_model` (and --model of every command)
    restores."""

    out: str
    """Output checkpoint directory."""
    model: str = "default"
    """"default", a Hugging Face directory, a .gguf file or a hub id."""
    group_size: int = 32
    """Neurons per expert G; must divide the FFN width."""
    rule: Literal["paper", "nucleus"] = "paper"
    gate: Literal["sigmoid", "none"] = "sigmoid"
    k_max: int | None = None
    """Most experts per token (bounds the gathered decode path)."""
    seed: int = 0
    dtype: DTYPES = "float32"
    init_routers: int = 0
    """Calibration tokens of shipped training text for the training-free router initialisation
    (0: leave the routers at zero, as the paper does before fine-tuning)."""

    def run(self) -> None:
        from prunepath_jax.checkpoint import save_model
        from prunepath_jax.config import PrunePathConfig
        from prunepath_jax.convert import to_prunepath

        # The settings first: a bad one is one clear line before seconds of loading the model.
        pp = PrunePathConfig(self.group_size, self.rule, self.gate, 1, self.k_max)
        if self.init_routers < 0:
            raise ValueError(
                f"init_routers is a number of calibration tokens (0: no initialisation), "
                f"got {self.init_routers}"
            )
        pre = _load(self.model, self.dtype)
        t0 = time.perf_counter()
        model, info = to_prunepath(pre.model, pp, seed=self.seed)
        if self.init_routers > 0:
            from prunepath_jax.demo import calibration_batches
            from prunepath_jax.router_init import init_routers

            batches = calibration_batches(pre.tokenizer, self.init_routers)
            model, _ = init_routers(model, batches, seed=self.seed)
        meta = {
            "source": pre.source,
            "conversion": {
                "group_size": self.group_size,
                "n_experts": model.cfg.n_experts,
                "rule": self.rule,
                "gate": self.gate,
                "seed": self.seed,
                "router_init_tokens": self.init_routers,
                "seconds": time.perf_counter() - t0,
                "within_expert_cosine": info["cosine"],
            },
        }
        step_dir = save_model(self.out, model, model.cfg, tokenizer=pre.tokenizer, metadata=meta)
        print(
            f"converted {pre.source}: {model.cfg.n_layers} layers x {model.cfg.n_experts} experts"
            f" of {self.group_size} neurons in {meta['conversion']['seconds']:.1f} s -> {step_dir}"
        )


@dataclasses.dataclass
class Demo:
    """The main job on the embedded default model (see README)."""

    model: str = "default"
    max_new_tokens: int = 48

    def run(self) -> None:
        from prunepath_jax.demo import run_demo

        run_demo(self.model, self.max_new_tokens)


@dataclasses.dataclass
class Bench:
    """Run the kernel benchmarks (issue 5) and append their rows to results/*.jsonl."""

    which: tuple[
        Literal[
            "kernels",
            "sparse-decode",
            "sparse-prefill",
            "decode",
            "megastep-decode",
            "megastep-batch-decode",
            "teal-decode",
        ],
        ...,
    ] = (
        "kernels",
        "sparse-decode",
        "megastep-decode",
        "megastep-batch-decode",
        "sparse-prefill",
    )
    """Scripts of benchmarks/ to run: ffn_kernels.py (decode GB/s, launch overhead, grouped-GEMM
    prefill; rows in kernels.jsonl), sparse_decode.py (end-to-end sparse vs dense decode),
    sparse_prefill.py (whole-model prompt pass, sparse vs dense), decode.py (dense decode),
    megastep_decode.py (every layer of a decode step in one launch vs the default kernels and
    dense), megastep_batch_decode.py (the same for 2-16 sequences: what "auto" runs for
    2-16 prompts), teal_decode.py (TEAL's masked-row kernels beside dense and
    ours, one token)."""
    out_dir: str = "results"
    extra: str = ""
    """Extra arguments for every script, one string: --extra="--shapes llama-3.2-1b"."""

    def run(self) -> None:
        import shlex
        import subprocess
        from pathlib import Path

        import prunepath_jax

        bench_dir = Path(prunepath_jax.__file__).resolve().parent.parent / "benchmarks"
        if not bench_dir.is_dir():
            raise FileNotFoundError(f"{bench_dir}: benchmarks/ ships with the repository checkout")
        # not benchmarks/kernels.py: on sys.path that name shadows Hugging Face's `kernels`,
        # which transformers imports
        scripts = {"kernels": "ffn_kernels"}
        for w in self.which:
            stem = w.replace("-", "_")
            script = bench_dir / f"{scripts.get(w, stem)}.py"
            out = str(Path(self.out_dir) / f"{stem}.jsonl")
            cmd = [sys.executable, str(script), "--out", out, *shlex.split(self.extra)]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)


def _sweep_args():
    from prunepath_jax.eval.sweep import SweepArgs

    return SweepArgs


Command = (
    Annotated[Demo, tyro.conf.subcommand("demo")]
    | Annotated[Convert, tyro.conf.subcommand("convert")]
    | Annotated[_sweep_args(), tyro.conf.subcommand("sweep")]
    | Annotated[Generate, tyro.conf.subcommand("generate")]
    | Annotated[Info, tyro.conf.subcommand("info")]
    | Annotated[Bench, tyro.conf.subcommand("bench")]
)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "train":  # presets + field overrides: see prunepath_jax.train
        from prunepath_jax.train.__main__ import main as train_main

        return train_main(args[1:])
    cmd = tyro.cli(Command, args=args, prog="prunepath")
    try:
        cmd.run()
    except (FileNotFoundError, ValueError, NotImplementedError) as e:  # one clear line
        print(f"prunepath: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
