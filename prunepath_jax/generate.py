"""KV-cache generation: one jitted prefill, then a jitted decode loop over a static-size cache.

Prompts of different lengths are right-padded into one batch; each sequence keeps its own
position counter, writes its keys/values at its own positions and masks keys past its position,
so no left padding and no position shifting is needed. The decode step is compiled once per
(batch, cache length) and runs `chunk` tokens per call inside a `fori_loop`; the host only checks
the stop flags between chunks (no per-token synchronisation, no retracing).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from prunepath_jax import flatjit
from prunepath_jax.kernels.api import IMPLEMENTATIONS as KERNEL_IMPLEMENTATIONS
from prunepath_jax.models.layers import init_cache

# What a decode step's compute can be split into (the registry's backends, and "auto": the
# measured-fastest per shape), and what `generate` takes on top (None: the model as it is;
# "megastep": the one-launch step). One list each, so a new backend is one edit in the registry.
SPLIT_IMPLEMENTATIONS = ("auto", *KERNEL_IMPLEMENTATIONS)
GENERATE_IMPLEMENTATIONS = (None, "auto", "megastep", *KERNEL_IMPLEMENTATIONS)


def _one_of(choices) -> str:
    """``"a, b or c"``: the choices as an error message names them."""
    names = [str(c) for c in choices]
    return ", ".join(names[:-1]) + " or " + names[-1]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_tokens(logits_bv, rng, temperature, top_p, *, greedy: bool):
    """Greedy argmax, or temperature + nucleus (top-p) sampling, per row."""
    if greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The smallest set of top tokens whose mass reaches top_p (the top token always stays).
    cutoff_idx = jnp.sum(mass_before < top_p, axis=-1, keepdims=True) - 1
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class DecodeState(NamedTuple):
    """Carried between decode steps. `pos_b` is where `token_b` will be written."""

    token_b: jax.Array
    pos_b: jax.Array
    done_b: jax.Array
    cache: Any
    rng: jax.Array


def _stop(tokens_b, stop_ids):
    if stop_ids.shape[0] == 0:
        return jnp.zeros(tokens_b.shape, bool)
    return jnp.any(tokens_b[:, None] == stop_ids[None, :], axis=-1)


def _prompt_pass(model, tokens_bt, lengths_b, cache, ffn_args):
    """The prompts' forward pass: fills the (empty) cache, logits at each prompt's last position.

    Right-padded prompts from position 0 into a fresh cache: attention is causal within the
    prompt tokens (pads sit after every real token, so no real token sees one), which the model
    runs as its fused causal kernel (``fresh_cache=True``)."""
    b, t = tokens_bt.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return model(tokens_bt, positions, cache=cache, ffn_args=ffn_args,
                 logit_index_b=lengths_b - 1, fresh_cache=True)  # fmt: skip


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy"))
def prefill(graphdef, state, tokens_bt, lengths_b, cache, rng, temperature, top_p, stop_ids,
            ffn_args=None, *, greedy: bool):  # fmt: skip
    """Runs the prompts through the model, fills the cache, samples each first new token."""
    out = _prompt_pass(nnx.merge(graphdef, state), tokens_bt, lengths_b, cache, ffn_args)
    rng, key = jax.random.split(rng)
    token = sample_tokens(out.logits[:, 0], key, temperature, top_p, greedy=greedy)
    done = _stop(token, stop_ids)
    return DecodeState(token, lengths_b.astype(jnp.int32), done, out.cache, rng)


def next_tokens(logits_bv, st, temperature, top_p, stop_ids, pad_id, greedy):
    """``(tokens_b, done_b, rng)`` after one decode step's logits: sampled, ``pad_id`` for
    finished sequences, stop flags updated (every decode loop's tail; ``st`` carries
    ``done_b`` and ``rng``)."""
    if greedy:  # no draw: the key would be split for nothing, a kernel or two every step
        rng, key = st.rng, None
    else:
        rng, key = jax.random.split(st.rng)
    nxt = sample_tokens(logits_bv, key, temperature, top_p, greedy=greedy)
    nxt = jnp.where(st.done_b, pad_id, nxt)
    return nxt, st.done_b | _stop(nxt, stop_ids), rng


def decode_step(model, st: DecodeState, temperature, top_p, stop_ids, pad_id, ffn_args, greedy):
    """One token for every sequence: feed `token_b` at `pos_b`, sample the next one."""
    out = model(st.token_b[:, None], st.pos_b[:, None], cache=st.cache, ffn_args=ffn_args)
    nxt, done, rng = next_tokens(out.logits[:, 0], st, temperature, top_p, stop_ids, pad_id,
                                 greedy)  # fmt: skip
    return DecodeState(nxt, st.pos_b + 1, done, out.cache, rng)


def _decode_chunk_impl(graphdef, state, st, temperature, top_p, stop_ids, pad_id, ffn_args=None,
                       *, n_steps: int, greedy: bool):  # fmt: skip
    model = nnx.merge(graphdef, state)

    def body(i, carry):
        st, out_bn = carry
        st = decode_step(model, st, temperature, top_p, stop_ids, pad_id, ffn_args, greedy)
        return st, out_bn.at[:, i].set(st.token_b)

    out_bn = jnp.zeros((st.token_b.shape[0], n_steps), jnp.int32)
    return jax.lax.fori_loop(0, n_steps, body, (st, out_bn))


_STATIC = ("graphdef", "n_steps", "greedy")
decode_chunk = jax.jit(_decode_chunk_impl, static_argnames=_STATIC)
decode_chunk_donating = jax.jit(_decode_chunk_impl, static_argnames=_STATIC, donate_argnums=(2,))


def bind_decode_chunk(graphdef, state, *, n_steps: int, greedy: bool, donate: bool = True):
    """``generate``'s compiled decode chunk (``flatjit.bind``: the graph hashed once, the state a
    flat list): ``(fn, leaves)``, ``fn(leaves, st, temperature, top_p, stop_ids, pad_id,
    ffn_args) -> (st, tokens [b, n_steps])``, ``st`` donated with ``donate``."""
    return flatjit.bind(_decode_chunk_impl, graphdef, state, donate_argnums=(1,) if donate else (),
                        n_steps=n_steps, greedy=greedy)  # fmt: skip


def _decode_loop(call, st, done_b, n_tokens: int, chunk: int, stop_ids, chunk_seconds, bar):
    """The decode chunks after the prefill's token: ``([tokens [b, chunk], ...], last state)``.

    Each compiled call is issued before the previous chunk's tokens are read, so the host's part
    of a call (2-5 ms for a 16-token chunk at 1B on the H200's host, against ~10 ms of device
    work) and the read-back overlap the device instead of idling it between chunks. Stops are
    tracked on the host from the tokens read; once every sequence has stopped, the chunk then in
    flight is not read (at most one chunk of device work is wasted)."""
    out = []
    done = np.array(done_b, bool)
    issued, inflight = 1, None
    t_prev = time.perf_counter()
    while True:
        go = issued < n_tokens and not done.all()
        if go:
            st, toks = call(st)
            issued += chunk
        if inflight is not None and not done.all():
            got = np.asarray(inflight)
            out.append(got)
            done |= np.isin(got, stop_ids).any(axis=1)
            if chunk_seconds is not None:
                now = time.perf_counter()
                chunk_seconds.append(now - t_prev)
                t_prev = now
            bar.update(min(chunk, n_tokens - bar.n))
        if not go:
            return out, st
        inflight = toks


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _split(
    model: nnx.Module,
    implementation: str | None,
    cache_len: int | None = None,
    batch: int | None = None,
):
    """`nnx.split`, with the compute paths `implementation` asks for set in the graphdef only
    (the caller's model keeps its own): every PrunePath FFN through the kernel registry, and
    Llama-family decode attention through the Pallas split-K kernel for "pallas", and for
    "auto" where it measured faster (`models.decode_attention.impl_for`: up to 8 sequences, a short
    cache). The attention projections keep the model's ``proj_impl`` (`models.decode_proj`:
    opt-in, not faster at every size) except for "xla", the reference, which runs XLA's."""
    if implementation is None:
        return nnx.split(model)
    if implementation not in SPLIT_IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be {_one_of(SPLIT_IMPLEMENTATIONS)}, got {implementation!r}"
        )
    from prunepath_jax.models import decode_attention as da
    from prunepath_jax.nn import PrunePathFFN, set_compute

    ffns = [m for _, m in nnx.iter_graph(model) if isinstance(m, PrunePathFFN)]
    attns = da.attention_modules(model)
    if not ffns and not attns:
        raise ValueError("implementation= applies to PrunePath FFNs and Llama-family attention")
    if not ffns and implementation == "triton":
        raise ValueError(
            "implementation='triton' names FFN kernels and this model has no PrunePath FFN; "
            "use 'pallas' or 'auto' for the decode attention kernel"
        )
    saved_ffn = [(m.compute, m.implementation) for m in ffns]
    saved_attn = [(m.attn_impl, m.proj_impl) for m in attns]
    try:
        if ffns:
            set_compute(model, "kernel", None if implementation == "auto" else implementation)
        attn_impl = da.impl_for(implementation, model, cache_len, batch) if attns else None
        for m in attns:
            m.attn_impl = attn_impl
            if implementation == "xla":  # the reference path: no projection kernels either
                m.proj_impl = "xla"
        return nnx.split(model)
    finally:
        for m, (c, i) in zip(ffns, saved_ffn, strict=True):
            m.compute, m.implementation = c, i
        for m, (a, p) in zip(attns, saved_attn, strict=True):
            m.attn_impl, m.proj_impl = a, p


