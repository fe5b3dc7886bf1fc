"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) with a small draft model.

Each round the draft proposes k tokens one step at a time (q_1..q_k), the target scores all of them in ONE
forward pass from its state (p_1..p_{k+1}), and token i is accepted with probability min(1, p_i(x)/q_i(x));
at the first rejection a token is drawn from norm(max(0, p_i - q_i)) and the round ends; if all k are
accepted a bonus token is drawn from p_{k+1}. Every emitted token is then distributed exactly as the
target's (temperature / top-k / top-p applied to both models' logits), and greedy speculative decoding
emits exactly greedy plain decoding.

Rolling the state back. A Mamba state cannot be un-rolled, and the target's verify pass returns only the
state after all k drafted tokens. Choice made here:
  * target: keep the state from *before* the verify pass; if every draft is accepted, the returned state is
    the right one; after a rejection at position n, re-run the n accepted tokens (plus the pending one) from
    the kept state in one more, shorter forward pass. Keeping per-position states instead would need the
    scan to emit its state at every position (k copies of (batch, d_inner, d_state) per layer), which
    ssm_core's forward does not expose; the re-run costs one extra small forward only on rejected rounds.
  * draft: it steps one token at a time anyway, so the state after every drafted token is kept and the
    rollback is free.
Batch size 1. Works for any LM whose forward takes ``(ids, state=, return_state=True, num_last_tokens=)``
and whose output has ``.logits`` and ``.state`` (every ssm_core model; ``GenerationMixin.stream(draft=...)``
is the usual way in).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .sampling import allowed_mask, check_generation, filter_logits, is_greedy, restrict_logits

__all__ = ["SpecStats", "warp_probs", "acceptance_probability", "residual_distribution", "accept_or_resample",
           "speculative_stream"]


def warp_probs(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0) -> Tensor:
    """The distribution ssm_core.sample_logits draws from: logits (..., vocab) -> probabilities (..., vocab),
    float64. temperature 0 or top_k 1 is greedy (one-hot at the argmax)."""
    if is_greedy(temperature, top_k, top_p):
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).double()
    return filter_logits(logits, temperature, top_k, top_p, dtype=torch.float64).softmax(-1)


def acceptance_probability(p: Tensor, q: Tensor, token: int) -> float:
    """min(1, p(x) / q(x)) for a drafted token x (q(x) > 0 since the draft sampled it)."""
    qx = float(q[token])
    return 1.0 if qx <= 0 else min(1.0, float(p[token]) / qx)


def residual_distribution(p: Tensor, q: Tensor) -> Tensor:
    """norm(max(0, p - q)): where a rejected draft is resampled from. If p == q (up to rounding) a
    rejection has probability ~0; p itself is returned then."""
    r = (p - q).clamp_min(0)
    s = r.sum()
    return r / s if s > 1e-12 else p


def accept_or_resample(p: Tensor, q: Tensor, token: int, generator: torch.Generator | None = None
                       ) -> tuple[bool, int]:
    """The rejection rule for one drafted token: (True, token) if accepted, else (False, a token from the
    residual distribution). p, q: (vocab,) target and draft probabilities at this position."""
    u = float(torch.rand((), dtype=torch.float64, generator=generator))
    if u < acceptance_probability(p, q, token):
        return True, token
    return False, int(torch.multinomial(residual_distribution(p, q), 1, generator=generator))


