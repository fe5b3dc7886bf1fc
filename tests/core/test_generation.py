"""GenerationMixin: sampling restricted to allowed token ids, and argument checks with clear messages."""

import math

import pytest
import torch

from ssm_core import MambaConfig, MambaLMHeadModel
from ssm_core.models.generation import sample_logits
from ssm_core.models.sampling import allowed_mask, restrict_logits

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 50
ALLOWED = [2, 7, 11, 30, 49]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=VOCAB, ssm_cfg={"d_state": 4})).eval()
    with torch.no_grad():  # peaked outputs: greedy has no near-ties, the unrestricted argmax is rarely allowed
        m.backbone.embedding.weight.mul_(6)
    return m


PROMPT = torch.tensor([[1, 5, 9, 3], [0, 4, 4, 8]])


@pytest.mark.parametrize("kw", [{"temperature": 1.0}, {"temperature": 2.0, "top_k": 3},
                                {"temperature": 0.7, "top_p": 0.9}, {"temperature": 0.0}])
def test_generated_ids_are_always_allowed(model, kw):
    for allowed in (ALLOWED, torch.tensor(ALLOWED)):
        out = model.generate(PROMPT, max_new_tokens=20, seed=0, allowed_tokens=allowed, **kw)
        assert set(out[:, PROMPT.shape[1]:].flatten().tolist()) <= set(ALLOWED)


def test_greedy_with_allowed_tokens_is_the_argmax_over_the_allowed_subset(model):
    out = model.generate(PROMPT, max_new_tokens=10, temperature=0, allowed_tokens=ALLOWED)
    plain = model.generate(PROMPT, max_new_tokens=10, temperature=0)
    assert not torch.equal(out, plain)  # the restriction matters for this model
    seq = PROMPT
    allowed = torch.tensor(ALLOWED)
    with torch.no_grad():
        for _ in range(10):  # the definition, recomputed from scratch each step
            logits = model(seq).logits[:, -1, :VOCAB]
            seq = torch.cat([seq, allowed[logits[:, allowed].argmax(-1)][:, None]], dim=1)
    assert torch.equal(out, seq)


def test_restriction_renormalises_over_the_allowed_ids():
    logits = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
    mask = allowed_mask([1, 4], 8)
    g = torch.Generator().manual_seed(1)
    draws = torch.tensor([int(sample_logits(restrict_logits(logits, mask), generator=g)) for _ in range(4000)])
    p4 = float(torch.softmax(logits[0, [1, 4]], -1)[1])
    assert set(draws.tolist()) <= {1, 4}
    assert float((draws == 4).double().mean()) == pytest.approx(p4, abs=0.03)


def test_bad_allowed_tokens_are_rejected(model):
    for bad, match in [([], "empty"), ([3, VOCAB], r"\[0, 50\)"), ([-1], r"\[0, 50\)"),
                       (torch.ones(VOCAB, dtype=torch.bool), "integer"), (torch.tensor([1.0]), "integer")]:
        with pytest.raises(ValueError, match=match):
            model.generate(PROMPT, max_new_tokens=2, allowed_tokens=bad)


def test_max_new_tokens_is_checked_and_zero_yields_nothing(model):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        model.generate(PROMPT, max_new_tokens=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        next(model.stream(PROMPT, -3))
    assert list(model.stream(PROMPT, 0)) == []
    assert torch.equal(model.generate(PROMPT, max_new_tokens=0), PROMPT)
    assert torch.equal(model.generate(PROMPT, max_length=2), PROMPT)  # mamba_ssm's total length: nothing to add


@pytest.mark.parametrize("name, value", [("temperature", math.nan), ("temperature", math.inf),
                                         ("top_p", math.nan), ("top_p", -math.inf)])
def test_non_finite_sampling_settings_name_the_argument(model, name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number, got {value}"):
        model.generate(PROMPT, max_new_tokens=2, **{name: value})
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        sample_logits(torch.zeros(1, 4), **{name: value})