def _batch(model, prompts, tau, ffn_args, pad_id: int = 0):
    """Right-padded ``tokens [b, t_pad]`` (t_pad: the longest prompt rounded up to 32, so prompt
    lengths share compiled prefills), ``lengths [b]`` and the FFN arguments (built from ``tau``
    for a PrunePath model when ``ffn_args`` is not given) -- what `generate` and
    `forced_logits` both feed the prefill."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.full((len(prompts), _round_up(int(lengths.max()), 32)), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    if tau is not None and ffn_args is None and model.cfg.prunepath is not None:
        from prunepath_jax.nn import route_args

        ffn_args = route_args(model.cfg, tau)
    return tokens, lengths, ffn_args


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forced(graphdef, state, tokens_bt, lengths_b, cache, forced_bn, ffn_args):
    model = nnx.merge(graphdef, state)
    out = _prompt_pass(model, tokens_bt, lengths_b, cache, ffn_args)

    def step(carry, token_b):  # the decode step of `decode_step`, fed the given token
        cache, pos_b = carry
        o = model(token_b[:, None], pos_b[:, None], cache=cache, ffn_args=ffn_args)
        return (o.cache, pos_b + 1), o.logits[:, 0].astype(jnp.float32)

    _, rest_nbv = jax.lax.scan(step, (out.cache, lengths_b), forced_bn[:, :-1].T)
    first_1bv = out.logits[:, :1].astype(jnp.float32).transpose(1, 0, 2)
    return jnp.concatenate([first_1bv, rest_nbv], axis=0).transpose(1, 0, 2)


def forced_logits(
    model: nnx.Module,
    prompts: list[list[int]],
    continuations: list[list[int]],
    *,
    implementation: str | None = None,
    tau=None,
    ffn_args=None,
    cache_len: int | None = None,
) -> np.ndarray:
    """Next-token logits along given continuations, through generation's own prefill and
    KV-cache decode steps: ``[b, n, vocab]`` float32, row ``i`` predicting continuation token i.

    Why: comparing two compute paths by their greedy outputs stops at the first flip, after
    which the sequences differ; feeding both the same tokens (teacher forcing) compares every
    step, on the decode path (one token per step) that generation runs.

    Args:
        model, prompts, implementation, tau, ffn_args, cache_len: as for `generate`.
        continuations: the tokens fed after each prompt, all of one length n ≥ 1.
    """
    if len(continuations) != len(prompts) or not prompts:
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    n = len(continuations[0])
    if n < 1 or any(len(c) != n for c in continuations):
        raise ValueError("continuations must be non-empty and of one length")
    tokens, lengths, ffn_args = _batch(model, prompts, tau, ffn_args)
    cfg, longest, t_pad = model.cfg, int(lengths.max()), tokens.shape[1]
    cache_len = cache_len or _round_up(max(longest + n, t_pad), 64)
    if longest + n > min(cache_len, cfg.max_position) or t_pad > cache_len:
        raise ValueError(
            f"prompt ({longest}) + continuation ({n}) tokens do not fit a cache of "
            f"{cache_len} / the model's context of {cfg.max_position}"
        )
    graphdef, state = _split(model, implementation, cache_len, len(prompts))
    cache = init_cache(cfg, len(prompts), cache_len, model.embed_tokens.embedding.dtype)
    forced = jnp.asarray(np.array(continuations, np.int32))
    out = _forced(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), cache, forced,
                  ffn_args)  # fmt: skip
    return np.asarray(out)


def _megastep_setup(model, batch: int, ffn_args):
    """The one-launch decode step's checks and weight copy (``prunepath_jax.megastep``): with
    several sequences also the routers' ``[L, d, E]`` copy, which the batched step's router
    share reads faster (``megastep.Launch.router_de``)."""
    from prunepath_jax import megastep
    from prunepath_jax.kernels import jt

    megastep.check(model, batch)
    if ffn_args is None:
        raise ValueError("implementation='megastep' needs tau (or ffn_args)")
    jt.jax_triton_module()  # a clear error without a GPU or jax-triton
    return megastep.pack(model, router_de=batch > 1)


def generate(
    model: nnx.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    sampling: SamplingConfig = SamplingConfig(),
    stop_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    cache_len: int | None = None,
    dtype=None,
    ffn_args=None,
    chunk: int = 16,
    progress: bool = False,
    implementation: str | None = None,
    tau=None,
    chunk_seconds: list[float] | None = None,
) -> list[list[int]]:
    """Generates up to `max_new_tokens` tokens for each prompt (a batch of any lengths).

    Args:
        model: a causal LM returning `ModelOutput` (e.g. `LlamaModel`, `GPT2Model`).
        prompts: token ids per prompt, each non-empty.
        max_new_tokens: tokens to generate per prompt (stops early at a stop token).
        sampling: greedy (temperature 0) or temperature/top-p sampling.
        stop_ids: ids that end a sequence (the stop token is included in the output).
        pad_id: written after a sequence has stopped.
        cache_len: KV-cache length; default: longest prompt + max_new_tokens, rounded up.
        dtype: cache dtype (default: the embedding's dtype).
        ffn_args: per-layer FFN arguments passed through to the model (PrunePath tau, ...).
        chunk: decode steps per compiled call between host checks of the stop flags; the next
            call is issued before a chunk's tokens are read, so once every sequence has stopped
            up to one more chunk runs on the device, its tokens discarded.
        progress: show a progress bar over generated tokens.
        chunk_seconds: if a list, the wall seconds of every decode chunk (one compiled call of
            `chunk` steps; the time from the previous chunk's tokens on the host, or the first
            call, to this chunk's) are appended to it: decode speed without the prefill and
            set-up (`scripts/smollm2_decode.py --direct`).
        implementation: run every PrunePath FFN through the kernel registry
            (`prunepath_jax.kernels.api`) with this backend, "xla" | "triton" | "pallas", or
            "auto" (fastest available), for prefill and decode; for Llama-family models
            (dense too) "pallas" also runs decode-step attention through the split-K kernel
            (`models.decode_attention`; XLA where it cannot run, e.g. on CPU or with a sliding
            window); "auto" uses that kernel only for up to 8 sequences with a cache of at most
            17 408 positions (``decode_attention.AUTO_MAX_CACHE``) and unsharded weights, where
            it measured faster (BENCHMARKS.md). "megastep": 1-16 prompts through a PrunePath
            Llama (no attention biases nor sliding window), the prefill as "auto", then every
            decode step's layers in ONE Triton launch (`prunepath_jax.megastep`; GPU only);
            "auto" takes it where it can run and measured faster than the kernels: one prompt
            with a cache of at most `megastep.AUTO_MAX_CACHE` positions, or 2-16 prompts with
            a cache of at most `megastep.AUTO_MAX_CACHE_BATCH` positions, and room for its
            weight copy
            (`megastep.auto_ok`). None keeps the model's own compute paths. The decode step
            stays one compiled program.
        tau: PrunePath budget (scalar or per-layer); builds `ffn_args` when those are not given.

    Returns:
        The generated ids per prompt (prompt excluded), cut after the first stop token.
    """
    cfg = model.cfg
    tokens, lengths, ffn_args = _batch(model, prompts, tau, ffn_args, pad_id)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if chunk < 1:
        raise ValueError(f"chunk (decode steps per compiled call) must be >= 1, got {chunk}")
    if implementation not in GENERATE_IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be {_one_of(GENERATE_IMPLEMENTATIONS)}, got {implementation!r}"
        )
    t_pad = tokens.shape[1]
    needed = int(lengths.max()) + max_new_tokens
    if cache_len is None:
        cache_len = _round_up(max(needed, t_pad), 64)
    if int(lengths.max()) + 1 > cache_len or t_pad > cache_len:
        raise ValueError(
            f"prompt of {int(lengths.max())} tokens does not fit a KV cache of {cache_len} "
            f"(padded to {t_pad}); pass a larger cache_len or a shorter prompt"
        )
    if needed > cfg.max_position:
        raise ValueError(
            f"prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's context of {cfg.max_position} tokens"
        )
    mega = implementation == "megastep"
    if implementation == "auto":
        from prunepath_jax import megastep

        mega = megastep.auto_ok(model, len(prompts), ffn_args, cache_len, dtype) is None
    if mega:
        mw = _megastep_setup(model, len(prompts), ffn_args)
    graphdef, state = _split(model, "auto" if mega else implementation, cache_len, len(prompts))
    dtype = dtype or model.embed_tokens.embedding.dtype
    cache = init_cache(cfg, len(prompts), cache_len, dtype)
    greedy = sampling.temperature == 0.0
    temp = jnp.float32(sampling.temperature)
    top_p = jnp.float32(sampling.top_p)
    stops = jnp.asarray(np.array(stop_ids, np.int32).reshape(-1))
    rng = jax.random.key(sampling.seed)
    st = prefill(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths), cache, rng, temp,
                 top_p, stops, ffn_args, greedy=greedy)  # fmt: skip
    out = [np.asarray(st.token_b)[:, None]]
    done_b = st.done_b
    donate = jax.default_backend() != "cpu"  # CPU cannot donate (a warning every call)
    pad = jnp.int32(pad_id)
    if mega:
        from prunepath_jax import megastep

        st = megastep.from_decode_state(st)
        tau_l = jnp.stack([a.tau for a in ffn_args])
        fn, leaves = megastep.bind_decode_chunk(graphdef, state, n_steps=chunk, greedy=greedy,
                                                donate=donate)  # fmt: skip

        def call(st):
            return fn(leaves, mw, st, temp, top_p, stops, pad, tau_l)
    else:
        fn, leaves = bind_decode_chunk(graphdef, state, n_steps=chunk, greedy=greedy,
                                       donate=donate)  # fmt: skip

        def call(st):
            return fn(leaves, st, temp, top_p, stops, pad, ffn_args)

    bar = tqdm(total=max_new_tokens, desc="generating", disable=not progress, leave=False)
    bar.update(1)
    chunks, st = _decode_loop(call, st, done_b, max_new_tokens, chunk, stop_ids, chunk_seconds,
                              bar)  # fmt: skip
    bar.close()
    if mega:
        megastep.check_fail(st)  # every chunk's barrier give-ups, the tokens' too
    out += chunks
    gen = np.concatenate(out, axis=1)[:, :max_new_tokens]
    result = []
    stop_set = set(stop_ids)
    for row in gen.tolist():
        cut = next((i + 1 for i, tok in enumerate(row) if tok in stop_set), len(row))
        result.append(row[:cut])
    return result
