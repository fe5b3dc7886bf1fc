"""ssm_core.models.speculative: the acceptance rule is exact, the output distribution is the target's, greedy
speculative decoding is greedy decoding, and ``generate(draft=...)`` exposes it for any LM (moved here from
tests/apps/text/test_text.py with the machinery)."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from ssm_core import MambaConfig, MambaLMHeadModel, SpecStats, speculative_stream
from ssm_core.models.generation import sample_logits
from ssm_core.models.speculative import (
    accept_or_resample,
    acceptance_probability,
    residual_distribution,
    warp_probs,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(vocab: int = 256, d: int = 32, n: int = 2, seed: int = 0) -> MambaLMHeadModel:
    torch.manual_seed(seed)
    return MambaLMHeadModel(MambaConfig(d_model=d, n_layer=n, vocab_size=vocab, ssm_cfg={"d_state": 8})).eval()


def sharpen(model: MambaLMHeadModel, scale: float = 8.0) -> MambaLMHeadModel:
    """Random tiny models are near-uniform; scaling the tied embedding makes their outputs peaked, so greedy
    paths have no near-ties and distributions are far from uniform (a stronger test)."""
    with torch.no_grad():
        model.backbone.embedding.weight.mul_(scale)
    return model


PROMPT = torch.tensor([list(b"def main():\n    ")])


def test_acceptance_rule_gives_exactly_p():
    """Exact: P(out = x) = sum_d q(d) [a(d) 1{x=d} + (1 - a(d)) r(x)] equals p(x), for random p, q (incl. zeros)."""
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        v = 2 + trial % 7
        p = torch.rand(v, generator=g, dtype=torch.float64) ** 3
        q = torch.rand(v, generator=g, dtype=torch.float64) ** 3
        if trial % 3 == 0:
            p[0] = 0.0
        if trial % 4 == 0:
            q[-1] = 0.0
        p, q = p / p.sum(), q / q.sum()
        r = residual_distribution(p, q)
        out = torch.zeros(v, dtype=torch.float64)
        for d in range(v):
            if q[d] == 0:
                continue
            a = acceptance_probability(p, q, d)
            out[d] += q[d] * a
            out += q[d] * (1 - a) * r
        torch.testing.assert_close(out, p, rtol=0, atol=1e-12)
    # the sampling function follows the rule: accepted iff u < a (frequency check with a fixed seed)
    p, q = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64), torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    res = [accept_or_resample(p, q, 0, g) for _ in range(4000)]
    assert sum(ok for ok, _ in res) / 4000 == pytest.approx(0.2, abs=0.03)
    assert {t for ok, t in res if not ok} == {1}  # the residual max(0, p - q) lives on token 1 only


def test_warp_probs_matches_sample_logits():
    logits = torch.randn(1, 11, generator=torch.Generator().manual_seed(0)) * 2
    for kw, support in [({"temperature": 0.7}, 11), ({"temperature": 1.0, "top_k": 3}, 3),
                        ({"temperature": 1.3, "top_p": 0.8}, None), ({"temperature": 0.0}, 1)]:
        probs = warp_probs(logits[0], **kw)
        assert probs.sum() == pytest.approx(1.0)
        if support is not None:
            assert int((probs > 0).sum()) == support
        g = torch.Generator().manual_seed(1)
        draws = torch.tensor([int(sample_logits(logits, generator=g, **kw)) for _ in range(3000)])
        assert set(draws.tolist()) <= set(torch.nonzero(probs).flatten().tolist())  # never outside the support
        freq = torch.bincount(draws, minlength=11).double() / 3000
        assert (freq - probs).abs().max() < 0.04


def test_greedy_speculative_equals_greedy_plain():
    target, draft = sharpen(tiny(d=48, n=2, seed=0), 6), sharpen(tiny(d=16, n=1, seed=5), 6)
    plain = [int(t) for t in target.stream(PROMPT, 64, temperature=0, vocab_size=256)]
    for k in (1, 3, 5):
        stats = SpecStats()
        spec = [int(t) for t in speculative_stream(target, draft, PROMPT, 64, k=k, temperature=0, stats=stats)]
        assert spec == plain, k
        assert stats.emitted == 64 and stats.target_calls < 64 + stats.rounds
    # a draft identical to the target is always accepted: k+1 tokens per target call
    stats = SpecStats()
    spec = [int(t) for t in speculative_stream(target, target, PROMPT, 40, k=4, temperature=0, stats=stats)]
    assert spec == plain[:40] and stats.acceptance_rate == 1.0 and stats.target_calls == 8


class ToyLM:
    """A recurrent LM with a known, strong dependence on its state: logits = A[last token] + B[token before].
    Same interface as MambaLMHeadModel (state in, state out, num_last_tokens), so a wrong state rollback
    changes the output distribution a lot (real random tiny Mambas barely depend on their state)."""

    def __init__(self, vocab: int, seed: int, scale: float = 1.0):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(vocab, vocab, generator=g, dtype=torch.float64) * scale
        self.B = torch.randn(vocab, vocab, generator=g, dtype=torch.float64) * scale
        self.config = SimpleNamespace(vocab_size=vocab)

    def __call__(self, ids, state=None, return_state=False, num_last_tokens=0):
        prev, last = (0, 0) if state is None else state
        outs = []
        for t in ids[0].tolist():
            prev, last = last, t
            outs.append(self.A[last] + self.B[prev])
        logits = torch.stack(outs)[None]
        return SimpleNamespace(logits=logits[:, -num_last_tokens:] if num_last_tokens else logits,
                               state=(prev, last))


def test_speculative_output_distribution_is_the_targets():
    """Empirical joint distribution of the first 4 tokens over 3000 seeds vs the target's exact joint
    (enumerated over a 3-token vocabulary), with a different draft so rejections and rollbacks happen.
    Checked to fail (chi2 >> bound) for: resampling from p instead of norm(max(0, p - q)), keeping the
    target's post-verify state after a rejection, drawing the bonus token from the wrong position."""
    from scipy.stats import chi2 as chi2_dist

    vocab, n_tok, n = 3, 4, 3000
    target, draft = ToyLM(vocab, 0), ToyLM(vocab, 1)
    prompt = torch.tensor([[0, 2, 1]])
    want = {}
    for seq in itertools.product(range(vocab), repeat=n_tok):
        logp = target(torch.cat([prompt, torch.tensor([seq[:-1]])], 1)).logits[0, -n_tok:].log_softmax(-1)
        want[seq] = math.exp(sum(float(logp[i, t]) for i, t in enumerate(seq)))
    counts = dict.fromkeys(want, 0)
    stats = SpecStats()
    for seed in range(n):
        counts[tuple(int(t) for t in speculative_stream(target, draft, prompt, n_tok, k=2, seed=seed,
                                                        stats=stats))] += 1
    assert 0.3 < stats.acceptance_rate < 0.95  # both branches (accept; reject + rollback) exercised
    # Pearson chi-square, outcomes expected fewer than 5 times pooled into one bin; fixed seeds: deterministic
    small = [s for s, p in want.items() if n * p < 5]
    bins = [(counts[s], n * p) for s, p in want.items() if s not in small]
    bins.append((sum(counts[s] for s in small), n * sum(want[s] for s in small)))
    chi2 = sum((c - e) ** 2 / e for c, e in bins)
    assert chi2 < chi2_dist.ppf(0.999, len(bins) - 1), (chi2, len(bins))


