"""The Pallas decode layer's static plan (kernels/pallas_plan.py): pure Python over shapes and
tuning, so these run without kernels."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from prunepath_jax.kernels import jt
from prunepath_jax.kernels.pallas_experts import accumulator_shape
from prunepath_jax.kernels.pallas_plan import SMEM_BYTES, _tiles, plan


def test_dot_tiles_fit_shared_memory():
    """The dot path's default d tile keeps its pipelined loads within ``SMEM_BYTES``: bf16 keeps
    512 columns, fp32 at 2-4 tokens (32-neuron blocks) halves it (320 KB failed on the H200)."""
    for t, dtype, bd in ((4, jnp.bfloat16, 512), (4, jnp.float32, 256), (8, jnp.float32, 512)):
        p = plan(t, 2048, 32, dtype, {})
        assert p["use_dot"] and p["bd"] == bd, (t, dtype, p["bd"])
        need = (p["num_stages"] - 1) * (p["tp"] + 2 * p["bn"]) * p["bd"]
        assert need * jnp.dtype(dtype).itemsize <= SMEM_BYTES
    assert plan(4, 2048, 32, jnp.float32, {"block_d": 512})["bd"] == 512  # explicit: kept


def test_tiles_mask_the_last_tile_only_where_that_shortens_the_walk():
    """576 = 9·64 walks 2 masked 512-wide tiles, not 9 of 64; a d that 512 divides is unchanged;
    "divisor" keeps the old walk."""
    assert _tiles(576, 512, "masked") == (512, 2)
    assert _tiles(576, 512, "divisor") == (64, 9)
    assert _tiles(4096, 512, "masked") == (512, 8)
    assert _tiles(1536, 512, "masked") == (512, 3)
    assert _tiles(96, 512, "masked") == (128, 1)
    assert _tiles(64, 512, "masked") == (64, 1)
    p = plan(1, 576, 32, jnp.bfloat16, {"use_dot": True})
    # the atomic accumulator covers whole output tiles: 2 x 512 columns for d = 576
    assert accumulator_shape(1, 576, 32, 21, p) == (1, 1024)
    # one token at a small d: 8-neuron broadcast blocks, one masked 1024-wide tile
    small = plan(1, 576, 32, jnp.bfloat16, {})
    assert (small["use_dot"], small["bn"], small["bd"], small["n_in"]) == (False, 8, 1024, 1)
    assert plan(2, 576, 32, jnp.bfloat16, {})["use_dot"]
    assert plan(1, 2048, 32, jnp.bfloat16, {"experts": "blocks"})["use_dot"]


def test_auto_expert_form_by_tokens_and_d():
    """One token at a large d: the balanced kernel, unless a block-only option is given; more
    tokens or a small d: the block kernel."""
    sms = jt.default_programs()
    p = plan(1, 2048, 32, jnp.bfloat16, {})
    assert (p["experts"], p["bn"], p["programs"]) == ("balanced", 2, 2 * sms)
    assert p["prefetch"] == 1  # prefetched 2-neuron units: two programs fit an SM
    four = plan(1, 4096, 32, jnp.bfloat16, {"experts": "balanced", "block_n": 4})
    assert four["programs"] == sms
    assert accumulator_shape(1, 2048, 32, 64, p) == (1, 2048)
    assert plan(1, 4096, 32, jnp.bfloat16, {"use_dot": True})["experts"] == "blocks"
    assert plan(2, 4096, 32, jnp.bfloat16, {})["experts"] == "blocks"
    assert plan(1, 576, 32, jnp.bfloat16, {})["experts"] == "blocks"
    assert plan(1, 4096, 24, jnp.bfloat16, {"experts": "balanced"})["bn"] == 2
    assert plan(1, 4096, 24, jnp.bfloat16, {"experts": "balanced", "prefetch": 0})["bn"] == 8


def test_routing_kernel_keys_default_and_must_be_powers_of_two():
    """The selection / logits kernels' blocks: defaults 16 experts a program on 4 warps, logits on
    4 warps (the H200 measurements kept them); other powers of two pass, anything else is an
    error before any kernel is built."""
    p = plan(1, 4096, 32, jnp.bfloat16, {})
    assert (p["select_block_e"], p["select_warps"], p["logit_warps"]) == (16, 4, 4)
    q = plan(1, 4096, 32, jnp.bfloat16, {"select_block_e": 8, "select_warps": 1, "logit_warps": 8})
    assert (q["select_block_e"], q["select_warps"], q["logit_warps"]) == (8, 1, 8)
    for key, bad in (("select_block_e", 12), ("select_warps", 0), ("logit_warps", 2.0)):
        with pytest.raises(ValueError, match=f"{key} must be a power of two"):
            plan(1, 4096, 32, jnp.bfloat16, {key: bad})
