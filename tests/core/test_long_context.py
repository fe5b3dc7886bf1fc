"""chunked_lm_loss: the pieced, recomputed loss and its gradients equal the one-shot ones."""

import pytest
import torch
import torch.nn.functional as F

from ssm_core import LMOutput, MambaConfig, MambaLMHeadModel, ModelState, SSMState, chunked_lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")

SSM = {
    "Mamba1": {"layer": "Mamba1", "d_state": 8},
    "Mamba2": {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 16},
}


def _model(layer: str) -> MambaLMHeadModel:
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=5, ssm_cfg=SSM[layer])
    return MambaLMHeadModel(cfg).double()


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
@pytest.mark.parametrize("recompute", [True, False])
def test_chunked_equals_one_shot(layer, recompute):
    model = _model(layer)
    ids = torch.randint(0, 5, (2, 97))
    labels = torch.randint(0, 5, (2, 97))
    labels[0, :3] = -100
    ref = F.cross_entropy(model(ids).logits[..., :5].flatten(0, 1), labels.flatten(), reduction="sum")
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    out = chunked_lm_loss(model, ids, labels, chunk_len=32, recompute=recompute, vocab_size=5)
    grads = torch.autograd.grad(out.loss_sum, list(model.parameters()))
    assert out.n_tokens == 2 * 97 - 3
    torch.testing.assert_close(out.loss_sum.double(), ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-8)


def test_detach_state_truncates_gradient():
    model = _model("Mamba1")
    ids = torch.randint(0, 5, (1, 64))
    x = model.backbone.embedding.weight
    full = torch.autograd.grad(chunked_lm_loss(model, ids, ids, 16, vocab_size=5).loss_sum, x)[0]
    cut = torch.autograd.grad(chunked_lm_loss(model, ids, ids, 16, detach_state=True, vocab_size=5).loss_sum, x)[0]
    assert not torch.allclose(full, cut)
    with torch.no_grad():
        pieces = [chunked_lm_loss(model, ids[:, s:s + 16], ids[:, s:s + 16], 16, vocab_size=5).loss_sum
                  for s in range(0, 64, 16)]
    assert chunked_lm_loss(model, ids, ids, 16, detach_state=True, vocab_size=5).loss_sum.item() != \
        pytest.approx(sum(p.item() for p in pieces))  # the state is still carried forward


def test_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match="same shape"):
        chunked_lm_loss(_model("Mamba1"), torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 7, dtype=torch.long), 4)


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
@pytest.mark.parametrize("backend", ["ref", "auto"])
def test_carried_state_owns_its_storage(layer, backend, monkeypatch):
    """A state that is a view of a (batch, dim, L) buffer would pin one piece's activations per piece."""
    monkeypatch.setenv("HISS_BACKEND", backend)
    model = _model(layer).float()
    out = chunked_lm_loss(model, torch.randint(0, 5, (1, 256)), torch.randint(0, 5, (1, 256)), 128, vocab_size=5)
    for name, t in out.state.tensors().items():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name


def _one_shot_with_state(model, ids, labels, state, vocab):
    out = model(ids, state=state, return_state=True)
    loss = F.cross_entropy(out.logits[..., :vocab].flatten(0, 1), labels.flatten(), reduction="sum")
    return loss, out.state


def test_gradient_reaches_initial_state_and_flows_from_final_state():
    """A carried-in state gets its exact gradient; a loss on the returned state back-propagates through every
    piece (what continuing a window without detaching needs)."""
    model = _model("Mamba1")
    ids, labels = torch.randint(0, 5, (1, 80)), torch.randint(0, 5, (1, 80))
    with torch.no_grad():
        s0 = model(torch.randint(0, 5, (1, 7)), return_state=True).state
    grads = []
    for chunked in (False, True):
        state = ModelState([SSMState(s.conv.clone().requires_grad_(), s.ssm.clone().requires_grad_())
                            for s in s0.layers], s0.seqlen_offset)
        if chunked:
            out = chunked_lm_loss(model, ids, labels, 16, state=state, vocab_size=5)
            loss, final = out.loss_sum, out.state
        else:
            loss, final = _one_shot_with_state(model, ids, labels, state, 5)
        assert final.seqlen_offset == s0.seqlen_offset + 80
        total = loss + sum((t ** 2).sum() for t in final.tensors().values())
        leaves = list(model.parameters()) + list(state.tensors().values())
        grads.append(torch.autograd.grad(total, leaves))
    for g, r in zip(grads[1], grads[0]):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("detach_state", [False, True])
