"""Bad input at the API's boundaries (issue 16, item 6): Mamba, Mamba2, MHA, Block, MixerModel and
MambaLMHeadModel say what they expected and what they got, instead of a raw torch or unpacking error.

One catalogue: each case is (what is wrong, the call, the exception type, a regex the message must match).
"""

from __future__ import annotations

import re

import pytest
import torch

from ssm_core import MHA, Mamba, Mamba2, MambaConfig, MambaLMHeadModel, ModelState, SSMState, load_state, save_state

pytestmark = pytest.mark.usefixtures("one_thread")

D = 16


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    m1, m2 = Mamba(D, d_state=8), Mamba2(D, headdim=8, d_state=8)
    mha = MHA(D, num_heads=2)
    lm = MambaLMHeadModel(MambaConfig(d_model=D, n_layer=2, vocab_size=10, ssm_cfg={"d_state": 8}))
    hybrid = MambaLMHeadModel(MambaConfig(d_model=D, n_layer=2, vocab_size=10, ssm_cfg={"d_state": 8},
                                          attn_layer_idx=[1], attn_cfg={"num_heads": 2}))
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        s1 = m1(x, return_state=True)[1]
        s2 = m2(x, return_state=True)[1]
        sa = mha(x, return_state=True)[1]
        ms = lm(torch.randint(0, 10, (2, 5)), return_state=True).state
    return dict(m1=m1, m2=m2, mha=mha, lm=lm, hybrid=hybrid, block=lm.backbone.layers[0], x=x, s1=s1, s2=s2,
                sa=sa, ms=ms)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# (case id, call(parts), exception, message regex)
