"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) with a small draft model.

Each round the draft proposes k tokens one step at a time (q_1..q_k), the target scores all of them in ONE
forward pass from its state (p_1..p_{k+1}), and token i is accepted with probability min(1, p_i(x)/q_i(x));
at the first rejection a token is drawn from norm(max(0, p_i - q_i)) and the round ends; if all k are
accepted a bonus token is drawn from p_{k+1}. Every emitted token is then distributed exactly as the
target's (temperature / top-k / top-p applied to both models' logits), and greedy speculative decoding
emits exactly greedy plain decoding.

Rolling the state back. A Mamba state cannot be un-rolled, and the target's verify pass returns only the
state after all k drafted tokens. Choice made here:
  * target, module path (any LM with the forward interface): keep the state from *before* the verify pass;
    if every draft is accepted, the returned state is the right one; after a rejection at position n, re-run
    the n accepted tokens (plus the pending one) from the kept state in one more, shorter forward pass.
  * target, compiled path (``fast=True`` and a model ssm_core.models.fast_decode supports): the verify pass is
    one multi-token call of the whole-model step that writes the state after every token into snapshot
    buffers, so a rejection restores the snapshot (a copy) instead of re-running.
  * draft: it steps one token at a time anyway, so the state after every drafted token is kept (values on the
    module path, copies into preallocated slots on the compiled path) and the rollback is free.
Batch size 1. Works for any LM whose forward takes ``(ids, state=, return_state=True, num_last_tokens=)``
and whose output has ``.logits`` and ``.state`` (every ssm_core model; ``GenerationMixin.stream(draft=...)``
is the usual way in).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..state import ModelState
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


def _ids(tokens: list[int], dev) -> Tensor:
    return torch.tensor([tokens], dtype=torch.long, device=dev)


class _ModelScorer:
    """A model read through its forward from state values (the reference path; any LM with the interface)."""

    def __init__(self, model, state, dev):
        self.model, self.state, self.dev = model, state, dev
        self._before, self._fed, self._slots = None, [], {}

    def feed(self, tokens: list[int], n_last: int, keep: bool = False) -> Tensor:
        """Advance the state over tokens; the logits (n_last, vocab) of the last n_last positions."""
        self._before, self._fed = self.state, tokens
        out = self.model(_ids(tokens, self.dev), state=self.state, return_state=True, num_last_tokens=n_last)
        self.state = out.state
        return out.logits[0]

    def rewind(self, j: int) -> int:
        """The state after the first j tokens of the last feed (kept from before it, re-run); forward calls made."""
        if j == len(self._fed):
            return 0
        self.state = self.model(_ids(self._fed[:j], self.dev), state=self._before, return_state=True,
                                num_last_tokens=1).state
        return 1

    def save(self, slot: int) -> None:
        self._slots[slot] = self.state  # states are values: keeping the reference is a copy

    def load(self, slot: int) -> None:
        self.state = self._slots[slot]


class _FastScorer:
    """The same protocol through the compiled whole-model step (ssm_core.models.fast_decode.FastDecoder)."""

    PREFILL_MIN = 16  # a longer prefix (the prompt) is read by the module forward (the scan kernels) first

    def __init__(self, decoder):
        self.dec, self._pre, self._fed = decoder, 0, 0

    def feed(self, tokens: list[int], n_last: int, keep: bool = False) -> Tensor:
        pre = len(tokens) - n_last
        pre = pre if pre >= self.PREFILL_MIN else 0
        if pre:
            self.dec.prefill(_ids(tokens[:pre], None))
        self._pre, self._fed = pre, len(tokens)
        return self.dec.forward(_ids(tokens[pre:], None), n_last, snapshots=keep)[0]

    def rewind(self, j: int) -> int:
        if j != self._fed:
            self.dec.restore(j - self._pre - 1)
        return 0

    def save(self, slot: int) -> None:
        self.dec.save(slot)

    def load(self, slot: int) -> None:
        self.dec.load(slot)


def _scorer(model, state, dev, fast: bool):
    from .fast_decode import FastDecoder, unsupported_reason

    if fast and unsupported_reason(model) is None:
        if state is None:
            state = model.empty_state(1)
        else:  # the caller's state stays as it is: the compiled step works on a copy
            state = ModelState([type(s)(*(t.clone() for t in vars(s).values())) for s in state.layers],
                               state.seqlen_offset)
        return _FastScorer(FastDecoder(model, state))
    return _ModelScorer(model, state, dev)


@torch.inference_mode()
def speculative_stream(target, draft, input_ids: Tensor, max_new_tokens: int, k: int = 4, temperature: float = 1.0,
                       top_k: int = 0, top_p: float = 0.0, seed: int | None = None, state=None, draft_state=None,
                       vocab_size: int | None = None, eos_token_id: int | None = None,
                       stats: SpecStats | None = None,
                       allowed_tokens: Sequence[int] | Tensor | None = None, *, fast: bool = True) -> Iterator[Tensor]:
    """Yield target-distributed tokens (1,) one at a time, like ``MambaLMHeadModel.stream``.

    target, draft: models taking ``(ids, state=, return_state=True, num_last_tokens=)``, same vocabulary.
    input_ids: (1, L>=1), the tokens after ``state`` / ``draft_state`` (states of the same earlier context,
    or None). k: drafted tokens per round. ``stats`` (if given) is filled in as generation goes.
    ``allowed_tokens``: only these ids are ever drafted or emitted (both models' logits restricted alike).
    ``fast``: a model the compiled whole-model step supports (ssm_core.models.fast_decode) runs through it: the
    verify pass is one multi-token call that keeps the state after every token, so a rejection restores a copy
    instead of re-running the accepted tokens. ``state`` / ``draft_state`` are never modified (copies are).
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

    tgt, drf = _scorer(target, state, dev, fast), _scorer(draft, draft_state, dev, fast)
    t_pending = d_pending = input_ids[0].tolist()  # tokens not yet in the target's / draft's state
    produced = 0
    while produced < max_new_tokens:
        kk = min(k, max_new_tokens - produced - 1)  # the round's last token comes from the target
        new: list[int] = []
        if kk == 0:
            logits = tgt.feed(t_pending, 1)
            stats.target_calls += 1
            tok = int(torch.multinomial(warp(logits[-1]).float(), 1, generator=gen))
            t_pending, d_pending = [tok], d_pending + [tok]
            new.append(tok)
        else:
            # draft k tokens, keeping the draft's state after each (slot j: after d_pending + drafts[:j])
            logits = drf.feed(d_pending, 1)
            drf.save(0)
            qs, drafts = [], []
            for j in range(kk):
                q = warp(logits[-1])
                x = int(torch.multinomial(q.float(), 1, generator=gen))
                qs.append(q)
                drafts.append(x)
                if j < kk - 1:
                    logits = drf.feed([x], 1)
                    drf.save(j + 1)
            stats.draft_calls += kk
            # verify all drafts in one target pass: p_1..p_{kk+1}
            ps = warp(tgt.feed(t_pending + drafts, kk + 1, keep=True))
            stats.target_calls += 1
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
                t_pending = [bonus]
                drf.load(kk - 1)
                d_pending = [drafts[kk - 1], bonus]
            else:
                # rejected at n: the target's state must hold t_pending + the n accepted drafts
                stats.target_calls += tgt.rewind(len(t_pending) + n)
                t_pending = [new[-1]]
                drf.load(n)
                d_pending = [new[-1]]
        stats.rounds += 1
        for tok in new:
            produced += 1
            stats.emitted += 1
            yield torch.tensor([tok], device=dev)
            if eos_token_id is not None and tok == eos_token_id:
                return
