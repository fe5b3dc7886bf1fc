"""int8 weight-only decoding (FastDecoder(..., quantize="int8"), kernels/csrc/model_step_cpu.h): the quantisation
error bound, and the int8 step == the module path of the model whose matrices hold the same int8 weights
dequantised (``dequantized_copy``), for Mamba-1 / Mamba-2 / gated-MLP / hybrid models, batch 1 and batch > 8
(the dequantise-in-blocks + mm path), multi-token calls, both instruction sets; bytes streamed; generation."""

from __future__ import annotations

import copy

import pytest
import torch
from decode_support import ids_for, max_rel, module_steps, perturbed_model

import kernels.cpu as kcpu
from ssm_core import MambaLMHeadModel
from ssm_core.models.fast_decode import FastDecoder, dequantized_copy, quantize_int8
from ssm_core.state import SSMState

pytestmark = pytest.mark.usefixtures("one_thread", "ext")

CONFIGS = {
    "m1": dict(d_model=32, n_layer=2, ssm_cfg={"d_state": 16}),  # tied head: the embedding is int8 too
    "m1_untied": dict(d_model=24, n_layer=2, tie_embeddings=False, ssm_cfg={"d_state": 4}),  # K % 8 != 0 tails
    "m2_mlp": dict(d_model=64, n_layer=2, d_intermediate=96, rms_norm=False,
                   ssm_cfg={"layer": "Mamba2", "d_state": 32, "headdim": 16, "d_ssm": 64, "ngroups": 2}),
    "hybrid": dict(d_model=16, n_layer=3, d_intermediate=16, attn_layer_idx=[1],
                   attn_cfg={"num_heads": 2, "rotary_emb_dim": 4}, ssm_cfg={"d_state": 4}),
}
_MODELS: dict = {}


def model_for(kind: str) -> MambaLMHeadModel:
    if kind not in _MODELS:
        m = perturbed_model(CONFIGS[kind], seed=4321, noise_seed=7)
        _MODELS[kind] = (m, dequantized_copy(m))
    return _MODELS[kind]


def test_quantize_int8_error_bound_per_row():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 53, generator=g) * torch.logspace(-3, 2, 37)[:, None]
    w[5] = 0.0  # an all-zero row
    w[9, 3] = 1e4  # an outlier
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == w.shape and s.shape == (37,)
    assert int(q.abs().max()) <= 127 and bool((q != -128).all())
    err = (w - q.float() * s[:, None]).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-5)).all())
    nonzero = w.abs().amax(1) > 0
    assert bool((q[nonzero].abs().amax(1) == 127).all())  # the row's largest |w| maps to +-127
    assert bool((q[5] == 0).all()) and s[5] == 1.0
    # bf16 weights are quantised from their exact fp32 values
    qb, sb = quantize_int8(w.bfloat16())
    assert bool(((w.bfloat16().float() - qb.float() * sb[:, None]).abs() <= sb[:, None] / 2 * (1 + 1e-5)).all())


@pytest.mark.parametrize("batch", [1, 10])  # 10 > small_rows (8): the dequantise-in-blocks + mm path
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_int8_step_equals_the_dequantized_fp32_module_path(kind, batch):
    model, twin = model_for(kind)
    P, L = 4, 11
    ids = ids_for(batch, L, seed=batch)
    with torch.no_grad():
        ref, ref_state = module_steps(twin, ids, P)
        state = twin(ids[:, :P], return_state=True).state
        dec = FastDecoder(model, state, quantize="int8")
        steps = torch.stack([dec.step(ids[:, t]).clone() for t in range(P, L)], 1)
        plain = FastDecoder(model, twin(ids[:, :P], return_state=True).state).step(ids[:, P])
    assert steps.dtype == torch.float32 and steps.shape == ref.shape
    assert max_rel(steps, ref) <= 1e-4
    assert max_rel(plain, ref[:, 0]) > 1e-4  # (the test can tell int8 weights from the fp32 ones)
    for mine, theirs in zip(state.layers, ref_state.layers):
        for a, b in zip(vars(mine).values(), vars(theirs).values()):
            assert a.shape == b.shape and max_rel(a, b) <= 1e-4


@pytest.mark.parametrize("kind", ["m1", "m2_mlp", "hybrid"])
@pytest.mark.parametrize("batch", [1, 2])  # 1 x 7 tokens: the GEMV (7 rows); 2 x 7: the mm path (14 rows)
def test_int8_multi_token_call_prefill_and_restore(kind, batch):
    model, twin = model_for(kind)
    P, L = 4, 11
    ids = ids_for(batch, L, seed=3)
    with torch.no_grad():
        full = twin(ids).logits
        dec = FastDecoder(model, model.empty_state(batch), quantize="int8")
        dec.PREFILL_CHUNK = 3  # the prompt in pieces of 3 tokens, state carried
        pre = dec.prefill(ids[:, :P], n_last=P).clone()
        assert max_rel(pre, full[:, :P]) <= 1e-4 and dec.state.seqlen_offset == P
        many = dec.forward(ids[:, P:], L - P, snapshots=True).clone()
        assert max_rel(many, full[:, P:]) <= 1e-4
        dec.restore(1)
        again = dec.forward(ids[:, P + 2 :], 1).clone()
        assert max_rel(again[:, 0], full[:, -1]) <= 1e-4


