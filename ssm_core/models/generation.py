"""Generation with the recurrent state: prefill once, then one constant-cost step per token."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ..state import ModelState

__all__ = ["GenerationMixin", "sample_logits", "filter_logits", "is_greedy"]


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0 or top_k < 0 or not 0.0 <= top_p <= 1.0:
        raise ValueError(f"sampling: need temperature >= 0, top_k >= 0, 0 <= top_p <= 1; "
                         f"got {temperature}, {top_k}, {top_p}")


def is_greedy(temperature: float, top_k: int, top_p: float = 0.0) -> bool:
    """Whether these sampling settings mean argmax (temperature 0 or top_k 1); bad settings -> ValueError."""
    _check_sampling(temperature, top_k, top_p)
    return temperature == 0 or top_k == 1


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """logits (..., vocab) -> the tempered logits with tokens outside top-k / the top-p nucleus set to -inf;
    their softmax is the distribution ``sample_logits`` draws from (non-greedy settings)."""
    _check_sampling(temperature, top_k, top_p)
    logits = logits.to(dtype) / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens strictly before it already reach top_p
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_logits(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                  generator: torch.Generator | None = None) -> Tensor:
    """logits: (batch, vocab) -> token ids (batch,). temperature 0 or top_k 1 is greedy."""
    if is_greedy(temperature, top_k, top_p):
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class GenerationMixin:
    """Adds ``generate`` and ``stream`` to a model whose forward takes ``state`` / ``return_state``."""

    @torch.inference_mode()
    def stream(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 0.0, eos_token_id: int | None = None, seed: int | None = None,
               state: ModelState | None = None, vocab_size: int | None = None) -> Iterator[Tensor]:
        """Yield the next token ids (batch,) one step at a time. ``state`` continues a saved context
        (``input_ids`` are then the tokens after it). Rows that emitted ``eos_token_id`` keep emitting it.
        Sampling is restricted to the first ``vocab_size`` ids (default: config.vocab_size, not padding)."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"generate: input_ids must be (batch, L>=1), got {tuple(input_ids.shape)}")
        vocab = vocab_size or self.config.vocab_size
        generator = None
        if seed is not None:
            generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        out = self(input_ids, state=state, return_state=True, num_last_tokens=1)
        state = out.state
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            token = sample_logits(out.logits[:, -1, :vocab], temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                token = token.masked_fill(done, eos_token_id)
                done |= token == eos_token_id
            yield token
            if eos_token_id is not None and bool(done.all()):
                return
            out = self(token[:, None], state=state, return_state=True)
            state = out.state

    def generate(self, input_ids: Tensor, max_new_tokens: int | None = None, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 0.0, eos_token_id: int | None = None, seed: int | None = None,
                 state: ModelState | None = None, max_length: int | None = None, **kwargs) -> Tensor:
        """Returns (batch, L + new) token ids: the prompt followed by up to ``max_new_tokens`` tokens.
        ``max_length`` (mamba_ssm's argument: total length) may be given instead."""
        if max_new_tokens is None:
            if max_length is None:
                raise ValueError("generate: give max_new_tokens (or max_length)")
            max_new_tokens = max_length - input_ids.shape[1]
        tokens = list(self.stream(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed,
                                  state, **kwargs))
        if not tokens:
            return input_ids
        return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)
