"""Tiny PrunePath Llamas for the one-launch decode step's tests: each case a model, a KV cache
filled by the model's own prefill, and the next token at its position."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prunepath_jax import megastep
from prunepath_jax.config import ModelConfig, PrunePathConfig
from prunepath_jax.models.layers import init_cache
from prunepath_jax.models.llama import LlamaModel
from prunepath_jax.nn import PrunePathFFN, route_args


class Case(NamedTuple):
    name: str
    d: int
    heads: int
    kv: int
    head_dim: int
    f: int
    g: int
    prompt: int  # tokens already in the cache (the new token's position)
    tau: float
    splits: int
    block_t: int
    rule: str = "paper"
    gate: str = "sigmoid"
    k_min: int = 1
    k_max: int | None = None
    dtype: str = "float32"
    cache_len: int = 32
    layers: int = 2
    router_in_c: bool = True  # the router logits summed in the O phase (else a phase of its own)
    unit_table: bool = True  # units' experts from a table (else two reductions a unit)
    merge_bc: bool = False  # attention + O projection as one phase (triton_megastep_ao)
    parts: int = 0  # its row parts a KV head (0: by the programs, 1 under the interpreter)
    router_in_items: bool = False  # the merged items compute the router's first term too
    ranked_select: bool = True  # the unit table from a ranked selection (else sorted + scans)
    head_in: bool = False  # the final norm and the LM head inside the launch
    tie: bool = False  # the LM head is the embedding (else pack's transposed lm_head)
    qkv_cols: int | None = None  # the QKV GEMV's column chunk (None: by the width, 0: rows)
    o_cols: int | None = None  # the O GEMV's column chunk (None: the default, 0: rows)


CASES = (
    # Two splits of two 16-key blocks each (the last one partial): the online softmax's loop;
    # the LM head in the launch (an untied head: 50 rows).
    Case(
        "gqa2_f32", 64, 4, 2, 16, 128, 8, 40, 0.5, splits=2, block_t=16, cache_len=48, head_in=True
    ),  # fmt: skip
    # d not a power of two, 3 query heads a KV head, nucleus rule, no gates, clamps on k.
    Case(
        "gqa3_nucleus",
        96,
        6,
        2,
        16,
        160,
        10,
        11,
        0.9,
        splits=1,
        block_t=16,
        rule="nucleus",
        gate="none",
        k_min=2,
        k_max=5,
        router_in_c=False,
        unit_table=False,
        qkv_cols=64,  # 256 row slots (160 rows), 64-column chunks: the second one partial
        o_cols=64,  # the O GEMV (96 rows, 96 columns) too, with the router as a phase of its own
    ),  # fmt: skip
    # The first token (empty cache), every expert (tau > 1), more splits than cached rows.
    Case("first_token_all", 64, 4, 4, 16, 96, 8, 0, 1.5, splits=4, block_t=16),
    # The second split has no cached key (9 < one 16-key block); the sorted selection's table.
    Case(
        "bf16",
        64,
        4,
        1,
        32,
        128,
        8,
        9,
        0.6,
        splits=2,
        block_t=16,
        dtype="bfloat16",
        ranked_select=False,
        o_cols=32,  # the O GEMV in bf16 (64 rows, 128 columns): 4 chunks, the router in phase C
    ),
    # A cache past LONG_CACHE (1088 positions) in the long-cache default's 64-key blocks: two
    # splits of 9 and 8 blocks (the last one partial).
    Case(
        "long_cache", 64, 4, 2, 16, 128, 8, 1050, 0.5, splits=2, block_t=64, cache_len=1088
    ),  # fmt: skip
    # 128-key blocks (the default from XLONG_CACHE positions with 64-dim bf16 heads): two splits
    # of 3 blocks each, the third of the second split partial.
    Case(
        "long_cache_128", 64, 4, 2, 16, 128, 8, 700, 0.5, splits=2, block_t=128, cache_len=768
    ),  # fmt: skip
    # The merged attention + O phase: 3 row parts of 22 rows (the last one 20) and 6 of the 16
    # experts' rows of M (the last one 4), a key loop of 3 blocks (the last one partial).
    Case(
        "merged_gqa2",
        64,
        4,
        2,
        16,
        128,
        8,
        40,
        0.5,
        splits=1,
        block_t=16,
        cache_len=48,
        merge_bc=True,
        parts=3,
    ),
    # ... 3 query heads a KV head (padded to 4), d not a power of two, the nucleus rule, the
    # first token; 13 parts of 8 rows for 96 (the last one empty) and 2 experts (from the 9th on,
    # none).
    Case(
        "merged_gqa3_first",
        96,
        6,
        2,
        16,
        160,
        10,
        0,
        0.9,
        splits=1,
        block_t=16,
        rule="nucleus",
        gate="none",
        k_max=5,
        merge_bc=True,
        parts=13,
    ),
    Case(
        "merged_bf16",
        64,
        4,
        1,
        32,
        128,
        8,
        9,
        0.6,
        splits=1,
        block_t=16,
        dtype="bfloat16",
        merge_bc=True,
        parts=2,
        head_in=True,
        tie=True,
        qkv_cols=16,  # bf16 rows in 16-column chunks
    ),
    # The merged items with the router's first term and a double-buffered residual: 3 layers
    # (the result in the second buffer, which the launch's LM head reads), 3 parts, 6 / 6 / 4
    # experts' router rows an item.
    Case(
        "merged_router_items",
        64,
        4,
        2,
        16,
        128,
        8,
        21,
        0.5,
        splits=1,
        block_t=16,
        cache_len=48,
        layers=3,
        merge_bc=True,
        parts=3,
        router_in_items=True,
        head_in=True,
    ),  # fmt: skip
)


def config(c: Case) -> ModelConfig:
    pp = PrunePathConfig(c.g, c.rule, c.gate, c.k_min, c.k_max)
    return ModelConfig(
        family="llama", model_type="llama", vocab_size=50, d_model=c.d, d_ff=c.f,
        n_layers=c.layers, n_heads=c.heads, n_kv_heads=c.kv, head_dim=c.head_dim,
        max_position=max(64, c.cache_len), norm_eps=1e-5, activation="silu", rope_theta=10000.0,
        prunepath=pp, tie_embeddings=c.tie,
    )  # fmt: skip


def build(c: Case):
    """``(model, ffn_args, cache filled to c.prompt, token [], pos [])``."""
    cfg = config(c)
    dtype = jnp.dtype(c.dtype)
    model = LlamaModel(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    key = jax.random.key(1)
    for _, m in nnx.iter_graph(model):  # non-trivial norms and routers
        if isinstance(m, PrunePathFFN):
            key, sub = jax.random.split(key)
            m.router[...] = jax.random.normal(sub, m.router.shape, jnp.float32) * c.d**-0.5
    for i, b in enumerate(model.layers):
        for ln in (b.input_layernorm, b.post_attention_layernorm):
            w = 1 + 0.1 * jax.random.normal(jax.random.key(10 + i), ln.weight.shape)
            ln.weight[...] = w.astype(dtype)
    w = 1 + 0.1 * jax.random.normal(jax.random.key(9), model.norm.weight.shape)
    model.norm.weight[...] = w.astype(dtype)
    args = route_args(cfg, c.tau)
    cache = init_cache(cfg, 1, c.cache_len, dtype)
    rng = np.random.default_rng(len(c.name))
    if c.prompt:
        toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, c.prompt)), jnp.int32)
        cache = model(toks, cache=cache, ffn_args=args, fresh_cache=True).cache
    return model, args, cache, jnp.int32(rng.integers(0, cfg.vocab_size)), jnp.int32(c.prompt)


class BatchCase(NamedTuple):
    """A batched step's case: the model, budget and launch of ``case`` (its ``prompt`` unused),
    ``lengths`` the sequences' tokens already in the cache (each sequence's new token goes at
    its own position), ``ffn_units`` the expert phase's units a group (None: the launch's
    default), ``skinny_bk`` the A and C products' chunk (0: the default; ``skinny_bk_c`` C's
    alone, None: as A's; ``skinny_tp`` their token columns, None: 16; at the
    tests' widths one chunk, so a small one makes the staggered loops wrap round),
    ``skinny_stage`` whether the A and C inputs are staged in each program's scratch first,
    ``skinny_rows`` the A and C tiles' least rows, ``skinny_rows_c`` C's alone,
    ``router_stages`` the router share's pipeline stages (None: the launch's, by the shape), and
    ``router_de`` whether the router share reads the routers' ``[L, d, E]`` copy (``pack`` then
    makes it: ``mw``), ``router_copies`` the copies of the logits the programs add into."""

    case: Case
    lengths: tuple[int, ...]
    ffn_units: int | None = None
    skinny_bk: int = 0
    skinny_bk_c: int | None = None
    skinny_tp: int | None = None
    skinny_stage: bool | None = None
    skinny_rows: int | None = None
    skinny_rows_c: int | None = None
    router_stages: int | None = None
    router_de: bool | None = None
    router_copies: int | None = None

    @property
    def name(self) -> str:
        return self.case.name

    def mw(self, model) -> megastep.MegaWeights:
        """``megastep.pack``'s copy for this case's launch."""
        return megastep.pack(model, router_de=bool(self.router_de))

    def launch(self, **kw) -> megastep.Launch:
        """The case's launch (its splits, key block and batched fields), plus ``kw``."""
        return megastep.Launch(splits=self.case.splits, block_t=self.case.block_t,
                               ffn_units=self.ffn_units, skinny_bk=self.skinny_bk,
                               skinny_bk_c=self.skinny_bk_c, skinny_tp=self.skinny_tp,
                               skinny_stage=self.skinny_stage, skinny_rows=self.skinny_rows,
                               skinny_rows_c=self.skinny_rows_c,
                               router_stages=self.router_stages, router_de=self.router_de,
                               router_copies=self.router_copies, **kw)  # fmt: skip


