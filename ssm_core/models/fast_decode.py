"""The whole-model decode step: every layer of a MambaLMHeadModel in one compiled call per token (CPU).

``FastDecoder(model, state)`` hands the model's weights (in place, fp32 or bf16; above SMALL_ROWS rows also
oneDNN-packed copies, see ``pack``) and ``state`` (a ModelState,
updated IN PLACE from then on) to the compiled step of ``backend.KERNELS["model_step"]``
(``kernels.cpu.decode_model_cpu``, kernels/csrc/model_step_cpu.h). Then

    logits = dec.step(tokens)                         # tokens (batch,) -> (batch, padded_vocab)
    logits = dec.forward(ids, n_last, snapshots)      # ids (batch, T): T tokens in one call -> (batch, n_last, V)
    dec.restore(t)                                    # back to the state after token t of that call (snapshots)
    dec.save(slot); dec.load(slot)                    # copies of the whole state (preallocated, reused)
    dec.prefill(ids)                                  # a long prompt through the module forward (scan kernels)

``FastDecoder(model, state, quantize="int8")``: int8 weight-only decoding. The big matrices the step streams
(in_proj, out_proj, gated-MLP fc1 / fc2, the LM head, and the embedding when tied to it) are quantised once, here,
to int8 with one symmetric fp32 scale per output row (``quantize_int8``: s = max|w_row| / 127, q = round(w / s),
so |w - q s| <= s / 2); x_proj / dt_proj (about 5% of a Mamba-1 layer's bytes at d_model 768, and dt feeds
exp(dt A)) and the per-channel parameters keep the model dtype; activations, state and accumulation stay fp32 (a
bf16 model's roundings are kept). The decoder then holds the int8 copies (the model is not modified);
``prefill`` reads the prompt through the int8 step too (in chunks), so a quantised decoder never uses the
full-precision matrices. Its reference twin is the module path of ``dequantized_copy(model)`` (the same int8
weights as q s in the model dtype); ``weight_bytes`` is what one step streams. Attention layers of hybrids keep
their module weights.

The reference twin is the module path: ``model(ids, state=..., return_state=True)`` (``Mamba._step`` /
``Mamba2._step`` per layer); tests/core/test_fast_decode.py checks step == forward against it. Attention layers
of hybrid models run through their module (``Block.forward``) between compiled segments. Returned logits are
the kernel's buffer, valid until the next call. ``unsupported_reason(model)`` says why a model cannot use it
(the caller then uses the module path): not CPU, not fp32 / bf16, delta hooks, bidirectional, a fast path that
cannot load here (after the one warning of ssm_core.ops.backend), HISS_BACKEND=ref, or complex-A Mamba layers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..modules.mamba import Mamba
from ..modules.mamba2 import Mamba2
from ..modules.mha import MHA
from ..modules.mlp import GatedMLP
from ..ops.backend import fast_path
from ..ops.norm import RMSNorm
from ..state import AttentionState, ModelState, SSMState

__all__ = ["FastDecoder", "unsupported_reason", "fast_decoder_or_none", "quantize_int8", "dequantized_copy",
           "QUANTIZE"]

QUANTIZE = (None, "int8")  # the quantize= options of FastDecoder / generate / stream
SMALL_ROWS = 8  # the kernel's default: matmuls of more rows than this go to ATen's BLAS (MKL / oneDNN)
_MATRICES = ("in_proj", "out_proj", "x_proj", "dt_proj", "fc1", "fc2")  # the layer matrices pack() packs (fp32)


def _structure_reason(model) -> str | None:
    cfg = getattr(model, "config", None)
    backbone = getattr(model, "backbone", None)
    if cfg is None or backbone is None or not hasattr(model, "lm_head"):
        return "not a MambaLMHeadModel"
    if cfg.bidirectional:
        return "bidirectional models have no streaming state"
    w = backbone.embedding.weight
    if w.device.type != "cpu":
        return "the compiled step runs on the CPU"
    if w.dtype not in (torch.float32, torch.bfloat16):
        return f"the compiled step takes fp32 or bf16 weights, not {w.dtype}"
    if model.lm_head.weight.dtype != w.dtype or model.lm_head.bias is not None:
        return "lm_head must be a bias-free linear of the embedding's dtype"
    for i, layer in enumerate(backbone.layers):
        mixer = layer.mixer
        if isinstance(mixer, MHA):
            continue
        if not isinstance(mixer, (Mamba, Mamba2)):
            return f"layer {i}: {type(mixer).__name__} mixers are not supported"
        if mixer.has_delta_hooks:
            return f"layer {i}: delta hooks run in Python"
        if isinstance(mixer, Mamba) and mixer.complex_A:  # model_step_cpu.h has a real state only
            return f"layer {i}: complex A (complex_A=True) is stepped through the module"
        for norm in (layer.norm, getattr(layer, "norm2", None)):
            if norm is not None and not isinstance(norm, (RMSNorm, nn.LayerNorm)):
                return f"layer {i}: norm {type(norm).__name__} is not supported"
        if layer.mlp is not None and not isinstance(layer.mlp, GatedMLP):
            return f"layer {i}: mlp {type(layer.mlp).__name__} is not supported"
        for p in mixer.parameters():
            if p.dtype not in (torch.float32, w.dtype) or p.device.type != "cpu":
                return f"layer {i}: parameters must be CPU fp32 or of the embedding's dtype"
    if not isinstance(backbone.norm_f, (RMSNorm, nn.LayerNorm)):
        return "norm_f is not RMSNorm / LayerNorm"
    return None


def unsupported_reason(model) -> str | None:
    """None when ``FastDecoder`` can run ``model`` here, else why not (the caller uses the module path)."""
    reason = _structure_reason(model)
    if reason is not None:
        return reason
    if fast_path(None, model.backbone.embedding.weight.device, "model_step") is None:
        return "the compiled CPU kernels are not in use (HISS_BACKEND=ref, or they cannot be built here)"
    return None


def fast_decoder_or_none(model, state: ModelState, quantize: str | None = None) -> FastDecoder | None:
    """A FastDecoder bound to ``state`` (updated in place), or None when ``model`` must use the module path."""
    if unsupported_reason(model) is not None:
        return None
    return FastDecoder(model, state, quantize=quantize)


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-row int8 of a matrix w (O, K): (q int8 (O, K), scale fp32 (O,)) with w ~ q * scale,
    scale = max|w_row| / 127 (1 for an all-zero row), q = round(w / scale) in [-127, 127]: |w - q s| <= s / 2."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def _int8_targets(model) -> list[tuple[str, nn.Linear]]:
    """(name, linear) of every matrix int8 decoding quantises: per Mamba layer in_proj, out_proj (+ fc1, fc2 of a
    gated MLP), and the LM head (whose weight is the embedding's when tied)."""
    out = []
    for i, layer in enumerate(model.backbone.layers):
        if isinstance(layer.mixer, MHA):
            continue
        out += [(f"layers.{i}.in_proj", layer.mixer.in_proj), (f"layers.{i}.out_proj", layer.mixer.out_proj)]
        if layer.mlp is not None:
            out += [(f"layers.{i}.fc1", layer.mlp.fc1), (f"layers.{i}.fc2", layer.mlp.fc2)]
    out.append(("lm_head", model.lm_head))
    return out


def dequantized_copy(model):
    """A deep copy of ``model`` whose matrices ``FastDecoder(..., quantize="int8")`` quantises hold q * s in the
    model dtype (the tied embedding with them): the module-path reference twin of the int8 decoder."""
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for _, lin in _int8_targets(twin):
            q, s = quantize_int8(lin.weight)
            lin.weight.copy_((q.float() * s[:, None]).to(lin.weight.dtype))
    return twin


def _f32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().float().contiguous()


def _mat(t: Tensor) -> Tensor:
    return t.detach().contiguous()


def _norm(prefix: str, norm: nn.Module, tensors: dict, numbers: dict) -> None:
    tensors[f"{prefix}_weight"] = _f32(norm.weight)
    if isinstance(norm, nn.LayerNorm):
        if norm.bias is not None:
            tensors[f"{prefix}_bias"] = _f32(norm.bias)
        numbers[f"{prefix}_layernorm"] = 1.0
    numbers[f"{prefix}_eps"] = float(norm.eps)


def _linear(name: str, lin: nn.Linear, tensors: dict) -> None:
    tensors[name] = _mat(lin.weight)
    if lin.bias is not None:
        tensors[f"{name}_bias"] = _f32(lin.bias)


def _packed_parts(reorder, w: Tensor, rows: int, parts: int) -> list[Tensor]:
    """oneDNN-packed copies of ``parts`` consecutive blocks of w's output rows (multiples of 64 rows, the last
    one shorter; fewer parts when w is small), for ``rows``-row products."""
    step = -(-w.shape[0] // max(1, parts) // 64) * 64 or w.shape[0]
    return [reorder(w[o: o + step].contiguous(), rows) for o in range(0, w.shape[0], step)]


class FastDecoder:
    """Compiled whole-model decode step bound to one model and one ModelState (updated in place).
    ``quantize="int8"``: int8 weight-only (see the module docstring). ``pack``: hand the kernel oneDNN-packed
    weights (``pack()``); None = when the batch is above SMALL_ROWS."""

    PREFILL_CHUNK = 256  # tokens per call when a quantised decoder reads a prompt (bounded scratch memory)

    def __init__(self, model, state: ModelState, quantize: str | None = None, pack: bool | None = None):
        if quantize not in QUANTIZE:
            raise ValueError(f"FastDecoder: quantize must be one of {QUANTIZE}, got {quantize!r}")
        reason = _structure_reason(model)
        if reason is not None:
            raise ValueError(f"FastDecoder: {reason}")
        factory = fast_path(None, model.backbone.embedding.weight.device, "model_step")
        if factory is None:
            raise RuntimeError("FastDecoder: the compiled CPU kernels are not in use here")
        backbone = model.backbone
        self.model, self.state, self.quantize = model, state, quantize
        self.dtype = backbone.embedding.weight.dtype
        if len(state.layers) != len(backbone.layers):
            raise ValueError(f"FastDecoder: state has {len(state.layers)} layers, the model {len(backbone.layers)}")
        first = state.layers[0]
        self.batch = int((first.conv if isinstance(first, SSMState) else first.k).shape[0])
        self._dm = dm = factory(self.batch)
        self._q8: dict[int, tuple[Tensor, Tensor]] = {}  # weight data_ptr -> (q, scale): a tied head quantised once
        io, nums = {"embedding": _mat(backbone.embedding.weight)}, {"bf16": float(self.dtype == torch.bfloat16)}
        self._linear("lm_head", model.lm_head, io)
        if quantize and model.lm_head.weight.data_ptr() == backbone.embedding.weight.data_ptr():
            io["embedding"], io["embedding_scale"] = io["lm_head"], io["lm_head_scale"]
        _norm("norm_f", backbone.norm_f, io, nums)
        nums["residual_in_fp32"] = float(bool(backbone.layers[0].residual_in_fp32))
        self._res_fp32 = bool(backbone.layers[0].residual_in_fp32)
        dm.set_io(io, nums)
        self._streamed = list(io.values())
        self._external: list[int] = []
        self._matrices: dict[int, dict[str, Tensor]] = {}  # layer -> its matrices as handed to the kernel
        with torch.no_grad():
            for i, layer in enumerate(backbone.layers):
                if isinstance(layer.mixer, MHA):
                    dm.add_layer("external", {}, {})
                    self._external.append(i)
                    continue
                kind, t, n = self._layer_args(layer)
                dm.add_layer(kind, t, n)
                self._streamed += list(t.values())
                if quantize is None:
                    self._matrices[i] = {k: t[k] for k in _MATRICES if k in t}
        self._q8.clear()  # the kernel holds the int8 tensors it was given
        self._bind()
        self._head = io["lm_head"]
        if pack or (pack is None and self.batch > SMALL_ROWS):
            self.pack()
        self._slots: dict[int, list] = {}
        self._snap_base: tuple | None = None

    def pack(self, parts: int | None = None) -> bool:
        """Give the kernel oneDNN-packed copies of weights for its matmuls of more than SMALL_ROWS rows (done by the
        constructor when the batch is above it): bf16, the LM head (32 x 50,280 logits 1.6x faster than oneDNN on
        the plain weight); fp32, the LM head and every layer matrix. Each is packed in ``parts`` blocks of output
        rows (default: torch's thread count), one thread's product each: on an AMD Zen 4 CPU (MKL takes its generic
        path there) a 130m-shaped batch-32 fp32 step took 79 ms through MKL, 55 ms with the head and the wide-input
        matrices packed whole, 36 ms with every matrix packed in two parts (two threads; packed whole, oneDNN's own
        two-thread split ran the wide-output matrices slower than MKL: 370m 269 vs 225 ms). Costs one more copy of
        what it packs. False where oneDNN is missing or weights are int8."""
        reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
        if (self.quantize is not None or self.dtype not in (torch.float32, torch.bfloat16)
                or not torch.backends.mkldnn.is_available() or reorder is None):
            return False
        rows, parts = max(self.batch, SMALL_ROWS + 1), parts or torch.get_num_threads()
        self._dm.set_packed(-1, "lm_head", _packed_parts(reorder, self._head, rows, parts))
        if self.dtype == torch.float32:  # bf16 layer matrices: oneDNN's plain bf16 GEMM already (packing: 0.9-1.06x)
            for i, matrices in self._matrices.items():
                for name, w in matrices.items():
                    self._dm.set_packed(i, name, _packed_parts(reorder, w, rows, parts))
        return True

    def _linear(self, name: str, lin: nn.Linear, tensors: dict) -> None:
        """The linear's weight (and bias) for the kernel: as it is, or (quantize="int8") int8 + per-row scales."""
        _linear(name, lin, tensors)
        if self.quantize == "int8":
            key = lin.weight.data_ptr()
            if key not in self._q8:
                self._q8[key] = quantize_int8(lin.weight)
            tensors[name], tensors[f"{name}_scale"] = self._q8[key]

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights one step streams: every tensor handed to the kernel once (int8 values + scales for
        quantised matrices; a tied head counted once; the whole embedding, as benchmarks.decode counts it)."""
        seen, total = set(), 0
        for t in self._streamed:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    def _layer_args(self, layer) -> tuple[str, dict, dict]:
        m = layer.mixer
        t: dict[str, Tensor] = {}
        n: dict[str, float] = {"d_state": float(m.d_state)}
        _norm("norm", layer.norm, t, n)
        self._linear("in_proj", m.in_proj, t)
        self._linear("out_proj", m.out_proj, t)
        t["conv_weight"] = _f32(m.conv1d.weight.squeeze(1))
        if m.conv1d.bias is not None:
            t["conv_bias"] = _f32(m.conv1d.bias)
        t["A"] = (-torch.exp(m.A_log.detach().float())).contiguous()
        t["D"] = _f32(m.D)
        if isinstance(m, Mamba):
            kind = "mamba1"
            n["selective"] = float(m.selective)
            if m.selective:
                t["x_proj"] = _mat(m.x_proj.weight)
                t["dt_proj"] = _mat(m.dt_proj.weight)
                t["dt_bias"] = _f32(m.dt_proj.bias)
            else:  # LTI: B, C enter in the module dtype (as in Mamba._dt_B_C)
                wdt = m.in_proj.weight.dtype
                t["dt_bias"] = _f32(m.dt_bias)
                t["B"], t["C"] = _f32(m.B.detach().to(wdt)), _f32(m.C.detach().to(wdt))
        else:
            kind = "mamba2"
            t["dt_bias"] = _f32(m.dt_bias)
            lo, hi = m.dt_limit
            n.update(nheads=float(m.nheads), headdim=float(m.headdim), ngroups=float(m.ngroups), d_mlp=float(m.d_mlp),
                     dt_min=float(lo), dt_max=float(min(hi, 3.0e38)), dt_clamp=float((lo, hi) != (0.0, math.inf)),
                     rmsnorm=float(m.rmsnorm), norm_before_gate=float(m.norm_before_gate))
            if m.rmsnorm:
                t["gnorm_weight"] = _f32(m.norm.weight)
                n["gnorm_eps"] = float(m.norm.eps)
                n["gnorm_group"] = float(m.norm.group_size or m.d_ssm)
        if layer.mlp is not None:
            _norm("norm2", layer.norm2, t, n)
            self._linear("fc1", layer.mlp.fc1, t)
            self._linear("fc2", layer.mlp.fc2, t)
        return kind, t, n

    def _bind(self) -> None:
        """Hand every Mamba layer's state tensors to the kernel (contiguous, conv in the weight dtype, ssm fp32;
        a state that is not gets replaced in ``self.state`` by one that is)."""
        for i, s in enumerate(self.state.layers):
            if i in self._external:
                continue
            if not isinstance(s, SSMState):
                raise ValueError(f"FastDecoder: layer {i} state is {type(s).__name__}, expected SSMState")
            conv, ssm = s.conv, s.ssm
            if conv.dtype != self.dtype or not conv.is_contiguous() or conv.requires_grad:
                conv = conv.detach().to(self.dtype).contiguous().clone()
            if ssm.dtype != torch.float32 or not ssm.is_contiguous() or ssm.requires_grad:
                ssm = ssm.detach().float().contiguous().clone()
            if conv is not s.conv or ssm is not s.ssm:
                self.state.layers[i] = SSMState(conv, ssm)
            self._dm.bind_state(i, conv, ssm)

    # ---- stepping ------------------------------------------------------------------------------
    def step(self, tokens: Tensor) -> Tensor:
        """tokens (batch,) -> logits (batch, padded_vocab) of the next token; the state advances by one."""
        return self.forward(tokens.reshape(self.batch, 1), 1)[:, 0]

    def forward(self, ids: Tensor, n_last: int = 1, snapshots: bool = False) -> Tensor:
        """ids (batch, T): T tokens in one call -> logits (batch, n_last, padded_vocab) of the last n_last.
        ``snapshots``: keep the state after every token, for ``restore``."""
        T = int(ids.shape[1])
        if snapshots:
            self._snap_base = (self.state.seqlen_offset,
                               {i: self.state.layers[i].k.shape[2] for i in self._external})
        else:
            self._snap_base = None
        with torch.inference_mode():
            if not self._external:
                logits = self._dm.forward(ids, n_last, snapshots)
            else:
                dm, layers = self._dm, self.model.backbone.layers
                dm.embed(ids)
                start = 0
                for i in self._external:
                    dm.run_layers(start, i, snapshots)
                    x = dm.residual()
                    xin = x if self._res_fp32 else x.to(self.dtype)
                    out, new = layers[i](xin, state=self.state.layers[i], return_state=True)
                    self.state.layers[i] = new
                    x.copy_(out)
                    start = i + 1
                dm.run_layers(start, len(layers), snapshots)
                logits = dm.head(n_last)
        self.state.seqlen_offset += T
        return logits

    def restore(self, t: int) -> None:
        """The state after token ``t`` (0-based) of the last ``forward(..., snapshots=True)``."""
        if self._snap_base is None:
            raise RuntimeError("FastDecoder.restore: the last forward kept no snapshots")
        offset, kv = self._snap_base
        self._dm.restore(int(t))
        for i, length in kv.items():
            s = self.state.layers[i]
            self.state.layers[i] = AttentionState(s.k[:, :, : length + t + 1], s.v[:, :, : length + t + 1])
        self.state.seqlen_offset = offset + t + 1

    def prefill(self, ids: Tensor, n_last: int = 1) -> Tensor:
        """Read ids (batch, L) through the module forward (the scan kernels: faster for long prompts) from the
        current state, then copy the result into the bound state. Returns the last n_last logits. A quantised
        decoder reads them through its own (int8) step instead, PREFILL_CHUNK tokens per call."""
        if self.quantize is not None:
            L = int(ids.shape[1])
            if not 1 <= n_last <= L:
                raise ValueError(f"FastDecoder.prefill: n_last must be in [1, {L}], got {n_last}")
            outs = []
            for a in range(0, L, self.PREFILL_CHUNK):
                b = min(L, a + self.PREFILL_CHUNK)
                k = min(b - a, n_last - (L - b))  # of this chunk's logits, the ones among the last n_last
                if k > 0:
                    outs.append(self.forward(ids[:, a:b], k).clone())
                else:
                    self.forward(ids[:, a:b], 1)
            self._snap_base = None
            return torch.cat(outs, 1)
        with torch.inference_mode():
            out = self.model(ids, state=self.state, return_state=True, num_last_tokens=n_last)
            for i, new in enumerate(out.state.layers):
                if i in self._external:
                    self.state.layers[i] = new
                else:
                    self.state.layers[i].conv.copy_(new.conv)
                    self.state.layers[i].ssm.copy_(new.ssm)
        self.state.seqlen_offset = out.state.seqlen_offset
        self._snap_base = None
        return out.logits

    def save(self, slot: int) -> None:
        """Copy the whole state into ``slot`` (buffers allocated on a slot's first use, then reused)."""
        buf = self._slots.get(slot)
        if buf is None:
            buf = self._slots[slot] = [None] * len(self.state.layers) + [0]
        with torch.inference_mode():
            for i, s in enumerate(self.state.layers):
                if i in self._external:
                    buf[i] = s  # attention caches are values (a step makes new tensors): keep the reference
                elif buf[i] is None:
                    buf[i] = (s.conv.clone(), s.ssm.clone())
                else:
                    buf[i][0].copy_(s.conv)
                    buf[i][1].copy_(s.ssm)
        buf[-1] = self.state.seqlen_offset

    def load(self, slot: int) -> None:
        """Put the state saved in ``slot`` back (in place)."""
        buf = self._slots[slot]
        with torch.inference_mode():
            for i, s in enumerate(self.state.layers):
                if i in self._external:
                    self.state.layers[i] = buf[i]
                else:
                    s.conv.copy_(buf[i][0])
                    s.ssm.copy_(buf[i][1])
        self.state.seqlen_offset = buf[-1]
        self._snap_base = None
