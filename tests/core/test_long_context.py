"""chunked_lm_loss: the pieced, recomputed loss and its gradients equal the one-shot ones."""

import pytest
import torch
import torch.nn.functional as F

from ssm_core import MambaConfig, MambaLMHeadModel, chunked_lm_loss

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