_B2_BF16 = Case(
    "b2_bf16_nucleus", 96, 6, 2, 16, 320, 16, 0, 0.8, 1, 16, rule="nucleus", gate="none",
    k_min=2, k_max=5, dtype="bfloat16", cache_len=48,
)  # fmt: skip
BATCH_CASES = (
    # Three sequences, one of them at its first token (an empty cache); two key splits.
    BatchCase(Case("b3_f32", 64, 4, 2, 16, 256, 16, 0, 0.9, 2, 16, cache_len=48), (20, 33, 0)),
    # ... with one unit a group: many groups a program, each adding its down rows into the
    # residual; C's tile (and the router share's) padded past its 64 rows to 128; A and C's
    # inputs staged in f32 (the weights' dtype); the logits in 2 copies the selection sums.
    BatchCase(
        Case("b3_one_unit", 64, 4, 2, 16, 256, 16, 0, 0.9, 2, 16, cache_len=48),
        (20, 33, 0),
        ffn_units=1,
        skinny_rows=128,
        skinny_stage=True,
        router_copies=2,
    ),  # fmt: skip
    # d not a power of two, 3 query heads a KV head, nucleus rule, no gates, clamps on k; bf16.
    BatchCase(_B2_BF16, (9, 40)),
    # ... the A and C inputs staged in each program's scratch first, 64-row tiles, the router
    # share pipelined (all the forty-second session's candidates), and read from the routers'
    # [L, d, E] copy (d 96 against E 20: a stride mixed up reads the wrong weights); A and C's
    # tokens padded to 32 columns (the staged inputs' scratch too).
    BatchCase(
        _B2_BF16._replace(name="b2_bf16_staged"),
        (9, 40),
        skinny_bk=32,
        skinny_stage=True,
        skinny_rows=64,
        router_stages=3,
        router_de=True,
        skinny_tp=32,
    ),  # fmt: skip
    # The most sequences the launch takes, every expert (tau > 1), 32-neuron experts; 4 groups;
    # C's product in 32-column chunks (2, wrapping round its staggered start) while A's is one.
    BatchCase(
        Case("b16_all", 64, 4, 4, 16, 256, 32, 0, 1.5, 1, 16, cache_len=48),
        tuple(range(1, 33, 2)),
        skinny_bk_c=32,
    ),  # fmt: skip
    # Few experts a token out of 32: experts no token selects, whose units are skipped.
    BatchCase(
        Case("b4_sparse", 64, 4, 2, 16, 512, 16, 0, 0.3, 2, 16, cache_len=48), (5, 17, 30, 12)
    ),  # fmt: skip
    # ... the expert phase in groups of 2 units (a part group where the union is odd), the A and
    # C products in 32-column chunks, C's tile (and the router share's) padded on its own, the
    # router share from the routers' [L, d, E] copy.
    BatchCase(
        Case("b4_sparse_u2_bk32", 64, 4, 2, 16, 512, 16, 0, 0.3, 2, 16, cache_len=48),
        (5, 17, 30, 12),
        ffn_units=2,
        skinny_bk=32,
        skinny_rows_c=128,
        router_de=True,
    ),  # fmt: skip
)


