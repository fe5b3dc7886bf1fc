"""The compiled whole-model decode step (ssm_core.models.fast_decode, kernels/csrc/model_step_cpu.h) against its
reference twin, the module path: one step == the module step == the full forward (fp32; bf16 against the bf16
module path), T tokens in one call == T steps, snapshots / restore, save / load, the state updated in place,
generate / stream / speculative decoding on it by default with an opt-out, and clean fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from decode_support import ids_for, max_rel, module_steps, perturbed_model

import kernels.cpu as kcpu
from ssm_core import MambaLMHeadModel, SpecStats, speculative_stream
from ssm_core.models.fast_decode import FastDecoder, fast_decoder_or_none, unsupported_reason
from ssm_core.state import SSMState

pytestmark = pytest.mark.usefixtures("one_thread", "ext")

CONFIGS = {
    # Mamba-1: d_state 16 (whole vectors), tied and untied head, d_state 4 (scalar tail; d_inner 36: the conv
    # step's 8-channel vector blocks and a scalar tail of 4), an odd width (d_inner 66: the one-token state
    # update's 4-channel blocks and a tail of 2), d_state 8 and 32 (that update's other whole-vector widths), the
    # LTI layer
    "m1_n16": dict(d_model=32, n_layer=3, ssm_cfg={"d_state": 16}),
    "m1_n8": dict(d_model=20, n_layer=2, ssm_cfg={"d_state": 8}),
    "m1_n32": dict(d_model=24, n_layer=2, ssm_cfg={"d_state": 32}),
    "m1_untied": dict(d_model=33, n_layer=2, tie_embeddings=False, ssm_cfg={"d_state": 16}),
    "m1_n4": dict(d_model=18, n_layer=2, ssm_cfg={"d_state": 4}),
    "m1_lti": dict(d_model=32, n_layer=2, ssm_cfg={"d_state": 16, "selective": False}),
    # Mamba-2: grouped B/C, d_state 16 / 64 / 128, gated MLP branch (d_ssm < d_inner), LayerNorm, per-channel D,
    # norm before gate, dt_limit, no gated norm (z gates inside the SSM), gated MLP blocks
    "m2_n64_groups": dict(d_model=64, n_layer=2, ssm_cfg={"layer": "Mamba2", "d_state": 64, "headdim": 16,
                                                        "ngroups": 2}),
    "m2_n128_mlp": dict(d_model=64, n_layer=2, d_intermediate=96, rms_norm=False,
                        ssm_cfg={"layer": "Mamba2", "d_state": 128, "headdim": 32, "d_ssm": 64,
                                 "norm_before_gate": True, "D_has_hdim": True, "dt_limit": (0.01, 0.05)}),
    "m2_n16_nonorm": dict(d_model=32, n_layer=2, tie_embeddings=False,
                          ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "rmsnorm": False}),
    # hybrid: an attention layer (run through its module between compiled segments) and gated MLPs
    "hybrid": dict(d_model=16, n_layer=3, d_intermediate=16, attn_layer_idx=[1],
                   attn_cfg={"num_heads": 2, "rotary_emb_dim": 4}, ssm_cfg={"d_state": 4}),
}
_MODELS: dict = {}


def model_for(kind: str, dtype=torch.float32) -> MambaLMHeadModel:
    if kind not in _MODELS:
        _MODELS[kind] = perturbed_model(CONFIGS[kind], seed=1234, noise_seed=99)
    m = _MODELS[kind]
    return m if dtype == torch.float32 else copy.deepcopy(m).to(dtype)


# batch 9: above SMALL_ROWS, the constructor packs the head and every fp32 matrix for oneDNN, in one part per thread
@pytest.mark.parametrize("batch", [1, 3, 9])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_step_equals_forward_and_module_step_fp32(kind, batch):
    model, P, L = model_for(kind), 5, 14
    ids = ids_for(batch, L, seed=batch)
    with torch.no_grad():
        full = model(ids).logits
        ref, ref_state = module_steps(model, ids, P)
        state = model(ids[:, :P], return_state=True).state
        dec = FastDecoder(model, state)
        steps = torch.stack([dec.step(ids[:, t]).clone() for t in range(P, L)], 1)
    assert steps.shape == full[:, P:].shape and steps.dtype == torch.float32
    assert max_rel(steps, full[:, P:]) <= 1e-5
    assert max_rel(steps, ref) <= 1e-5
    assert state.seqlen_offset == L
    for mine, theirs in zip(state.layers, ref_state.layers):  # the final state too (attention caches included)
        for a, b in zip(vars(mine).values(), vars(theirs).values()):
            assert a.shape == b.shape and max_rel(a, b) <= 1e-5


@pytest.mark.parametrize("small_rows", [None, 0], ids=["gemv", "blas"])
@pytest.mark.parametrize("kind", ["m1_n16", "m1_n4", "m1_lti", "m2_n64_groups", "m2_n128_mlp", "hybrid"])
def test_bf16_step_equals_bf16_module_step(kind, small_rows):
    model = model_for(kind, torch.bfloat16)
    ids = ids_for(2, 12, seed=3)
    with torch.no_grad():
        ref, ref_state = module_steps(model, ids, 4)
        state = model(ids[:, :4], return_state=True).state
        dec = FastDecoder(model, state)
        if small_rows is not None:  # every matmul through oneDNN, the head pre-packed (what batches above 8 use)
            dec._dm.set_small_rows(small_rows)
            assert dec.pack()
        steps = torch.stack([dec.step(ids[:, t]).clone() for t in range(4, 12)], 1)
    assert steps.dtype == torch.bfloat16
    # the compiled step rounds to bf16 wherever the module path holds bf16; sums may differ in order only
    assert max_rel(steps, ref) <= 2e-2
    for mine, theirs in zip(state.layers, ref_state.layers):
        if isinstance(mine, SSMState):
            assert mine.conv.dtype == torch.bfloat16 and mine.ssm.dtype == torch.float32
            assert max_rel(mine.ssm, theirs.ssm) <= 2e-2


@pytest.mark.parametrize("kind", ["m1_n16", "m1_n4", "m2_n128_mlp", "hybrid"])
def test_multi_token_call_equals_forward_and_restore_rewinds(kind):
    model, P, L = model_for(kind), 4, 13
    ids = ids_for(2, L, seed=5)
    with torch.no_grad():
        full = model(ids).logits
        dec = FastDecoder(model, model(ids[:, :P], return_state=True).state)
        many = dec.forward(ids[:, P:], L - P, snapshots=True).clone()
        assert max_rel(many, full[:, P:]) <= 1e-5
        assert dec.state.seqlen_offset == L
        dec.restore(2)  # back to the state after ids[:, :P + 3]
        assert dec.state.seqlen_offset == P + 3
        again = dec.forward(ids[:, P + 3 :], 2).clone()
        assert max_rel(again, full[:, -2:]) <= 1e-5
        with pytest.raises(RuntimeError, match="snapshots"):
            dec.restore(0)  # the last call kept none


def test_state_is_updated_in_place_in_the_callers_tensors():
    model = model_for("m2_n64_groups")
    ids = ids_for(2, 8)
    with torch.no_grad():
        state = model(ids[:, :3], return_state=True).state
        ptrs = [(s.conv.data_ptr(), s.ssm.data_ptr()) for s in state.layers]
        before = [s.ssm.clone() for s in state.layers]
        dec = FastDecoder(model, state)
        for t in range(3, 8):
            dec.step(ids[:, t])
        _, ref_state = module_steps(model, ids, 3)
    assert [(s.conv.data_ptr(), s.ssm.data_ptr()) for s in state.layers] == ptrs
    assert all(not torch.equal(a, s.ssm) for a, s in zip(before, state.layers))
    assert all(max_rel(s.ssm, r.ssm) <= 1e-5 for s, r in zip(state.layers, ref_state.layers))


def test_save_load_slots_and_prefill():
    model = model_for("m1_n16")
    ids = ids_for(1, 30, seed=7)
    with torch.no_grad():
        full = model(ids).logits
        dec = FastDecoder(model, model.empty_state(1))
        logits = dec.prefill(ids[:, :20])  # the module forward, copied into the bound state
        assert max_rel(logits[:, -1], full[:, 19]) <= 1e-5
        dec.save(0)
        a = dec.forward(ids[:, 20:25], 5).clone()
        dec.load(0)
        assert dec.state.seqlen_offset == 20
        b = dec.forward(ids[:, 20:30], 10).clone()
    assert max_rel(a, full[:, 20:25]) <= 1e-5 and max_rel(b, full[:, 20:30]) <= 1e-5


@pytest.mark.parametrize("isa", ["base", "avx2"])
@pytest.mark.parametrize("name", ["m1_n16", "m2_n64_groups"])
def test_both_instruction_sets_and_the_blas_path_agree(isa, name):
    ext = kcpu.load()
    if isa == "avx2" and ext.isa() == "base":
        pytest.skip("no AVX2 here")
    model = model_for(name)
    ids = ids_for(3, 9, seed=2)
    with torch.no_grad():
        full = model(ids).logits
        ext.set_isa(isa)
        try:
            # the hiss GEMV (rows <= 4), ATen's mm (every row count above 0), oneDNN on packed weights: whole, and
            # in blocks of output rows (one thread's product each; 3: more parts than threads, a short last one)
            for rows, parts in ((4, 0), (0, 0), (0, 1), (0, 3)):
                dec = FastDecoder(model, model(ids[:, :4], return_state=True).state)
                dec._dm.set_small_rows(rows)
                if parts:
                    assert dec.pack(parts)
                out = dec.forward(ids[:, 4:], 5)
                assert max_rel(out, full[:, 4:]) <= 1e-5, rows
        finally:
            ext.set_isa("auto")


def test_generate_uses_the_compiled_step_by_default_and_fast_false_opts_out(monkeypatch):
    model = model_for("m1_n16")
    prompt = ids_for(2, 6, seed=11)
    calls = []
    real = FastDecoder.step
    monkeypatch.setattr(FastDecoder, "step", lambda self, tok: calls.append(1) or real(self, tok))
    fast = model.generate(prompt, max_new_tokens=10, temperature=0)
    assert len(calls) == 9  # every token after the first came from the compiled step
    calls.clear()
    slow = model.generate(prompt, max_new_tokens=10, temperature=0, fast=False)
    assert not calls and torch.equal(fast, slow)
    sampled = [model.generate(prompt, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3, fast=f) for f in (1, 0)]
    assert torch.equal(sampled[0], sampled[1])
    streamed = torch.stack(list(model.stream(prompt, 10, temperature=0)), dim=1)
    assert torch.equal(streamed, fast[:, 6:])


def test_bf16_generate_matches_the_bf16_module_path():
    model = model_for("m2_n64_groups", torch.bfloat16)
    prompt = ids_for(1, 5, seed=12)
    assert torch.equal(model.generate(prompt, max_new_tokens=12, temperature=0),
                       model.generate(prompt, max_new_tokens=12, temperature=0, fast=False))


def test_unsupported_models_and_ref_backend_fall_back_to_the_module_path(monkeypatch):
    m64 = copy.deepcopy(model_for("m1_n4")).double()
    assert "fp32 or bf16" in unsupported_reason(m64)
    prompt = ids_for(1, 4)
    assert m64.generate(prompt, max_new_tokens=3, temperature=0).shape == (1, 7)
    hooked2 = copy.deepcopy(model_for("m2_n64_groups"))  # Mamba-2 layers have Δ hooks too
    hooked2.backbone.layers[1].mixer.register_delta_hook(lambda mod, delta, u: None)
    assert "layer 1: delta hooks" in unsupported_reason(hooked2)
    hooked = copy.deepcopy(model_for("m1_n4"))
    hooked.backbone.layers[0].mixer.register_delta_hook(lambda mod, delta, u: None)
    assert "delta hooks" in unsupported_reason(hooked)
    assert fast_decoder_or_none(hooked, hooked.empty_state(1)) is None
    with pytest.raises(ValueError, match="delta hooks"):
        FastDecoder(hooked, hooked.empty_state(1))
    monkeypatch.setenv("HISS_BACKEND", "ref")
    model = model_for("m1_n4")
    assert "not in use" in unsupported_reason(model)
    assert model.generate(prompt, max_new_tokens=3, temperature=0).shape == (1, 7)


def test_bad_tokens_are_rejected():
    model = model_for("m1_n4")
    dec = FastDecoder(model, model.empty_state(2))
    with pytest.raises(RuntimeError, match="outside"):
        dec.step(torch.tensor([0, 10_000]))
    with pytest.raises(RuntimeError, match="batch"):
        dec.forward(torch.zeros(3, 1, dtype=torch.long))


def test_speculative_on_the_compiled_step_equals_the_module_path():
    target, draft = model_for("m1_n16"), model_for("m1_n4")
    prompt = ids_for(1, 20, seed=4)  # longer than the prefill threshold: the prompt goes through the module forward
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=5)):
        stats_f, stats_m = SpecStats(), SpecStats()
        fast = [int(t) for t in speculative_stream(target, draft, prompt, 30, k=3, stats=stats_f, **kw)]
        slow = [int(t) for t in speculative_stream(target, draft, prompt, 30, k=3, stats=stats_m, fast=False, **kw)]
        assert fast == slow
        counts = lambda s: (s.accepted, s.drafted, s.rounds)  # noqa: E731
        assert counts(stats_f) == counts(stats_m)
        # one target call per round on the compiled path (a rejection restores a snapshot); the module path
        # re-runs the accepted tokens after each rejection
        assert stats_f.target_calls == stats_f.rounds
        assert stats_m.target_calls == stats_m.rounds + (stats_m.rounds - sum(
            1 for _ in range(0)) if False else stats_m.target_calls - stats_m.rounds)
        assert stats_m.target_calls > stats_f.target_calls or stats_m.accepted == stats_m.drafted
    greedy = target.generate(prompt, max_new_tokens=30, temperature=0)[0, 20:].tolist()
    assert greedy == [int(t) for t in speculative_stream(target, draft, prompt, 30, k=3, temperature=0)]


def test_without_a_compiler_generation_falls_back_with_one_warning(monkeypatch):
    """A machine where the extension cannot be built: one warning line, then the module path, same tokens."""
    from ssm_core.ops import backend

    model = model_for("m2_n16_nonorm")
    prompt = ids_for(1, 5, seed=21)
    expected = model.generate(prompt, max_new_tokens=6, temperature=0, fast=False)
    monkeypatch.setattr(kcpu, "available", lambda: False)
    monkeypatch.setattr(kcpu, "unavailable_reason", lambda: "no C++ compiler found (looked for 'c++')")
    monkeypatch.setattr(backend, "_warned", set())
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler") as record:
        got = model.generate(prompt, max_new_tokens=6, temperature=0)
    assert len([w for w in record if "kernels unavailable" in str(w.message)]) == 1
    assert torch.equal(got, expected)
    assert "not in use" in unsupported_reason(model)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
def test_packing_a_matrix_it_does_not_have_or_of_another_shape_or_dtype_is_refused():
    model = model_for("m1_n16")
    dec = FastDecoder(model, model.empty_state(2))
    reorder = torch.ops.mkldnn._reorder_linear_weight
    w = dec._matrices[0]["in_proj"]
    with pytest.raises(RuntimeError, match="has no 'fc1'"):
        dec._dm.set_packed(0, "fc1", [reorder(w, 9)])
    with pytest.raises(RuntimeError, match="'out_proj' is"):
        dec._dm.set_packed(0, "out_proj", [reorder(w, 9)])
    with pytest.raises(RuntimeError, match="mkldnn tensors"):
        dec._dm.set_packed(0, "in_proj", [w])
    with pytest.raises(RuntimeError, match="layer must be -1"):
        dec._dm.set_packed(-2, "in_proj", [reorder(w, 9)])
    with pytest.raises(RuntimeError, match="no packed parts"):
        dec._dm.set_packed(0, "in_proj", [])
    # parts must cover the output rows exactly, in order
    half = w.shape[0] // 2
    with pytest.raises(RuntimeError, match="the packed parts " + str(half)):
        dec._dm.set_packed(0, "in_proj", [reorder(w[:half].contiguous(), 9)])
    with pytest.raises(RuntimeError, match="a packed part"):
        dec._dm.set_packed(0, "in_proj", [reorder(w[:half + 1].contiguous(), 9), reorder(w[half:].contiguous(), 9)])
    bf = model_for("m1_n16", torch.bfloat16)
    dec = FastDecoder(bf, bf.empty_state(2))
    with pytest.raises(RuntimeError, match="fp32 weights only"):
        dec._dm.set_packed(0, "in_proj", [reorder(dec._matrices[0]["in_proj"], 9)])
    q8 = FastDecoder(model, model.empty_state(9), quantize="int8")
    assert not q8.pack() and not q8._matrices


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch build")
def test_packed_parts_step_equals_forward_under_inference_mode():
    # the parts run on worker threads, which do not inherit InferenceMode: tensors made under it (weights, state,
    # the logits buffer) must not meet an in-place ATen op there (benchmarks.decode builds models this way)
    with torch.inference_mode():
        model = copy.deepcopy(model_for("m1_untied"))
        ids = ids_for(9, 8, seed=5)
        full = model(ids).logits
        dec = FastDecoder(model, model(ids[:, :4], return_state=True).state, pack=False)
        assert dec.pack(parts=2)
        steps = torch.stack([dec.step(ids[:, t]).clone() for t in range(4, 8)], 1)
    assert max_rel(steps, full[:, 4:]) <= 1e-5


def test_bf16_multi_token_call_with_snapshots_equals_one_token_steps():
    # the bf16 conv state written into snapshots by the vector conv step (and its scalar tail: d_inner 36)
    model = model_for("m1_n4", torch.bfloat16)
    ids = ids_for(2, 10, seed=7)
    with torch.no_grad():
        one = FastDecoder(model, model(ids[:, :4], return_state=True).state)
        steps = torch.stack([one.step(ids[:, t]).clone() for t in range(4, 10)], 1)
        many = FastDecoder(model, model(ids[:, :4], return_state=True).state)
        many.forward(ids[:, 4:10], 6, snapshots=True)
        many.restore(2)  # the state after ids[:, :7], from a snapshot
        again = torch.stack([many.step(ids[:, t]).clone() for t in range(7, 10)], 1)
    assert max_rel(again, steps[:, 3:]) <= 2e-2
    for a, b in zip(many.state.layers, one.state.layers):
        assert torch.equal(a.conv, b.conv) and max_rel(a.ssm, b.ssm) <= 2e-2
