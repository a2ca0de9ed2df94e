"""Early launch (PDL) in Pallas-Triton kernels: the instruction is in the Triton IR ahead of the
body, absent when switched off, and the interpreter runs the body unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TRITON_CALL, assert_close, cuda_export_text
from jax.experimental import pallas as pl

from prunepath_jax.kernels import pallas_pdl

plgpu = pytest.importorskip("jax.experimental.pallas.triton")


def _body(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2.0 + 1.0


def _call(interpret: bool, debug: bool = False):
    def f(x):
        return pl.pallas_call(
            pallas_pdl.early_launch(_body, interpret=interpret, tag="proj"),
            out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
            grid=(x.shape[0] // 8,),
            in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
            out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
            compiler_params=plgpu.CompilerParams(num_warps=4),
            interpret=interpret,
            debug=debug,
        )(x)

    return jax.jit(f)


def _triton_ir(capsys) -> str:
    capsys.readouterr()
    cuda_export_text(_call(False, debug=True), jax.ShapeDtypeStruct((24, 128), jnp.float32))
    out = capsys.readouterr().out
    return out[out.index("tt.func") :]  # the Triton IR (debug prints the jaxpr first)


def test_signal_is_in_the_triton_ir_before_the_body(capsys, monkeypatch):
    monkeypatch.setattr(pallas_pdl, "ENABLED", frozenset({"proj"}))
    ir = _triton_ir(capsys)
    asm = [ln for ln in ir.splitlines() if "tt.elementwise_inline_asm" in ln]
    assert len(asm) == 1 and "griddepcontrol.launch_dependents" in asm[0]
    # the body (its load and store) sits in the branch on the asm's result, after it
    first_load = ir.index("tt.load")
    assert ir.index("griddepcontrol.launch_dependents") < ir.index("scf.if") < first_load


def test_switched_off_leaves_the_kernel_alone(capsys, monkeypatch):
    monkeypatch.setattr(pallas_pdl, "ENABLED", frozenset({"attention"}))  # not this kernel's tag
    ir = _triton_ir(capsys)
    assert "griddepcontrol" not in ir and "tt.load" in ir


def test_interpreter_runs_the_body_unchanged():
    assert pallas_pdl.early_launch(_body, interpret=True, tag="proj") is _body
    x = jax.random.normal(jax.random.key(0), (24, 128), jnp.float32)
    assert_close(_call(True)(x), np.asarray(x) * 2 + 1, "op_fp32", "interpreter")


def test_env_spec_parses_and_rejects_unknown_tags():
    assert pallas_pdl._enabled("0") == frozenset()
    assert pallas_pdl._enabled("all") == frozenset(pallas_pdl.TAGS)
    assert pallas_pdl._enabled("attention, proj") == {"attention", "proj"}
    with pytest.raises(ValueError, match="tags must come from"):
        pallas_pdl._enabled("attn")
    with pytest.raises(ValueError, match="unknown kernel tag"):
        pallas_pdl.early_launch(_body, interpret=False, tag="attn")


@pytest.fixture
def fresh_traces():
    """Kernel bodies are traced once per shape and cached: clear around a test that flips
    :data:`pallas_pdl.ENABLED`, so it sees its own setting and leaves no signalling trace behind."""
    jax.clear_caches()
    yield
    jax.clear_caches()


def _exported(fn, *specs) -> str:
    text = cuda_export_text(fn, *specs)
    assert f"custom_call @{TRITON_CALL}" in text
    return text


@pytest.mark.parametrize("tuning", [(), (("down", "split"),), (("experts", "blocks"),)])
def test_decode_kernels_lower_for_cuda_with_the_signal(tuning, fresh_traces, monkeypatch):
    """The opt-in path stays lowerable and changes the kernels: the one-token decode layer
    (logits, selection and the balanced / split / block expert kernels) and the attention
    kernel at the 8B shape, lowered with every kernel signalling and with none."""
    from test_kernels_pallas import NORM_EPS, _layer_specs

    from prunepath_jax.kernels import pallas_decode as pd
    from prunepath_jax.kernels.pallas_attention import decode_attention_rope

    def layer(x, r, w_in, w_out, tau):
        return pd._decode_jit(x, r, w_in, w_out, tau, None, group_size=32, interpret=False,
                              tuning=tuning, norm_eps=NORM_EPS, rule="paper", gate="sigmoid",
                              k_min=1, k_max=None)  # fmt: skip

    f = jax.ShapeDtypeStruct
    att_specs = (f((1, 48, 128), jnp.bfloat16), f((1, 64), jnp.float32),
                 f((1, 64), jnp.float32), f((1, 256, 8, 128), jnp.bfloat16),
                 f((1, 256, 8, 128), jnp.bfloat16), f((1,), jnp.int32))  # fmt: skip
    texts = {}
    for on in (True, False):
        monkeypatch.setattr(pallas_pdl, "ENABLED", frozenset(pallas_pdl.TAGS if on else ()))
        jax.clear_caches()
        texts[on] = (
            _exported(jax.jit(layer), *_layer_specs(1, 4096, 448, 32, jnp.bfloat16, ())),
            _exported(jax.jit(lambda *a: decode_attention_rope(*a, n_heads=32)), *att_specs),
        )
    assert texts[True][0] != texts[False][0] and texts[True][1] != texts[False][1]


@pytest.mark.gpu
def test_gpu_chain_of_early_launching_kernels_reads_what_the_last_wrote(fresh_traces, monkeypatch):
    """Eight dependent launches (each doubles and adds 1): if a successor read before its
    predecessor finished, the sum would be off."""
    monkeypatch.setattr(pallas_pdl, "ENABLED", frozenset(pallas_pdl.TAGS))
    f = _call(False)
    x = jax.random.normal(jax.random.key(1), (4096, 128), jnp.float32)
    got = jax.jit(lambda v: f(f(f(f(f(f(f(f(v)))))))))(x)
    want = np.asarray(x, np.float64)
    for _ in range(8):
        want = want * 2 + 1
    assert_close(got, want, "op_fp32", "8 early-launching kernels")
