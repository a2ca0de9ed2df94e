"""The one tolerance table every test uses (DESIGN.md section 6), and small shared helpers.

Never loosen a value here to make a test pass: find the cause instead.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

# Lowering for the H200 without a GPU (one place for the tests and scripts/megastep_census.py).
from prunepath_jax.kernels.sm90 import compile_sm90 as sm90_compile  # noqa: F401

TOL = {
    "op_fp32": 1e-5,  # simple ops in float32
    "model_fp32": 1e-4,  # whole models in float32
    "gguf_fp32": 1e-3,  # our GGUF path vs transformers' GGUF path on real text
    "bf16": 2e-2,  # anything computed in bfloat16
}


def assert_close(actual, expected, tol: str, what: str = "") -> None:
    """Asserts finiteness first, then max |a - e| <= TOL[tol] * max(1, max |e|)."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    assert np.isfinite(a).all(), f"{what}: non-finite values in actual"
    assert np.isfinite(e).all(), f"{what}: non-finite values in expected"
    scale = max(1.0, float(np.abs(e).max(initial=0.0)))
    err = float(np.abs(a - e).max(initial=0.0))
    assert err <= TOL[tol] * scale, f"{what}: max abs err {err:.3e} > {TOL[tol]} * {scale:.3g}"


TRITON_CALL = "__gpu$xla.gpu.triton"


def cuda_export_text(fn, *args) -> str:
    """The MLIR module ``fn`` (jitted) exports to for CUDA on this machine: the real Triton
    lowering runs, so Triton-only errors (non-power-of-2 blocks, ops Triton cannot lower) fail
    here without a GPU. ``args``: arrays or ``jax.ShapeDtypeStruct``."""
    import jax

    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    return jax.export.export(fn, platforms=["cuda"], disabled_checks=checks)(*args).mlir_module()


def exported_dots(fn, *args, platform: str = "cuda") -> list[str]:
    """The type signature (``(lhs, rhs) -> out``) of every ``dot_general`` ``fn`` (jitted)
    exports to for ``platform``: which products run in which dtype there."""
    import jax

    text = jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()
    lines = [ln for ln in text.splitlines() if "stablehlo.dot_general" in ln]
    return [ln.split(" : ")[-1].split(" loc(")[0] for ln in lines]


def operand_dtypes(dot: str) -> list[str]:
    """The operands' element types of one :func:`exported_dots` signature."""
    import re

    return re.findall(r"tensor<(?:\d+x)*(\w+)>", dot.split(" -> ")[0])


def zeros_triton_call(launched: list | None = None):
    """A stand-in for ``jt.triton_call`` where jax-triton cannot run (a CPU jaxlib): returns
    zeros of the output shapes, and appends ``(kernel, keyword arguments)`` of each launch to
    ``launched``. For tests that read shapes, launches and the XLA graph around the kernels."""
    import jax.numpy as jnp

    def call(kernel, *args, out_shape, **kw):
        if launched is not None:
            launched.append((kernel, kw))
        return tuple(jnp.zeros(o.shape, o.dtype) for o in out_shape)

    return call


def cuda_triton_calls(fn, *args) -> int:
    """How many Triton kernels ``fn`` (jitted) lowers to for CUDA (:func:`cuda_export_text`)."""
    return cuda_export_text(fn, *args).count(f"custom_call @{TRITON_CALL}")


def fresh_cache_prompt_passes(model, tokens_bt, cache_len: int):
    """The prompt pass of ``tokens_bt`` from position 0 into an empty fp32 cache, with
    ``fresh_cache=True`` (causal attention within the prompt) and without (masked attention over
    the cache); asserts they agree -- logits and written keys/values within the fp32 model
    tolerance, layer 0's keys/values (from the embeddings alone) exactly -- and returns both
    outputs."""
    import jax.numpy as jnp

    from prunepath_jax.models.layers import init_cache

    b, t = tokens_bt.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    fresh, masked = (
        model(tokens_bt, positions, cache=init_cache(model.cfg, b, cache_len, jnp.float32),
              fresh_cache=f)
        for f in (True, False)
    )  # fmt: skip
    assert_close(fresh.logits, masked.logits, "model_fp32", "fresh-cache logits")
    for i, (cf, cm) in enumerate(zip(fresh.cache, masked.cache, strict=True)):
        if i == 0:  # from the embeddings alone: the same arrays; later layers see attention
            np.testing.assert_array_equal(cf.k, cm.k)
            np.testing.assert_array_equal(cf.v, cm.v)
        assert_close(cf.k, cm.k, "model_fp32", f"layer {i} keys")
        assert_close(cf.v, cm.v, "model_fp32", f"layer {i} values")
    return fresh, masked


def fresh_traces() -> None:
    """Forgets every compiled program, so the next jitted call traces again.

    Why: spies that count a kernel's calls count traces, and ``flatjit.bind`` keeps one jitted
    function per (model graph, step): a test whose model has the same graph and shapes as an
    earlier test's would reuse that trace and see no calls (the H100 GPU run of 2026-12-06:
    ``test_gpu_generate_pallas_attention_matches_xla[1]`` after the projection test's batch 1).
    """
    import jax

    from prunepath_jax import flatjit

    flatjit._bound.cache_clear()
    jax.clear_caches()


def prefill_cache(model, tokens_bt, cache_len: int):
    """The cache after one (XLA) prompt pass of ``tokens_bt`` from position 0 into an empty cache
    of ``cache_len`` positions in the model's dtype: the start of a decode-step comparison."""
    import jax.numpy as jnp

    from prunepath_jax.models.layers import init_cache

    b, t = tokens_bt.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = init_cache(model.cfg, b, cache_len, model.embed_tokens.embedding.dtype)
    return model(tokens_bt, pos, cache=cache).cache


def run_triton_interpreted(argv: list[str], timeout: int = 600) -> str:
    """Runs ``python *argv`` with ``TRITON_INTERPRET=1`` on CPU jax and returns its stdout,
    failing the test with its stderr. A fresh process because the variable only works when set
    before triton is first imported."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def interpreted_npz(tmp_path_factory, runner: str, timeout: int = 600) -> dict:
    """The arrays ``tests/<runner>.py OUT.npz`` writes, run under the Triton interpreter
    (``run_triton_interpreted``): each interpreter test module's results fixture."""
    out = tmp_path_factory.mktemp(runner) / "out.npz"
    run_triton_interpreted([str(Path(__file__).parent / f"{runner}.py"), str(out)], timeout)
    return dict(np.load(out))


def load_script(name: str, folder: str = "scripts"):
    """``<folder>/<name>.py`` (``scripts`` or ``benchmarks``) as a module (neither is a
    package; both import from ``benchmarks/``, so that goes on the path first)."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, root / folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