CASES = [
    # inputs to a block: rank, d_model, length, dtype, not a tensor
    ("mamba-2d", lambda p: p["m1"](randn(5, D)), ValueError,
     r"^Mamba: expected the input of shape \(batch, L, d_model=16\), got a 2-D float32 tensor of shape \(5, 16\); "
     r"for one sequence add the batch dimension: x.unsqueeze\(0\)$"),
    ("mamba-4d", lambda p: p["m1"](randn(1, 2, 5, D)), ValueError,
     r"^Mamba: expected the input of shape \(batch, L, d_model=16\), got a 4-D float32 tensor of shape "
     r"\(1, 2, 5, 16\)$"),
    ("mamba-wrong-d_model", lambda p: p["m1"](randn(2, 5, 8)), ValueError,
     r"got a 3-D float32 tensor of shape \(2, 5, 8\): its last dimension must be d_model=16$"),
    ("mamba-empty-L", lambda p: p["m1"](randn(2, 0, D)), ValueError, r"it has no positions \(L must be at least 1\)"),
    ("mamba-int-input", lambda p: p["m1"](torch.randint(0, 5, (2, 5, D))), ValueError,
     r"^Mamba: expected a floating-point input, got a 3-D int64 tensor .*token ids go to MambaLMHeadModel"),
    ("mamba-fp64-input", lambda p: p["m1"](randn(2, 5, D, dtype=torch.float64)), ValueError,
     r"^Mamba: the input is torch.float64 but the weights are torch.float32; convert the input "
     r"\(x.to\(torch.float32\)\) or the module \(.to\(torch.float64\)\)$"),
    ("mamba-fp16-input", lambda p: p["m1"](randn(2, 5, D, dtype=torch.float16)), ValueError,
     r"the input is torch.float16 but the weights are torch.float32"),
    ("mamba-list-input", lambda p: p["m1"]([[0.0] * D]), TypeError,
     r"^Mamba: expected the input as a tensor of shape \(batch, L, d_model=16\), got a list$"),
    ("mamba2-2d", lambda p: p["m2"](randn(5, D)), ValueError, r"^Mamba2: expected the input of shape"),
    ("mamba2-wrong-d_model", lambda p: p["m2"](randn(2, 5, 32)), ValueError,
     r"^Mamba2: .*its last dimension must be d_model=16"),
    ("mamba2-fp64-input", lambda p: p["m2"](randn(2, 5, D, dtype=torch.float64)), ValueError,
     r"^Mamba2: the input is torch.float64 but the weights are torch.float32"),
    ("mamba2-bad-seq_idx", lambda p: p["m2"](p["x"], seq_idx=torch.zeros(2, 4, dtype=torch.int32)), ValueError,
     r"^Mamba2: seq_idx must be an integer tensor of shape \(batch, L\) = \(2, 5\), got a 2-D int32 tensor"),
    ("mha-2d", lambda p: p["mha"](randn(5, D)), ValueError, r"^MHA: expected the input of shape"),
    ("mha-fp64-input", lambda p: p["mha"](randn(2, 5, D, dtype=torch.float64)), ValueError,
     r"^MHA: the input is torch.float64 but the weights are torch.float32"),
    ("block-2d", lambda p: p["block"](randn(5, D)), ValueError, r"^Block: expected the input of shape"),
    ("block-wrong-d_model", lambda p: p["block"](randn(2, 5, 8)), ValueError,
     r"^Block: .*its last dimension must be d_model=16"),
    ("block-int-input", lambda p: p["block"](torch.ones(2, 5, D, dtype=torch.long)), ValueError,
     r"^Block: expected a floating-point input, got a 3-D int64 tensor"),
    # states given to a block
    ("mamba-state-tensor", lambda p: p["m1"](p["x"], state=p["s1"].ssm), TypeError,
     r"^Mamba: state= must be an SSMState \(returned by a call with return_state=True, or "
     r"module.empty_state\(batch\)\), got a 3-D float32 tensor of shape \(2, 32, 8\)$"),
    ("mamba-state-dict", lambda p: p["m1"](p["x"], state={"conv": p["s1"].conv, "ssm": p["s1"].ssm}), TypeError,
     r"^Mamba: state= must be an SSMState .*got a dict \(keys \['conv', 'ssm'\]\)$"),
    ("mamba-state-wrong-batch", lambda p: p["m1"](randn(3, 5, D), state=p["s1"]), ValueError,
     r"^Mamba: the state is for batch size 2, the input has batch size 3$"),
    ("mamba-given-mamba2-state", lambda p: p["m1"](p["x"], state=p["s2"]), ValueError,
     r"^Mamba: state.ssm has shape \(2, 4, 8, 8\), this layer expects \(2, 32, 8\) \(d_inner=32, d_conv=4, "
     r"d_state=8\): the state comes from a different model or layer$"),
    ("mamba2-given-mamba-state", lambda p: p["m2"](p["x"], state=p["s1"]), ValueError,
     r"^Mamba2: state.ssm has shape \(2, 32, 8\), this layer expects \(2, 4, 8, 8\)"),
    ("mamba-given-model-state", lambda p: p["m1"](p["x"], state=p["ms"]), TypeError,
     r"got a ModelState; that is a whole model's state: a layer takes one layer's, state.layers\[i\]$"),
    ("mamba-given-attention-state", lambda p: p["m1"](p["x"], state=p["sa"]), TypeError,
     r"^Mamba: state= must be an SSMState .*got an AttentionState; it belongs to a different kind of layer$"),
    ("mamba-state-wrong-conv", lambda p: p["m1"](p["x"], state=SSMState(p["s1"].conv[:, :, :1], p["s1"].ssm)),
     ValueError, r"^Mamba: state.conv has shape \(2, 32, 1\), this layer expects \(2, 32, 3\)"),
    ("mha-given-ssm-state", lambda p: p["mha"](p["x"], state=p["s1"]), TypeError,
     r"^MHA: state= must be an AttentionState .*got an SSMState"),
    ("mha-state-wrong-batch", lambda p: p["mha"](randn(3, 5, D), state=p["sa"]), ValueError,
     r"^MHA: the state is for batch size 2, the input has batch size 3$"),
    # token ids and states given to a model
    ("lm-ids-1d", lambda p: p["lm"](torch.tensor([1, 2, 3])), ValueError,
     r"^MambaLMHeadModel: expected token ids of shape \(batch, L\), got a 1-D int64 tensor of shape \(3,\); "
     r"for one sequence add the batch dimension: ids.unsqueeze\(0\)$"),
    ("lm-ids-3d", lambda p: p["lm"](torch.zeros(1, 2, 3, dtype=torch.long)), ValueError,
     r"^MambaLMHeadModel: expected token ids of shape \(batch, L\), got a 3-D int64 tensor"),
    ("lm-ids-float", lambda p: p["lm"](torch.rand(2, 5)), ValueError,
     r"^MambaLMHeadModel: expected integer token ids of shape \(batch, L\), got a 2-D float32 tensor"),
    ("lm-ids-list", lambda p: p["lm"]([[1, 2]]), TypeError,
     r"^MambaLMHeadModel: expected token ids as an integer tensor of shape \(batch, L\), got a list$"),
    ("lm-ids-too-large", lambda p: p["lm"](torch.tensor([[1, 2, 10, 3]])), ValueError,
     r"^MambaLMHeadModel: token ids must be in \[0, 10\) \(vocab_size=10\), got ids from 1 to 10; "
     r"the first out of range is 10 at position \(0, 2\)$"),
    ("lm-ids-in-padding", lambda p: p["lm"](torch.tensor([[15]])), ValueError,
     r"token ids must be in \[0, 10\)"),  # 15 < padded_vocab_size 16: a row exists but is not a token
    ("lm-ids-negative", lambda p: p["lm"](torch.tensor([[1, -2, 3]])), ValueError,
     r"got ids from -2 to 3; the first out of range is -2 at position \(0, 1\)$"),
    ("lm-no-tokens", lambda p: p["lm"](torch.zeros(2, 0, dtype=torch.long)), ValueError,
     r"there are no tokens \(L must be at least 1\)$"),
    ("lm-state-dict", lambda p: p["lm"](torch.ones(2, 3, dtype=torch.long), state={"layers": []}), TypeError,
     r"^MambaLMHeadModel: state= must be a ModelState \(model\(ids, return_state=True\).state, "
     r"model.empty_state\(batch\) or load_state\(...\)\), got a dict"),
    ("lm-state-tensor", lambda p: p["lm"](torch.ones(2, 3, dtype=torch.long), state=torch.zeros(3)), TypeError,
     r"^MambaLMHeadModel: state= must be a ModelState .*got a 1-D float32 tensor"),
    ("lm-given-layer-state", lambda p: p["lm"](torch.ones(2, 3, dtype=torch.long), state=p["s1"]), TypeError,
     r"got an SSMState; that is one layer's state: a model takes a ModelState of every layer's$"),
    ("lm-state-wrong-batch", lambda p: p["lm"](torch.ones(3, 3, dtype=torch.long), state=p["ms"]), ValueError,
     r"^Mamba \(layer 0\): the state is for batch size 2, the input has batch size 3$"),
    ("lm-state-wrong-depth", lambda p: p["lm"](torch.ones(2, 3, dtype=torch.long),
                                               state=ModelState(p["ms"].layers[:1], 5)), ValueError,
     r"^MambaLMHeadModel: the state has 1 layer states, this model has 2 layers: it was made for a different model"),
    ("hybrid-given-all-ssm-state", lambda p: p["hybrid"](torch.ones(2, 3, dtype=torch.long), state=p["ms"]),
     TypeError, r"^MHA \(layer 1\): state= must be an AttentionState .*got an SSMState"),
    ("backbone-embeds-wrong-d_model", lambda p: p["lm"].backbone(inputs_embeds=randn(2, 5, 8)), ValueError,
     r"^MambaLMHeadModel: expected the inputs_embeds of shape \(batch, L, d_model=16\)"),
    ("backbone-ids-and-embeds", lambda p: p["lm"].backbone(torch.ones(2, 3, dtype=torch.long),
                                                           inputs_embeds=randn(2, 3, D)), ValueError,
     r"pass either input_ids or inputs_embeds \(exactly one\)"),
    ("save_state-not-a-state", lambda p: save_state("never-written.state", p["s1"], p["lm"].config), TypeError,
     r"^save_state: expected a ModelState .*got SSMState$"),
]


