"""The loop-body reader of scripts/step_hlo.py: the XLA kernels around the one-launch step."""

from __future__ import annotations

from helpers import load_script

# A trimmed optimized-HLO text in the form XLA prints it: a while loop whose body holds a fusion,
# the Triton custom call with a tuple shape (index comments included), a tuple-shaped reduce
# fusion and a bitcast (no kernel); the entry computation's fusion is outside the loop.
HLO = """\
%fused_add (p: s32[]) -> s32[] {
  %p = s32[] parameter(0)
  ROOT %a = s32[] add(%p, %p)
}

%region_body.8 (arg: (s32[], f32[4])) -> (s32[], f32[4]) {
  %arg = (s32[], f32[4]{0}) parameter(0)
  %loop_add_fusion = s32[] fusion(%g0), kind=kLoop, calls=%fused_add
  %triton_kernel_call.1 = (f32[8]{0}, bf16[2,4]{1,0}, /*index=2*/s32[3]{0}) custom-call(%g1), \
custom_call_target="__gpu$xla.gpu.triton", api_version=API_VERSION_TYPED_FFI
  %input_reduce_fusion = (f32[5]{0}, s32[5]{0}) fusion(%g2), kind=kInput, calls=%fused_reduce
  %bitcast.1 = f32[4,1]{1,0} bitcast(%g3)
  ROOT %t = (s32[], f32[4]{0}) tuple(%loop_add_fusion, %g3)
}

ENTRY %main (x: f32[4]) -> f32[4] {
  %outside = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_add
  %w = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%region_body.8
  ROOT %r = f32[4]{0} get-tuple-element(%w), index=1
}
"""


def _module():
    return load_script("step_hlo")


def test_body_kernels_lists_the_loop_body_launches_only():
    lines = _module().body_kernels(HLO.replace("\\\n", ""))
    assert [ln.split()[1] for ln in lines] == [
        "%loop_add_fusion", "%triton_kernel_call.1", "%input_reduce_fusion"
    ]  # fmt: skip
    assert all(ln.startswith("region_body.8: ") for ln in lines)
    assert lines[0].endswith("s32[] fusion kLoop")
    assert lines[1].endswith("custom-call __gpu$xla.gpu.triton")
    assert "(f32[5]{0}, s32[5]{0}) fusion kInput" in lines[2]
