"""The one-state API: chunked == one-shot (values and gradients), step == forward, generation,
constant-size recurrent state, and state cartridges."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ssm_core
from ssm_core import AttentionState, MambaConfig, MambaLMHeadModel, ModelState, SSMState

VOCAB = 50  # padded to 56: generation must never pick a padding id

CONFIGS = {
    "mamba1": dict(d_model=16, n_layer=2, vocab_size=VOCAB, ssm_cfg={"d_state": 4}),
    "mamba2": dict(d_model=16, n_layer=2, vocab_size=VOCAB,
                   ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 8}),
    "hybrid": dict(d_model=16, n_layer=3, vocab_size=VOCAB, d_intermediate=16, attn_layer_idx=[1],
                   attn_cfg={"num_heads": 2, "rotary_emb_dim": 4}, ssm_cfg={"d_state": 4}),
}
KINDS = list(CONFIGS)
TOLS = {torch.float64: 1e-10, torch.float32: 1e-5}


pytestmark = pytest.mark.usefixtures("one_thread")

L = 29
SPLITS = {
    "mamba1": [1, 7, 1, 12, 8],
    "mamba2": [3, 1, 9, 5, 11],  # odd sizes around chunk_size=8, a lone token
    "hybrid": [5, 1, 1, 13, 9],
}

_MODELS: dict[str, MambaLMHeadModel] = {}


def model_for(kind: str, dtype=torch.float32) -> MambaLMHeadModel:
    if kind not in _MODELS:
        torch.manual_seed(1234)
        m = MambaLMHeadModel(MambaConfig(**CONFIGS[kind])).eval()
        g = torch.Generator().manual_seed(99)
        with torch.no_grad():  # move off the structured init (ones, zeros) so every parameter matters
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        _MODELS[kind] = m
    m = _MODELS[kind]
    return m if dtype == torch.float32 else copy.deepcopy(m).to(dtype)


def ids_for(batch: int = 2, length: int = L, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max(1, max |b|)."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def run_pieces(model, ids, sizes, state=None):
    """Feed ids in pieces with the state carried (not detached); returns (logits, final state)."""
    assert sum(sizes) == ids.shape[1]
    outs, start = [], 0
    for n in sizes:
        out = model(ids[:, start : start + n], state=state, return_state=True)
        outs.append(out.logits)
        state = out.state
        start += n
    return torch.cat(outs, dim=1), state


def loss_of(logits: torch.Tensor) -> torch.Tensor:
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7), dtype=logits.dtype)
    return (logits * w).sum()


def param_grads(model, loss) -> dict[str, torch.Tensor]:
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g) for n, p, g in zip(names, params, grads)}


# --------------------------------------------------------------------------------------------
# chunked == one-shot, values and gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind", KINDS)
def test_pieces_equal_one_shot_values_and_grads(kind, dtype):
    model = model_for(kind, dtype)
    ids = ids_for()
    tol = TOLS[dtype]
    full = model(ids).logits
    pieces, state = run_pieces(model, ids, SPLITS[kind])
    assert pieces.shape == full.shape == (2, L, model.config.padded_vocab_size)
    assert state.seqlen_offset == L
    assert max_rel(pieces, full) <= tol

    g_full = param_grads(model, loss_of(full))
    g_pieces = param_grads(model, loss_of(pieces))
    assert set(g_full) == set(g_pieces)
    worst = max(max_rel(g_pieces[n], g_full[n]) for n in g_full)
    assert worst <= tol, worst
    # the comparison is not vacuous: every SSM parameter gets a gradient
    for n, g in g_full.items():
        if n.endswith(("A_log", "D", "in_proj.weight", "conv1d.weight")):
            assert g.abs().max() > 0, n


@pytest.mark.parametrize("kind", KINDS)
def test_final_state_of_pieces_equals_one_shot_state(kind):
    model = model_for(kind, torch.float64)
    ids = ids_for()
    s_full = model(ids, return_state=True).state
    _, s_pieces = run_pieces(model, ids, SPLITS[kind])
    t_full, t_pieces = s_full.tensors(), s_pieces.tensors()
    assert t_full.keys() == t_pieces.keys()
    for k in t_full:
        assert t_full[k].shape == t_pieces[k].shape, k
        assert max_rel(t_pieces[k], t_full[k]) <= 1e-10, k


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_flows_through_carried_state_and_detach_cuts_it(kind):
    model = model_for(kind, torch.float64)
    ids = ids_for()
    out1 = model(ids[:, :11], return_state=True)
    s1 = out1.state
    tensors1 = list(s1.tensors().values())
    assert all(t.requires_grad for t in tensors1)

    loss2 = loss_of(model(ids[:, 11:], state=s1).logits)
    # retain_graph: autograd may run (and free) piece-1 nodes that lie between two state tensors
    grads = torch.autograd.grad(loss2, tensors1, allow_unused=True, retain_graph=True)
    for (name, t), g in zip(s1.tensors().items(), grads):
        assert g is not None and g.shape == t.shape, name
        assert g.abs().max() > 0, name

    # with the state carried, the later-piece loss has exactly the one-shot gradient (full BPTT)
    ids2 = ids[:, 11:]
    g_through = param_grads(model, loss_of(model(ids2, state=s1).logits))
    g_one_shot = param_grads(model, loss_of(model(ids).logits[:, 11:]))
    assert max(max_rel(g_through[n], g_one_shot[n]) for n in g_one_shot) <= 1e-10

    cut = s1.detach()
    assert isinstance(cut, ModelState) and cut.seqlen_offset == s1.seqlen_offset == 11
    for a, b in zip(cut.tensors().values(), tensors1):
        assert not a.requires_grad and torch.equal(a, b)
    out_cut = model(ids2, state=cut).logits
    assert torch.equal(out_cut, model(ids2, state=s1).logits)  # same values, only the graph is cut
    loss_cut = loss_of(out_cut)
    cut_grads = torch.autograd.grad(loss_cut, tensors1, allow_unused=True, retain_graph=True)
    assert cut_grads == (None,) * len(tensors1)
    g_cut = param_grads(model, loss_cut)
    # the cut gradient is that of a constant initial state, and differs from full BPTT
    fresh = ModelState([type(s)(*[t.detach().clone() for t in vars(s).values()]) for s in s1.layers], 11)
    g_fresh = param_grads(model, loss_of(model(ids2, state=fresh).logits))
    assert all(torch.equal(g_cut[n], g_fresh[n]) for n in g_cut)
    assert max(max_rel(g_cut[n], g_through[n]) for n in g_cut) > 1e-4


def test_gradient_wrt_user_initial_state():
    model = model_for("mamba2", torch.float64)
    state = model.empty_state(2)
    for s in state.layers:
        s.conv.requires_grad_(True)
        s.ssm.requires_grad_(True)
    loss = loss_of(model(ids_for(length=9), state=state).logits)
    leaves = list(state.tensors().values())
    for g in torch.autograd.grad(loss, leaves):
        assert g.abs().max() > 0


@settings(max_examples=8, deadline=None)
@given(cuts=st.sets(st.integers(1, L - 1), max_size=6))
def test_random_splits_property(cuts):
    """Any split of the sequence into pieces gives the one-shot logits (Mamba-2, chunk_size 8, fp64)."""
    model = model_for("mamba2", torch.float64)
    bounds = [0, *sorted(cuts), L]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    ids = ids_for(seed=3)
    with torch.no_grad():
        full = model(ids).logits
        pieces, state = run_pieces(model, ids, sizes)
    assert state.seqlen_offset == L
    assert max_rel(pieces, full) <= 1e-10


# --------------------------------------------------------------------------------------------
# block level
# --------------------------------------------------------------------------------------------

BLOCKS = {
    "Mamba": lambda: ssm_core.Mamba(16, d_state=4),
    "Mamba2": lambda: ssm_core.Mamba2(16, d_state=8, headdim=8, ngroups=2, chunk_size=8),
    "Mamba2-mlp": lambda: ssm_core.Mamba2(16, d_state=8, headdim=8, d_ssm=16, chunk_size=8),
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_chunked_equals_one_shot(name):
    torch.manual_seed(5)
    block = BLOCKS[name]().double()
    x = torch.randn(2, 23, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    y_full, s_full = block(x, return_state=True)
    assert torch.equal(y_full, block(x))  # return_state does not change the output
    ys, state = [], None
    for a, b in [(0, 1), (1, 10), (10, 11), (11, 23)]:
        y, state = block(x[:, a:b], state=state, return_state=True)
        assert isinstance(state, SSMState)
        ys.append(y)
    assert max_rel(torch.cat(ys, 1), y_full) <= 1e-10
    assert max_rel(state.ssm, s_full.ssm) <= 1e-10
    assert max_rel(state.conv, s_full.conv) <= 1e-12  # the raw last inputs (up to matmul blocking)
    # ... namely the last d_conv - 1 pre-convolution inputs of the conv channels
    proj = block.in_proj(x)
    if isinstance(block, ssm_core.Mamba2):
        start = 2 * block.d_mlp + block.d_ssm
        conv_in = proj[..., start : start + block.conv_dim]
    else:
        conv_in = proj[..., : block.d_inner]
    assert max_rel(s_full.conv, conv_in[:, -(block.d_conv - 1) :].transpose(1, 2)) <= 1e-12
    empty = block.empty_state(2)
    assert empty.conv.shape == state.conv.shape and empty.ssm.shape == state.ssm.shape
    assert max_rel(block(x, state=empty), y_full) <= 1e-10  # an empty state is the zero state


@pytest.mark.parametrize("kind", KINDS)
def test_step_equals_forward(kind):
    """Token-by-token (L=1 pieces: the decode path) equals one forward, fp32."""
    model = model_for(kind)
    ids = ids_for(length=17)
    with torch.no_grad():
        full = model(ids).logits
        steps, state = run_pieces(model, ids, [1] * 17)
    assert max_rel(steps, full) <= 1e-5
    assert state.seqlen_offset == 17


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------


def _argmax_check(model, seq, prompt_len):
    """Generated tokens are the argmax (within fp32 noise) of the full forward, cropped to vocab."""
    with torch.no_grad():
        logits = model(seq).logits[:, prompt_len - 1 : -1, : model.config.vocab_size]
    gen = seq[:, prompt_len:]
    chosen = logits.gather(-1, gen[..., None]).squeeze(-1)
    assert (logits.max(-1).values - chosen).max() <= 1e-5
    assert (logits.argmax(-1) == gen).float().mean() >= 0.9


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_is_argmax_of_full_forward(kind):
    model = model_for(kind)
    prompt = ids_for(length=6, seed=11)
    seq = model.generate(prompt, max_new_tokens=10, temperature=0)
    assert seq.shape == (2, 16) and torch.equal(seq[:, :6], prompt)
    assert int(seq.max()) < VOCAB
    _argmax_check(model, seq, 6)
    streamed = torch.stack(list(model.stream(prompt, 10, temperature=0)), dim=1)
    assert torch.equal(streamed, seq[:, 6:])
    assert torch.equal(model.generate(prompt, max_length=16, temperature=0), seq)


def test_sampling_seed_is_reproducible():
    model = model_for("mamba1")
    prompt = ids_for(batch=8, length=4, seed=12)
    a = model.generate(prompt, max_new_tokens=8, temperature=1.0, seed=7)
    b = model.generate(prompt, max_new_tokens=8, temperature=1.0, seed=7)
    c = model.generate(prompt, max_new_tokens=8, temperature=1.0, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    s = torch.stack(list(model.stream(prompt, 8, temperature=1.0, seed=7)), dim=1)
    assert torch.equal(s, a[:, 4:])


def test_sampling_never_picks_padding_ids():
    model = model_for("mamba1")
    assert model.config.padded_vocab_size > VOCAB
    prompt = ids_for(batch=64, length=3, seed=13)
    seq = model.generate(prompt, max_new_tokens=4, temperature=50.0, seed=0)  # near-uniform
    assert int(seq.max()) < VOCAB
    assert len(seq[:, 3:].unique()) > 20  # it really is sampling broadly


def test_eos_stops_rows():
    model = model_for("mamba2")
    prompt = ids_for(batch=2, length=5, seed=14)
    greedy = model.generate(prompt, max_new_tokens=12, temperature=0)[:, 5:]
    eos = int(greedy[0, 2])
    first0 = int((greedy[0] == eos).nonzero()[0])
    out = model.generate(prompt, max_new_tokens=12, temperature=0, eos_token_id=eos)[:, 5:]
    for r in range(2):
        hits = (greedy[r] == eos).nonzero()
        k = int(hits[0]) if len(hits) else None
        if k is None:
            assert torch.equal(out[r], greedy[r, : out.shape[1]])
        else:
            assert torch.equal(out[r, : k + 1], greedy[r, : k + 1])
            assert (out[r, k:] == eos).all()  # a finished row keeps emitting eos
    # one row: generation stops right after eos
    single = model.generate(prompt[:1], max_new_tokens=12, temperature=0, eos_token_id=eos)
    assert single.shape[1] == 5 + first0 + 1 and int(single[0, -1]) == eos


def test_top_k_restricts_support():
    model = model_for("mamba1")
    prompt = ids_for(batch=1, length=6, seed=15).expand(200, 6)
    seq = model.generate(prompt, max_new_tokens=3, temperature=1.0, top_k=3, seed=1)
    with torch.no_grad():
        logits = model(seq).logits[:, 5:-1, :VOCAB]
    top3 = logits.topk(3, dim=-1).indices
    gen = seq[:, 6:]
    assert (top3 == gen[..., None]).any(-1).all()
    assert len(gen[:, 0].unique()) > 1  # sampled, not greedy
    # top_k=1 is greedy
    greedy = model.generate(prompt[:2], 3, temperature=0)
    assert torch.equal(model.generate(prompt[:2], 3, top_k=1, seed=1), greedy)


def test_top_p_restricts_support():
    model = model_for("mamba1")
    top_p = 0.3
    prompt = ids_for(batch=1, length=6, seed=16)
    with torch.no_grad():
        probs = model(prompt).logits[0, -1, :VOCAB].softmax(-1)
    p_sorted, order = probs.sort(descending=True)
    keep = (p_sorted.cumsum(0) - p_sorted) < top_p  # smallest prefix reaching top_p
    support = set(order[keep].tolist())
    assert 1 < len(support) < VOCAB
    seq = model.generate(prompt.expand(300, 6), max_new_tokens=1, temperature=1.0, top_p=top_p, seed=2)
    sampled = set(seq[:, -1].tolist())
    assert sampled <= support
    assert len(sampled) > 1


def test_sampling_argument_errors():
    model = model_for("mamba1")
    with pytest.raises(ValueError):
        model.generate(ids_for(length=3), 2, top_p=1.5)
    with pytest.raises(ValueError):
        model.generate(ids_for(length=3), 2, temperature=-1)
    with pytest.raises(ValueError):
        model.generate(torch.zeros(2, 0, dtype=torch.long), 2)


# --------------------------------------------------------------------------------------------
# constant-size state
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mamba1", "mamba2"])
def test_state_size_does_not_grow_with_context(kind):
    model = model_for(kind)
    with torch.no_grad():
        short = model(ids_for(length=10), return_state=True).state
        long = model(ids_for(length=200), return_state=True).state
    assert short.nbytes == long.nbytes > 0
    assert {k: v.shape for k, v in short.tensors().items()} == {k: v.shape for k, v in long.tensors().items()}
    assert short.nbytes == model.empty_state(2).nbytes
    assert (short.seqlen_offset, long.seqlen_offset) == (10, 200)


def test_attention_state_grows_with_context():
    model = model_for("hybrid")
    with torch.no_grad():
        short = model(ids_for(length=10), return_state=True).state
        long = model(ids_for(length=20), return_state=True).state
    assert isinstance(short.layers[1], AttentionState) and short.layers[1].k.shape[2] == 10
    assert long.nbytes > short.nbytes


# --------------------------------------------------------------------------------------------
# state cartridges
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_cartridge_continuation_equals_in_memory(kind, tmp_path):
    model = model_for(kind)
    ids = ids_for(length=24, seed=17)
    path = tmp_path / "context.safetensors"
    with torch.no_grad():
        state = model(ids[:, :15], return_state=True).state
        ssm_core.save_state(path, state, model.config)
        loaded = ssm_core.load_state(path, model.config)
        assert loaded.seqlen_offset == 15
        assert [type(s) for s in loaded.layers] == [type(s) for s in state.layers]
        for k, v in state.tensors().items():
            assert torch.equal(loaded.tensors()[k], v), k
        mem = model(ids[:, 15:], state=state).logits
        disk = model(ids[:, 15:], state=loaded).logits
        assert torch.equal(disk, mem)
        assert max_rel(disk, model(ids).logits[:, 15:]) <= 1e-5
    assert [p.name for p in tmp_path.iterdir()] == ["context.safetensors"]  # no temp files
    # greedy continuation from the cartridge == greedy generation over the whole prompt
    cont = model.generate(ids[:, 15:], max_new_tokens=6, temperature=0, state=loaded)
    whole = model.generate(ids, max_new_tokens=6, temperature=0)
    assert torch.equal(cont[:, -6:], whole[:, -6:])


@pytest.mark.parametrize("field,value", [("d_model", 24), ("n_layer", 3), ("vocab_size", 51)])
def test_cartridge_for_other_config_is_rejected(field, value, tmp_path):
    model = model_for("mamba1")
    path = tmp_path / "ctx.safetensors"
    with torch.no_grad():
        ssm_core.save_state(path, model(ids_for(length=5), return_state=True).state, model.config)
    other = MambaConfig(**dict(CONFIGS["mamba1"], **{field: value}))
    with pytest.raises(ValueError, match=field):
        ssm_core.load_state(path, other)


def test_non_cartridge_file_is_rejected(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a hiss state cartridge"):
        ssm_core.load_state(path, model_for("mamba1").config)