def test_recompute_equals_plain_autograd_through_pieces(detach_state):
    """recompute=True (the piecewise autograd.Function) and recompute=False (plain autograd over all pieces)
    are the same gradient, truncated BPTT included."""
    model = _model("Mamba1")
    ids, labels = torch.randint(0, 5, (2, 70)), torch.randint(0, 5, (2, 70))
    res = []
    for recompute in (False, True):
        out = chunked_lm_loss(model, ids, labels, 16, recompute=recompute, detach_state=detach_state, vocab_size=5)
        res.append((out.loss_sum, torch.autograd.grad(out.loss_sum, list(model.parameters()))))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-12, atol=1e-12)
    for g, r in zip(res[1][1], res[0][1]):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_compact_id_dtypes_give_the_same_loss_and_gradient():
    """A long window may be kept as uint8 ids / int16 labels: each piece is widened when it is read."""
    model = _model("Mamba1")
    ids, labels = torch.randint(0, 5, (1, 64)), torch.randint(0, 5, (1, 64))
    labels[0, :5] = -100
    ref = chunked_lm_loss(model, ids, labels, 16, vocab_size=5)
    small = chunked_lm_loss(model, ids.to(torch.uint8), labels.to(torch.int16), 16, vocab_size=5)
    assert small.n_tokens == ref.n_tokens == 59
    torch.testing.assert_close(small.loss_sum, ref.loss_sum)
    for g, r in zip(torch.autograd.grad(small.loss_sum, list(model.parameters())),
                    torch.autograd.grad(ref.loss_sum, list(model.parameters()))):
        torch.testing.assert_close(g, r)
    with pytest.raises(ValueError, match="integer"):
        chunked_lm_loss(model, ids.double(), labels, 16)


def test_hybrid_attention_state_grows_across_pieces():
    """An attention layer's key/value cache changes shape from piece to piece: still the one-shot gradient."""
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=5, ssm_cfg=SSM["Mamba1"], attn_layer_idx=[1],
                      attn_cfg={"num_heads": 2})
    model = MambaLMHeadModel(cfg).double()
    ids, labels = torch.randint(0, 5, (1, 50)), torch.randint(0, 5, (1, 50))
    ref = F.cross_entropy(model(ids).logits[..., :5].flatten(0, 1), labels.flatten(), reduction="sum")
    out = chunked_lm_loss(model, ids, labels, 16, vocab_size=5)
    torch.testing.assert_close(out.loss_sum, ref)
    for g, r in zip(torch.autograd.grad(out.loss_sum, list(model.parameters())),
                    torch.autograd.grad(ref, list(model.parameters()))):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-8)


class _Noisy(torch.nn.Module):
    """A stochastic LM (dropout on the hidden states): recomputation must replay each piece's random draws."""

    def __init__(self):
        super().__init__()
        self.lm = _model("Mamba1")
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, ids, state=None, return_state=False):
        h, st = self.lm.backbone(ids, state=state, return_state=True)
        return LMOutput(self.lm.lm_head(self.drop(h)), st)


def test_random_draws_are_replayed_in_backward():
    model = _Noisy()
    ids, labels = torch.randint(0, 5, (1, 64)), torch.randint(0, 5, (1, 64))
    res = []
    for recompute in (False, True):
        torch.manual_seed(123)
        out = chunked_lm_loss(model, ids, labels, 16, recompute=recompute, vocab_size=5)
        after = torch.rand(())  # the caller's RNG stream is where a plain forward leaves it
        res.append((out.loss_sum, torch.autograd.grad(out.loss_sum, list(model.parameters())), after))
    torch.testing.assert_close(res[1][0], res[0][0])
    assert res[1][2] == res[0][2]
    for g, r in zip(res[1][1], res[0][1]):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


def test_forward_keeps_one_graph_node_not_a_graph_per_piece():
    """The recomputed path records one autograd node for the whole window: no per-piece graph (whose small
    long-lived allocations fragmented the heap: RSS grew ~2 KB per token, benchmarks/long_dna.py)."""
    model = _model("Mamba1")
    ids = torch.randint(0, 5, (1, 128))
    out = chunked_lm_loss(model, ids, ids, 16, vocab_size=5)
    node = out.loss_sum.grad_fn
    assert "PiecewiseLoss" in type(node).__name__
    # its inputs are the parameters' accumulators only (no per-piece nodes)
    nexts = [f for f, _ in node.next_functions if f is not None]
    assert all(type(f).__name__ == "AccumulateGrad" for f in nexts)
    assert len(nexts) == len(list(model.parameters()))