# --- the model-level feature: generate / stream with draft= ------------------------------------------------


def test_generate_with_a_draft_is_greedy_decoding_and_fills_stats():
    target, draft = sharpen(tiny(d=48, n=2, seed=0), 6), sharpen(tiny(d=16, n=1, seed=5), 6)
    plain = target.generate(PROMPT, max_new_tokens=24, temperature=0, vocab_size=256)
    stats = SpecStats()
    spec = target.generate(PROMPT, max_new_tokens=24, temperature=0, vocab_size=256, draft=draft, k=3, stats=stats)
    assert torch.equal(spec, plain)
    assert stats.emitted == 24 and stats.drafted > 0 and stats.target_calls < 24


def test_speculative_generation_stays_within_allowed_tokens():
    target, draft = sharpen(tiny(d=32, n=2, seed=0), 6), sharpen(tiny(d=16, n=1, seed=5), 6)
    allowed = [3, 17, 40, 41, 200]
    for temperature in (0.0, 1.5):
        for seed in range(3):
            out = target.generate(PROMPT, max_new_tokens=12, temperature=temperature, seed=seed, vocab_size=256,
                                  allowed_tokens=allowed, draft=draft, k=2)
            assert set(out[0, PROMPT.shape[1]:].tolist()) <= set(allowed)
    # greedy restricted speculative decoding is greedy restricted plain decoding
    kw = {"temperature": 0, "vocab_size": 256, "allowed_tokens": allowed}
    assert torch.equal(target.generate(PROMPT, max_new_tokens=16, draft=draft, k=3, **kw),
                       target.generate(PROMPT, max_new_tokens=16, **kw))


def test_speculative_distribution_with_allowed_tokens_is_the_restricted_targets():
    """Exactness survives the restriction: both models' logits lose the same ids. 2 tokens, 3 of 4 ids."""
    from scipy.stats import chi2 as chi2_dist

    target, draft, prompt, allowed, n = ToyLM(4, 0), ToyLM(4, 1), torch.tensor([[0, 2]]), [0, 1, 3], 2000
    want = {}
    for seq in itertools.product(allowed, repeat=2):
        logits = target(torch.cat([prompt, torch.tensor([seq[:1]])], 1)).logits[0, -2:, allowed]
        logp = logits.log_softmax(-1)
        want[seq] = math.exp(sum(float(logp[i, allowed.index(t)]) for i, t in enumerate(seq)))
    counts = dict.fromkeys(want, 0)
    for seed in range(n):
        counts[tuple(int(t) for t in speculative_stream(target, draft, prompt, 2, k=1, seed=seed,
                                                        allowed_tokens=allowed))] += 1
    chi2 = sum((counts[s] - n * p) ** 2 / (n * p) for s, p in want.items())
    assert chi2 < chi2_dist.ppf(0.999, len(want) - 1), (chi2, counts, want)


def test_speculative_generation_rejects_batches_and_stray_arguments():
    target, draft = tiny(d=16, n=1, seed=0), tiny(d=16, n=1, seed=1)
    with pytest.raises(ValueError, match="batch 1"):
        target.generate(PROMPT.repeat(2, 1), max_new_tokens=2, draft=draft)
    with pytest.raises(ValueError, match="draft="):
        target.generate(PROMPT, max_new_tokens=2, stats=SpecStats())
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(speculative_stream(target, draft, PROMPT, -1))
    with pytest.raises(ValueError, match="k must be"):
        target.generate(PROMPT, max_new_tokens=2, draft=draft, k=0)