@dataclass
class SpecStats:
    """Counters filled in as speculative generation goes: rounds, drafted and accepted draft tokens, emitted
    tokens, and forward calls of each model (the cost)."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    target_calls: int = 0
    draft_calls: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@torch.inference_mode()
def speculative_stream(target, draft, input_ids: Tensor, max_new_tokens: int, k: int = 4, temperature: float = 1.0,
                       top_k: int = 0, top_p: float = 0.0, seed: int | None = None, state=None, draft_state=None,
                       vocab_size: int | None = None, eos_token_id: int | None = None,
                       stats: SpecStats | None = None,
                       allowed_tokens: Sequence[int] | Tensor | None = None) -> Iterator[Tensor]:
    """Yield target-distributed tokens (1,) one at a time, like ``MambaLMHeadModel.stream``.

    target, draft: models taking ``(ids, state=, return_state=True, num_last_tokens=)``, same vocabulary.
    input_ids: (1, L>=1), the tokens after ``state`` / ``draft_state`` (states of the same earlier context,
    or None). k: drafted tokens per round. ``stats`` (if given) is filled in as generation goes.
    ``allowed_tokens``: only these ids are ever drafted or emitted (both models' logits restricted alike).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"speculative_stream: input_ids must be (1, L>=1), got {tuple(input_ids.shape)}")
    if k < 1:
        raise ValueError(f"speculative_stream: k must be >= 1, got {k}")
    check_generation("speculative_stream", max_new_tokens, temperature, top_k, top_p)
    vocab = vocab_size or target.config.vocab_size
    if draft.config.vocab_size < vocab:
        raise ValueError(f"speculative_stream: draft vocabulary {draft.config.vocab_size} < target's {vocab}")
    stats = stats if stats is not None else SpecStats()
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    dev = input_ids.device
    mask = allowed_mask(allowed_tokens, vocab, dev)

    def warp(logits: Tensor) -> Tensor:
        return warp_probs(restrict_logits(logits[..., :vocab], mask), temperature, top_k, top_p)

    def ids(tokens: list[int]) -> Tensor:
        return torch.tensor([tokens], dtype=torch.long, device=dev)

    t_pending = d_pending = input_ids[0].tolist()  # tokens not yet in the target's / draft's state
    produced = 0
    while produced < max_new_tokens:
        kk = min(k, max_new_tokens - produced - 1)  # the round's last token comes from the target
        new: list[int] = []
        if kk == 0:
            out = target(ids(t_pending), state=state, return_state=True, num_last_tokens=1)
            stats.target_calls += 1
            tok = int(torch.multinomial(warp(out.logits[0, -1]).float(), 1, generator=gen))
            state, t_pending, d_pending = out.state, [tok], d_pending + [tok]
            new.append(tok)
        else:
            # draft k tokens, keeping the draft's state after each (its rollback is free)
            out = draft(ids(d_pending), state=draft_state, return_state=True, num_last_tokens=1)
            d_states, qs, drafts = [out.state], [], []
            for j in range(kk):
                q = warp(out.logits[0, -1])
                x = int(torch.multinomial(q.float(), 1, generator=gen))
                qs.append(q)
                drafts.append(x)
                if j < kk - 1:
                    out = draft(ids([x]), state=d_states[-1], return_state=True)
                    d_states.append(out.state)
            stats.draft_calls += kk
            # verify all drafts in one target pass: p_1..p_{kk+1}
            out = target(ids(t_pending + drafts), state=state, return_state=True, num_last_tokens=kk + 1)
            stats.target_calls += 1
            ps = warp(out.logits[0])
            n = 0
            for j in range(kk):
                ok, tok = accept_or_resample(ps[j], qs[j], drafts[j], gen)
                new.append(tok)
                if not ok:
                    break
                n += 1
            stats.drafted += kk
            stats.accepted += n
            if n == kk:
                bonus = int(torch.multinomial(ps[kk].float(), 1, generator=gen))
                new.append(bonus)
                state, t_pending = out.state, [bonus]
                draft_state, d_pending = d_states[kk - 1], [drafts[kk - 1], bonus]
            else:
                # rejected at n: the target's state must hold t_pending + the n accepted drafts; re-run them
                state = target(ids(t_pending + drafts[:n]), state=state, return_state=True,
                               num_last_tokens=1).state
                stats.target_calls += 1
                t_pending = [new[-1]]
                draft_state, d_pending = d_states[n], [new[-1]]
        stats.rounds += 1
        for tok in new:
            produced += 1
            stats.emitted += 1
            yield torch.tensor([tok], device=dev)
            if eos_token_id is not None and tok == eos_token_id:
                return
