"""The multi-host code path on one machine: two processes (one fake CPU device each, gloo
collectives, `jax.distributed.initialize` from the environment) run the sharded training step
and get exactly the losses of one process over two devices, and take one ``ffn_kernels_auto``
choice."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers import assert_close  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "multiprocess_step.py"


def _result(out: str) -> dict:
    lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
    assert lines, out[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    one = subprocess.run([sys.executable, str(SCRIPT), "--cpu-devices", "2"], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    ref = _result(one.stdout + one.stderr)
    port = _free_port()
    procs = []
    for i in range(2):
        e = {**env, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
             "JAX_PROCESS_ID": str(i)}  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, str(SCRIPT), "--distributed", "--cpu-devices", "1"], env=e,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outs = [p.communicate(timeout=300)[0] for p in procs]
    if any("gloo" in o.lower() and "not" in o.lower() and "RESULT" not in o for o in outs):
        pytest.skip("this jaxlib has no CPU (gloo) collectives")
    res = [_result(o) for o in outs]
    assert [r["processes"] for r in res] == [2, 2] and res[0]["devices"] == 2
    assert ref["processes"] == 1 and ref["devices"] == 2
    for r in res:
        assert_close(r["losses"], ref["losses"], "op_fp32", f"process {r['process']} losses")
    # ffn_kernels_auto: process 1 proposed "kernels", process 0 "masked"; both run process 0's
    assert [r["agreed"] for r in res] == ["masked", "masked"] and ref["agreed"] == "masked"