def build_batch(c: BatchCase):
    """``(model, ffn_args, cache with each sequence's prompt, tokens [b], positions [b])``: the
    prompts through the model's own prefill (right-padded, as ``generate`` does)."""
    model, args, _, _, _ = build(c.case)
    b, t = len(c.lengths), max(max(c.lengths), 1)
    rng = np.random.default_rng(len(c.name))
    toks = rng.integers(0, model.cfg.vocab_size, (b, t)).astype(np.int32)
    lengths = np.asarray(c.lengths, np.int32)
    cache = init_cache(model.cfg, b, c.case.cache_len, jnp.dtype(c.case.dtype))
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = model(jnp.asarray(toks), pos, cache=cache, ffn_args=args, fresh_cache=True,
                  logit_index_b=jnp.maximum(jnp.asarray(lengths) - 1, 0)).cache  # fmt: skip
    # A sequence's cache rows at and past its length hold the padding's keys, as in generate:
    # the step masks them and overwrites its own position.
    new = jnp.asarray(rng.integers(0, model.cfg.vocab_size, b), jnp.int32)
    return model, args, cache, new, jnp.asarray(lengths)


def as_fp32(model, cache):
    """The same weights and cache in float32: what a bf16 case's rounding is measured from."""
    graphdef, state = nnx.split(model)
    up = lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a  # noqa: E731
    return nnx.merge(graphdef, jax.tree.map(up, state)), jax.tree.map(up, cache)
