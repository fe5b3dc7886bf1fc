"""Generation with the recurrent state: prefill once, then one constant-cost step per token (or, given a draft
model, speculative decoding: ssm_core.models.speculative)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ..state import ModelState
from .fast_decode import QUANTIZE, FastDecoder, fast_decoder_or_none, unsupported_reason
from .sampling import allowed_mask, check_generation, filter_logits, is_greedy, restrict_logits, sample_logits
from .speculative import SpecStats, speculative_stream

__all__ = ["GenerationMixin", "sample_logits", "filter_logits", "is_greedy"]


class GenerationMixin:
    """Adds ``generate`` and ``stream`` to a model whose forward takes ``state`` / ``return_state``."""

    @torch.inference_mode()
    def stream(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 0.0, eos_token_id: int | None = None, seed: int | None = None,
               state: ModelState | None = None, vocab_size: int | None = None, *,
               allowed_tokens: Sequence[int] | Tensor | None = None, draft=None, k: int = 4,
               stats: SpecStats | None = None, draft_state: ModelState | None = None,
               fast: bool = True, quantize: str | None = None) -> Iterator[Tensor]:
        """Yield the next token ids (batch,) one step at a time. ``state`` continues a saved context
        (``input_ids`` are then the tokens after it). Rows that emitted ``eos_token_id`` keep emitting it.
        Sampling is restricted to the first ``vocab_size`` ids (default: config.vocab_size, not padding), and
        to ``allowed_tokens`` when given (other ids get -inf before temperature / top-k / top-p; greedy is the
        argmax over the allowed ids). ``max_new_tokens`` 0 yields nothing.

        ``draft``: a smaller model with the same vocabulary; tokens then come from exact speculative decoding
        (``speculative_stream``: the same distribution as plain sampling, greedy gives the same tokens), ``k``
        drafted tokens per round, batch 1 only; ``draft_state`` is the draft's state of the context in
        ``state``; ``stats`` (a SpecStats) is filled in as generation goes.

        ``fast`` (default True): after the prompt (read by the module forward), every token is one call of the
        compiled whole-model step (``ssm_core.models.fast_decode.FastDecoder``, CPU, fp32 / bf16) when the model
        supports it, else the module path; ``fast=False`` always steps through the modules (the reference twin).
        Tokens are the same either way up to float rounding.

        ``quantize="int8"``: int8 weight-only decoding (``FastDecoder(..., quantize="int8")``: in_proj / out_proj /
        MLP / LM-head matrices as int8 with per-row scales, activations and state fp32), the prompt included (read
        by the int8 step); needs the compiled step (RuntimeError with the reason otherwise), not with ``fast=False``
        or ``draft``. The caller's ``state`` is not modified.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"generate: input_ids must be (batch, L>=1), got {tuple(input_ids.shape)}")
        check_generation("generate", max_new_tokens, temperature, top_k, top_p)
        if quantize not in QUANTIZE:
            raise ValueError(f"generate: quantize must be one of {QUANTIZE}, got {quantize!r}")
        if quantize is not None and (not fast or draft is not None):
            raise ValueError(f"generate: quantize={quantize!r} runs on the compiled step: not with fast=False or "
                             "draft= (speculative decoding)")
        vocab = vocab_size or self.config.vocab_size
        if draft is not None:
            if input_ids.shape[0] != 1:
                raise ValueError(f"generate: speculative decoding (draft=...) needs batch 1, got input_ids "
                                 f"{tuple(input_ids.shape)}")
            yield from speculative_stream(self, draft, input_ids, max_new_tokens, k, temperature, top_k, top_p, seed,
                                          state, draft_state, vocab, eos_token_id, stats, allowed_tokens, fast=fast)
            return
        if stats is not None or draft_state is not None:
            raise ValueError("generate: stats and draft_state are for speculative decoding; pass draft=")
        allowed = allowed_mask(allowed_tokens, vocab, input_ids.device)
        if max_new_tokens == 0:
            return
        generator = None
        if seed is not None:
            generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        if quantize is not None:
            reason = unsupported_reason(self)
            if reason is not None:
                raise RuntimeError(f"generate: quantize={quantize!r} needs the compiled decode step: {reason}")
            if state is None:
                state = self.empty_state(input_ids.shape[0], input_ids.device)
            else:  # the caller's state stays as it is: the compiled step works on a copy
                state = ModelState([type(s)(*(t.clone() for t in vars(s).values())) for s in state.layers],
                                   state.seqlen_offset)
            decoder = FastDecoder(self, state, quantize=quantize)
            last = decoder.prefill(input_ids)[:, -1]
        else:
            out = self(input_ids, state=state, return_state=True, num_last_tokens=1)
            state, last = out.state, out.logits[:, -1]
            # the state is this loop's own from here (the forward made new tensors): the compiled step updates it
            # in place
            decoder = fast_decoder_or_none(self, state) if fast and max_new_tokens > 1 else None
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            logits = restrict_logits(last[:, :vocab], allowed)
            token = sample_logits(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                token = token.masked_fill(done, eos_token_id)
                done |= token == eos_token_id
            yield token
            if i == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
                return  # (no step after the last token: nobody reads its logits)
            if decoder is not None:
                last = decoder.step(token)
            else:
                out = self(token[:, None], state=state, return_state=True)
                state, last = out.state, out.logits[:, -1]

    def generate(self, input_ids: Tensor, max_new_tokens: int | None = None, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 0.0, eos_token_id: int | None = None, seed: int | None = None,
                 state: ModelState | None = None, max_length: int | None = None, **kwargs) -> Tensor:
        """Returns (batch, L + new) token ids: the prompt followed by up to ``max_new_tokens`` tokens.
        ``max_length`` (mamba_ssm's argument: total length) may be given instead (a prompt already that
        long gets no new tokens). ``kwargs`` go to ``stream``: vocab_size, allowed_tokens, draft, k, stats,
        draft_state, fast, quantize (``"int8"``: int8 weight-only decoding)."""
        if max_new_tokens is None:
            if max_length is None:
                raise ValueError("generate: give max_new_tokens (or max_length)")
            max_new_tokens = max(0, max_length - input_ids.shape[1])
        tokens = list(self.stream(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed,
                                  state, **kwargs))
        if not tokens:
            return input_ids
        return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)
