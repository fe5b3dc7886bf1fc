"""Training on sequences longer than memory allows: the sequence is cut into pieces, each piece continues
from the previous piece's state, and (with ``recompute=True``) each piece's activations are rebuilt in
backward instead of kept. Gradients are exact (they flow through the carried state) unless
``detach_state=True`` asks for truncated BPTT.

Memory. The forward reads every piece under ``no_grad`` and keeps only the state at each piece boundary
(a few KB per piece); backward walks the pieces in reverse, recomputes one piece under autograd and
back-propagates the loss gradient together with the gradient of the carried state (``_PiecewiseLoss``).
So a window of L tokens holds its token ids, one piece's activations and one small state per piece:
L = 2^22 trains in about the memory of one piece.

Why not ``torch.utils.checkpoint`` per piece: the non-reentrant checkpoint runs each piece's forward with
autograd on and keeps that piece's whole autograd graph (hundreds of small nodes and saved-tensor holders)
until backward. Those small long-lived allocations land between the piece's freed activation buffers; glibc
can then neither reuse the fragmented holes for the next piece's buffers nor return the pages to the OS, so
RSS grew by ~2.5 KB per token (a 2^20-token step: 3.5 GB instead of 1.1 GB) although the live tensors were a
few MB (``python -m benchmarks.long_dna --attribute 2^18``: ``malloc_trim`` after the forward gave it all
back). Any small allocation kept per piece does the same, which is why the per-piece states go into buffers
allocated once per window (``_PieceStore``). The checkpoint path is kept only for models that are not
``nn.Module``s (a closure: its parameters are unknown here) or whose state is not a ``ModelState``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..state import ModelState

__all__ = ["ChunkedLoss", "chunked_lm_loss"]


@dataclass
class ChunkedLoss:
    loss_sum: Tensor  # summed token losses (differentiable)
    n_tokens: int  # tokens that counted (labels != ignore_index)
    state: ModelState | None  # state after the last piece

    @property
    def loss(self) -> Tensor:
        return self.loss_sum / max(self.n_tokens, 1)


def _piece_loss(model, ids: Tensor, labels: Tensor, state: ModelState | None, vocab_size: int | None,
                ignore_index: int):
    # ids / labels may be stored compactly (uint8, int16, int32) for the whole window: widened one piece at a time
    out = model(ids.long(), state=state, return_state=True)
    logits = out.logits if vocab_size is None else out.logits[..., :vocab_size]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    loss = F.cross_entropy(logits.flatten(0, 1), labels.long().flatten(), ignore_index=ignore_index,
                           reduction="sum")
    return loss, out.state


# --- ModelState <-> flat tensors (autograd.Function inputs and outputs must be tensors) ---------------------
def _flatten(state: ModelState) -> tuple[list[Tensor], tuple]:
    layout = tuple((type(s), tuple(f.name for f in fields(s))) for s in state.layers)
    flat = [getattr(s, name) for s, (_, names) in zip(state.layers, layout) for name in names]
    return flat, (layout, state.seqlen_offset)


def _unflatten(flat, spec: tuple) -> ModelState:
    layout, offset = spec
    it = iter(flat)
    return ModelState([cls(**{name: next(it) for name in names}) for cls, names in layout], offset)


class _PiecewiseLoss(torch.autograd.Function):
    """loss_sum, *final_state = f(ids, labels, *initial_state, *params): the summed piece losses of one window.

    forward: every piece under no_grad, keeping the state entering each piece (and the RNG state, so a
    stochastic model recomputes the same values). backward: pieces in reverse, each recomputed under autograd;
    ``torch.autograd.grad`` of (piece loss, piece's final state) with the incoming (loss, state) gradients gives
    the parameter gradients (summed over pieces) and the gradient of the piece's initial state, which is the
    state gradient of the piece before it (dropped with ``detach_state``: truncated BPTT).
    """

    @staticmethod
    def forward(ctx, opts: dict, ids: Tensor, labels: Tensor, n_state: int, *tensors: Tensor):
        model, chunk_len = opts["model"], opts["chunk_len"]
        state = _unflatten([t.detach() for t in tensors[:n_state]], opts["spec"]) if n_state else None
        starts = list(range(0, ids.shape[1], chunk_len))
        # What is kept per piece (its entering state and RNG state) goes into buffers allocated once for the
        # whole window: small tensors allocated piece after piece and kept until backward would sit between
        # each piece's freed activation buffers and fragment the heap (RSS then grows ~2 KB per token).
        saved = _PieceStore(len(starts), ids.device)
        total = None
        for i, s in enumerate(starts):
            saved.put(i, state)
            loss, state = _piece_loss(model, ids[:, s: s + chunk_len], labels[:, s: s + chunk_len], state,
                                      opts["vocab_size"], opts["ignore_index"])
            total = loss if total is None else total.add_(loss)
            del loss
        flat, opts["out_spec"] = _flatten(state)  # how chunked_lm_loss rebuilds the final ModelState
        ctx.opts, ctx.saved, ctx.n_state = opts, saved, n_state
        ctx.autocast = _autocast_state(ids.device.type)
        ctx.save_for_backward(ids, labels)
        ctx.set_materialize_grads(False)
        # clone: an output that is a view of (or the same tensor as) an input confuses autograd
        return (total, *[t.clone() for t in flat])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss, *g_state):
        ids, labels = ctx.saved_tensors
        opts = ctx.opts
        model, chunk_len, params = opts["model"], opts["chunk_len"], opts["params"]
        starts = list(range(0, ids.shape[1], chunk_len))
        g_params: list[Tensor | None] = [None] * len(params)
        g_state = list(g_state)
        device_type, enabled, dtype = ctx.autocast
        for i in reversed(range(len(starts))):
            s = starts[i]
            if g_loss is None and all(g is None for g in g_state):
                g_state = []
                break  # nothing flows into this piece or any before it
            state_in, rng = ctx.saved.get(i)
            flat_in, spec_in = (_flatten(state_in) if state_in is not None else ([], None))
            need_state = (i > 0 and not opts["detach_state"]) or (i == 0 and ctx.n_state and any(
                ctx.needs_input_grad[4: 4 + ctx.n_state]))
            leaves_in = [t.detach().requires_grad_(need_state and t.is_floating_point()) for t in flat_in]
            with torch.enable_grad(), _restore_rng(ids.device, rng), \
                    torch.autocast(device_type, dtype=dtype, enabled=enabled):
                loss, state_out = _piece_loss(model, ids[:, s: s + chunk_len], labels[:, s: s + chunk_len],
                                              _unflatten(leaves_in, spec_in) if state_in is not None else None,
                                              opts["vocab_size"], opts["ignore_index"])
            outs, grads_out = [], []
            if g_loss is not None:
                outs.append(loss)
                grads_out.append(g_loss)
            for t, g in zip(_flatten(state_out)[0], g_state):
                if g is not None and t.requires_grad:
                    outs.append(t)
                    grads_out.append(g)
            inputs = list(params) + [t for t in leaves_in if t.requires_grad]
            got = torch.autograd.grad(outs, inputs, grads_out, allow_unused=True) if outs and inputs else []
            for j in range(len(params)):
                g = got[j] if got else None
                if g is not None:
                    g_params[j] = g if g_params[j] is None else g_params[j] + g
            it = iter(got[len(params):])
            g_state = [next(it) if t.requires_grad else None for t in leaves_in]
            if opts["detach_state"]:
                g_state = [None] * len(g_state)  # truncated BPTT: no gradient crosses a piece boundary
            del loss, state_out, outs, got
        ctx.saved = None
        # g_state is now the gradient of the initial state (all None or empty when none reached it)
        g_init = g_state if len(g_state) == ctx.n_state else [None] * ctx.n_state
        return (None, None, None, None, *g_init, *g_params)


class _PieceStore:
    """The state entering each piece and the RNG state at its start, kept for backward.

    Piece 0's state is the caller's (kept as is). For pieces 1.., fixed-shape state tensors (the SSM and conv
    states) are copied into one (n_pieces - 1, *shape) buffer each, allocated when piece 1's state arrives; a
    tensor whose shape changes from piece to piece (an attention layer's key/value cache) is kept per piece."""

    def __init__(self, n_pieces: int, device: torch.device):
        self.n, self.device = n_pieces, device
        self.first: ModelState | None = None
        self.layout, self.buffers = None, None
        self.offsets = [0] * n_pieces
        self.own: list[dict[int, Tensor]] = []  # per tensor: piece -> clone, for shape-changing tensors
        rng = _rng_state(device)
        self.rng_cpu = rng[0].new_empty((n_pieces, *rng[0].shape))
        self.rng_dev = None if rng[1] is None else rng[1].new_empty((n_pieces, *rng[1].shape))

    def put(self, i: int, state: ModelState | None) -> None:
        cpu, dev = _rng_state(self.device)
        self.rng_cpu[i].copy_(cpu)
        if dev is not None:
            self.rng_dev[i].copy_(dev)
        if i == 0:
            self.first = state
            return
        flat, (layout, self.offsets[i]) = _flatten(state)
        if self.buffers is None:
            self.layout = layout
            self.buffers = [t.new_empty((self.n - 1, *t.shape)) for t in flat]
            self.own = [{} for _ in flat]
        for k, t in enumerate(flat):
            if t.shape == self.buffers[k].shape[1:]:
                self.buffers[k][i - 1].copy_(t)
            else:
                self.own[k][i] = t.detach().clone()

    def get(self, i: int) -> tuple[ModelState | None, tuple]:
        # clone: torch.set_rng_state crashes on a view with a storage offset (torch 2.11)
        rng = (self.rng_cpu[i].clone(), None if self.rng_dev is None else self.rng_dev[i].clone())
        if i == 0:
            return self.first, rng
        flat = [own.get(i, buf[i - 1]) for buf, own in zip(self.buffers, self.own)]
        return _unflatten(flat, (self.layout, self.offsets[i])), rng


def _rng_state(device: torch.device):
    cpu = torch.get_rng_state()
    dev = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return cpu, dev


class _restore_rng:
    """Run a block with the CPU (and CUDA) RNG set to a saved state; the caller's RNG is untouched after."""

    def __init__(self, device: torch.device, saved):
        self.device, self.saved = device, saved

    def __enter__(self):
        self.outer = _rng_state(self.device)
        torch.set_rng_state(self.saved[0])
        if self.saved[1] is not None:
            torch.cuda.set_rng_state(self.saved[1], self.device)

    def __exit__(self, *exc):
        torch.set_rng_state(self.outer[0])
        if self.outer[1] is not None:
            torch.cuda.set_rng_state(self.outer[1], self.device)
        return False


def _autocast_state(device_type: str) -> tuple[str, bool, torch.dtype]:
    """The autocast setting the forward ran under, to recompute under the same one in backward."""
    if device_type not in ("cpu", "cuda"):
        return "cpu", False, torch.bfloat16
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def chunked_lm_loss(model, input_ids: Tensor, labels: Tensor, chunk_len: int, state: ModelState | None = None,
                    recompute: bool = True, detach_state: bool = False, vocab_size: int | None = None,
                    ignore_index: int = -100) -> ChunkedLoss:
    """Summed cross-entropy of a causal LM over a long sequence, read ``chunk_len`` tokens at a time.

    model: a MambaLMHeadModel (anything taking ``(ids, state=, return_state=True)`` and returning
    ``.logits`` / ``.state``). input_ids, labels: (batch, L) of any integer dtype (a long window may be kept
    as uint8 / int16 / int32: each piece is widened to int64 when it is read); labels already shifted
    (labels[:, t] is the target of input_ids[:, t]). vocab_size: score only the first ``vocab_size`` logits
    (the head is padded). ``chunk_len`` must be a multiple of a Mamba-2 model's chunk_size for results
    identical to one shot.

    recompute=True (default, with grad enabled): memory is one piece's activations plus a small state per
    piece, whatever L is (see the module docstring). recompute=False keeps every piece's activations
    (plain autograd through all pieces).
    """
    if input_ids.shape != labels.shape:
        raise ValueError(f"chunked_lm_loss: input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} "
                         "must have the same shape")
    if chunk_len <= 0:
        raise ValueError(f"chunked_lm_loss: chunk_len must be positive, got {chunk_len}")
    for name, t in (("input_ids", input_ids), ("labels", labels)):
        if t.is_floating_point() or t.is_complex():
            raise ValueError(f"chunked_lm_loss: {name} must be an integer tensor, got {t.dtype}")
    n_tokens = int(sum(int((labels[:, s: s + chunk_len] != ignore_index).sum())
                       for s in range(0, labels.shape[1], chunk_len)))
    use_recompute = recompute and torch.is_grad_enabled() and input_ids.shape[1] > 0
    if use_recompute and isinstance(model, nn.Module) and (state is None or isinstance(state, ModelState)):
        params = [p for p in model.parameters() if p.requires_grad]
        flat, spec = _flatten(state) if state is not None else ([], None)
        opts = {"model": model, "chunk_len": chunk_len, "vocab_size": vocab_size, "ignore_index": ignore_index,
                "detach_state": detach_state, "params": params, "spec": spec}
        out = _PiecewiseLoss.apply(opts, input_ids, labels, len(flat), *flat, *params)
        total, final = out[0], out[1:]
        return ChunkedLoss(total, n_tokens, _unflatten(final, opts["out_spec"]))
    total = 0.0
    for s in range(0, input_ids.shape[1], chunk_len):
        ids, lab = input_ids[:, s: s + chunk_len], labels[:, s: s + chunk_len]
        if detach_state and state is not None:
            state = state.detach()
        if use_recompute:  # a closure or a foreign state type: torch.utils.checkpoint per piece
            loss, state = checkpoint(_piece_loss, model, ids, lab, state, vocab_size, ignore_index,
                                     use_reentrant=False)
        else:
            loss, state = _piece_loss(model, ids, lab, state, vocab_size, ignore_index)
        total = total + loss
    return ChunkedLoss(total, n_tokens, state)