@pytest.mark.parametrize("isa", ["base", "avx2"])
def test_int8_both_instruction_sets_and_the_mm_path_agree(isa):
    ext = kcpu.load()
    if isa == "avx2" and ext.isa() == "base":
        pytest.skip("no AVX2 here")
    model, twin = model_for("m2_mlp")
    ids = ids_for(3, 9, seed=2)
    with torch.no_grad():
        full = twin(ids).logits
        ext.set_isa(isa)
        try:
            for rows in (8, 0):  # 8: 3 rows x 1 token on the int8 GEMV, 3 x 4 on the mm path; 0: mm only
                dec = FastDecoder(model, twin(ids[:, :4], return_state=True).state, quantize="int8")
                dec._dm.set_small_rows(rows)
                out = torch.cat([dec.forward(ids[:, 4:5], 1).clone(), dec.forward(ids[:, 5:], 4)], 1)
                assert max_rel(out, full[:, 4:]) <= 1e-4, rows
        finally:
            ext.set_isa("auto")


def test_int8_on_a_bf16_model_follows_the_bf16_module_path():
    model, _ = model_for("m1")
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    twin = dequantized_copy(m16)
    ids = ids_for(2, 9, seed=4)
    with torch.no_grad():
        ref, _ = module_steps(twin, ids, 4)
        state = twin(ids[:, :4], return_state=True).state
        dec = FastDecoder(m16, state, quantize="int8")
        steps = torch.stack([dec.step(ids[:, t]).clone() for t in range(4, 9)], 1)
    assert steps.dtype == torch.bfloat16
    assert all(s.conv.dtype == torch.bfloat16 for s in state.layers if isinstance(s, SSMState))
    # the twin holds q s rounded to bf16, the kernel q s in fp32: a few bf16 ulps
    assert max_rel(steps, ref) <= 3e-2


def test_weight_bytes_counts_int8_values_and_scales():
    model, _ = model_for("m2_mlp")
    fp32 = FastDecoder(model, model.empty_state(1))
    q8 = FastDecoder(model, model.empty_state(1), quantize="int8")
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # tied head counted once
    assert fp32.weight_bytes == params
    quantised = [model.lm_head] + [m for layer in model.backbone.layers
                                   for m in (layer.mixer.in_proj, layer.mixer.out_proj, layer.mlp.fc1, layer.mlp.fc2)]
    saved = sum(m.weight.numel() * 3 - m.weight.shape[0] * 4 for m in quantised)  # 4 -> 1 byte, + a scale per row
    assert q8.weight_bytes == params - saved
    with pytest.raises(ValueError, match="quantize"):
        FastDecoder(model, model.empty_state(1), quantize="int4")


def test_generate_with_int8_weights():
    model, twin = model_for("m1")
    prompt = ids_for(2, 6, seed=11)
    state = twin(prompt[:, :3], return_state=True).state
    before = [t.clone() for s in state.layers for t in vars(s).values()]
    got = model.generate(prompt, max_new_tokens=10, temperature=0, quantize="int8")
    assert got.shape == (2, 16) and torch.equal(got[:, :6], prompt)
    # greedy tokens of the dequantised twin's module path (int8 weights, fp32 everything else)
    assert torch.equal(got, twin.generate(prompt, max_new_tokens=10, temperature=0, fast=False))
    streamed = torch.stack(list(model.stream(prompt, 10, temperature=0, quantize="int8")), 1)
    assert torch.equal(streamed, got[:, 6:])
    one = model.generate(prompt, max_new_tokens=1, temperature=0, quantize="int8")
    assert torch.equal(one, got[:, :7])
    cont = model.generate(prompt[:, 3:], max_new_tokens=4, temperature=0, state=state, quantize="int8")
    assert torch.equal(cont[:, 3:], got[:, 6:10])
    assert all(torch.equal(a, t) for a, t in zip(before, (t for s in state.layers for t in vars(s).values())))
    with pytest.raises(ValueError, match="fast=False"):
        model.generate(prompt, max_new_tokens=2, quantize="int8", fast=False)
    with pytest.raises(ValueError, match="quantize"):
        model.generate(prompt, max_new_tokens=2, quantize="fp8")


def test_int8_without_the_compiled_step_raises(monkeypatch):
    model, _ = model_for("m1")
    monkeypatch.setenv("HISS_BACKEND", "ref")
    with pytest.raises(RuntimeError, match="compiled"):
        model.generate(ids_for(1, 4), max_new_tokens=3, quantize="int8")