@pytest.mark.parametrize("call, exc, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_named_with_what_was_expected(parts, call, exc, message):
    with pytest.raises(exc) as info:
        call(parts)
    assert type(info.value) is exc
    assert re.search(message, str(info.value)), str(info.value)


def test_the_case_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


def test_valid_input_still_runs(parts):
    """What the checks must let through: each block's own state, fp64 into a Block (it casts for its norm),
    a low-precision input to an fp32 block under autocast, the last id of the vocabulary."""
    p, x = parts, parts["x"]
    with torch.no_grad():
        assert p["m1"](x, state=p["s1"]).shape == x.shape
        assert p["m2"](x[:, :1], state=p["s2"]).shape == (2, 1, D)  # decode step
        assert p["mha"](x, state=p["sa"]).shape == x.shape
        assert p["block"](x.double()).dtype == torch.float64
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert p["m1"](x.bfloat16()).shape == x.shape
        out = p["lm"](torch.tensor([[0, 9]] * 2), state=p["ms"], return_state=True)
        assert out.logits.shape == (2, 2, 16) and out.state.seqlen_offset == 7
        assert p["lm"].backbone(inputs_embeds=x).shape == x.shape


def test_a_plain_mixer_model_names_itself(parts):
    from ssm_core import MixerModel

    backbone = MixerModel(parts["lm"].config)
    with pytest.raises(ValueError, match=r"^MixerModel: token ids must be in \[0, 10\)"):
        backbone(torch.tensor([[12]]))


def test_a_cartridge_loads_only_into_the_model_it_was_saved_for(parts, tmp_path):
    path = tmp_path / "prompt.state"
    save_state(path, parts["ms"], parts["lm"].config)
    other = MambaConfig(d_model=D, n_layer=3, vocab_size=10, ssm_cfg={"d_state": 8})
    with pytest.raises(ValueError, match=r"prompt.state: state cartridge was saved for a different model "
                                         r"\(n_layer: cartridge 2 vs model 3\)"):
        load_state(path, other)
