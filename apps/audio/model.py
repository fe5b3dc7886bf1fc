"""A SaShiMi-style U-Net of ssm_core blocks over 8-bit µ-law waveforms, with exact recurrent generation.

    tokens (B, L) -> embedding (+ digit embedding)                               level 0: 16 kHz, width d
      level s < S:  [down blocks] -> skip_s -> DownPool_s (p samples -> 1 frame, width x expand)
      centre:       blocks at 16 kHz / prod(pool)
      level s, up:  UpPool_s (1 frame -> p samples, shifted one frame) + skip_s -> up blocks
    -> norm -> logits (B, L, 256)

SaShiMi (Goel et al. 2022) with the Mamba paper's SC09 layout: pooling [4, 4], width doubling, residual
blocks on both sides of each stage (``unet=True``; ``False`` puts them on the up path only, SaShiMi's
default) and in the centre. Every block is ssm_core's pre-norm residual ``Block`` with the mixer chosen per
level (``blocks``): ``mamba`` (selective), ``lti`` (``Mamba(selective=False)``: the S4-like LTI layer of
the Mamba paper's ablations), ``lti_complex`` / ``mamba_complex`` (the same with a complex diagonal A, S4D-Lin
init: ``Mamba(complex_A=True)``) or ``attention`` (ssm_core ``MHA``, causal, RoPE), plus an optional gated
MLP (``ff``) — so the paper's Table 5 outer/centre ablation is a config change.

Causality: the up-pooling output of frame j (4 samples) is shifted to frames j+1, so sample t only sees the
coarse path through frames that ended before t (SaShiMi's one-step shift); the skip adds the fine path.

Recurrent generation (``step``): one sample in, the next sample's logits out. Level 0 runs every sample;
level s collects p_s inputs, and once a group is full runs one step of the coarse path, whose up-pooled
output feeds the next p_s samples. States are ssm_core's (``SSMState`` per Mamba block, ``AttentionState``
per attention block) plus the pooling buffers, in ``UNetState``. ``forward(..., state=, return_state=True)``
reads a chunk in parallel and returns the same state, so long clips are read (and trained) in pieces with
exact results, and a prompt is prefilled in one pass.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apps.common.optim import adamw_warmup_cosine
from ssm_core import MHA, Block, GatedMLP, Mamba, RMSNorm, atomic_write, chunked_lm_loss

__all__ = ["UNetConfig", "UNetState", "AudioOutput", "AudioUNet", "AudioLM", "BLOCK_KINDS"]

BLOCK_KINDS = ("mamba", "lti", "attention", "lti_complex", "mamba_complex")


@dataclass
class UNetConfig:
    """The U-Net's shape. Lists run from the outer level (16 kHz) to the centre.

    d_model: width of level 0; level s has d_model * expand**s.
    pool: pooling factor of each stage (default [4, 4]: 16 kHz -> 4 kHz -> 1 kHz).
    n_layers: residual blocks per side of each stage and in the centre: one int for all, or len(pool)+1 ints.
    blocks: mixer of each level, ``mamba`` | ``lti`` | ``attention`` | ``lti_complex`` | ``mamba_complex`` (complex
    diagonal A, S4D-Lin: the Mamba paper's complex layer, e.g. ``[lti_complex, mamba, mamba]``): one name for all,
    or len(pool)+1 names.
    unet: blocks on the down path too (the Mamba paper's SC09 model); False: up path and centre only.
    ff: gated-MLP expansion after each mixer (hidden width = ff x level width, rounded up to a multiple of 8; 0:
    no MLP): one number for all levels, or len(pool)+1 numbers (e.g. an MLP after the attention centre only).
    ssm_cfg: extra ssm_core.Mamba arguments (d_state, expand, d_conv, ...); attn_cfg: MHA arguments
    (num_heads; RoPE on the whole head by default).
    n_classes: > 0 adds a class (digit) embedding at every level; label -1 means "unconditional".
    """

    d_model: int = 64
    pool: list[int] = field(default_factory=lambda: [4, 4])
    expand: int = 2
    n_layers: int | list[int] = 2
    blocks: str | list[str] = "mamba"
    unet: bool = True
    ff: float | list[float] = 0
    ssm_cfg: dict = field(default_factory=dict)
    attn_cfg: dict = field(default_factory=dict)
    vocab_size: int = 256
    n_classes: int = 0
    norm_epsilon: float = 1e-5
    sample_rate: int = 16_000

    def __post_init__(self):
        self.pool = [int(p) for p in self.pool]
        levels = len(self.pool) + 1
        if isinstance(self.n_layers, int):
            self.n_layers = [self.n_layers] * levels
        if isinstance(self.blocks, str):
            self.blocks = [self.blocks] * levels
        if isinstance(self.ff, (int, float)):
            self.ff = [self.ff] * levels
        self.n_layers, self.blocks = [int(n) for n in self.n_layers], [str(b) for b in self.blocks]
        self.ff = [float(f) for f in self.ff]
        if len(self.n_layers) != levels or len(self.blocks) != levels or len(self.ff) != levels:
            raise ValueError(f"UNetConfig: n_layers, blocks and ff need one entry per level ({levels} for pool="
                             f"{self.pool}: outer to centre), got {self.n_layers}, {self.blocks} and {self.ff}")
        bad = [b for b in self.blocks if b not in BLOCK_KINDS]
        if bad:
            raise ValueError(f"UNetConfig: unknown block kind(s) {bad}; choose from {BLOCK_KINDS}")
        if any(p < 1 for p in self.pool) or self.expand < 1 or self.d_model < 1:
            raise ValueError(f"UNetConfig: pool factors, expand and d_model must be positive, got pool={self.pool}, "
                             f"expand={self.expand}, d_model={self.d_model}")
        if any(f < 0 for f in self.ff):
            raise ValueError(f"UNetConfig: ff must be >= 0 (0: no MLP), got {self.ff}")

    @property
    def total_pool(self) -> int:
        return math.prod(self.pool)

    def width(self, level: int) -> int:
        return self.d_model * self.expand**level

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"UNetConfig: unknown keys {unknown}")
        return cls(**d)


@dataclass
class UNetState:
    """Recurrent state of the whole U-Net after ``t`` samples.

    blocks: one ssm_core state per block (SSMState / AttentionState), in ``AudioUNet.blocks_in_order()`` order.
    buffers[s]: (B, pool[s], width(s)) level-s outputs of the current, unfinished pooling group.
    pending[s]: (B, pool[s], width(s)) up-pooled coarse output for the current group's samples.
    """

    blocks: list
    buffers: list[Tensor]
    pending: list[Tensor]
    t: int = 0

    def detach(self) -> UNetState:
        return UNetState([s.detach() for s in self.blocks], [b.detach() for b in self.buffers],
                         [p.detach() for p in self.pending], self.t)

    def select(self, index: Tensor) -> UNetState:
        """The rows ``index`` of every tensor (e.g. repeat one prompt's state for a batch)."""
        def pick(s):
            return type(s)(*(getattr(s, f).index_select(0, index) for f in s.__dataclass_fields__))
        return UNetState([pick(s) for s in self.blocks], [b.index_select(0, index) for b in self.buffers],
                         [p.index_select(0, index) for p in self.pending], self.t)


@dataclass
class AudioOutput:
    logits: Tensor  # (B, L, vocab)
    state: UNetState | None = None


class DownPool(nn.Module):
    """p consecutive samples (B, L, H) -> one frame (B, L/p, expand*H): a linear map of the p samples."""

    def __init__(self, width: int, pool: int, expand: int):
        super().__init__()
        self.pool = pool
        self.linear = nn.Linear(width * pool, width * expand)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.reshape(x.shape[0], x.shape[1] // self.pool, -1))


class UpPool(nn.Module):
    """One coarse frame (B, T, expand*H) -> p samples each (B, T*p, H), shifted one frame later (causal);
    ``prev``: the up-pooled frame before this chunk (B, p, H), zeros at the start."""

    def __init__(self, width: int, pool: int, expand: int):
        super().__init__()
        self.pool, self.width = pool, width
        self.linear = nn.Linear(width * expand, width * pool)

    def frames(self, x: Tensor) -> Tensor:
        """(B, T, expand*H) -> (B, T, p, H), unshifted."""
        return self.linear(x).unflatten(-1, (self.pool, self.width))

    def forward(self, x: Tensor, prev: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns the shifted samples (B, T*p, H) and the last frame (B, p, H) for the next chunk."""
        y = self.frames(x)
        if prev is None:
            prev = y.new_zeros(y.shape[0], self.pool, self.width)
        shifted = torch.cat([prev[:, None], y[:, :-1]], dim=1)
        return shifted.flatten(1, 2), y[:, -1]


class AudioUNet(nn.Module):
    """Autoregressive waveform model (see the module doc). ``forward(tokens, label=None, state=None,
    return_state=False) -> AudioOutput``; ``step(token, state, label=None) -> (logits, state)``."""

    def __init__(self, config: UNetConfig | dict | None = None):
        super().__init__()
        if config is None:
            config = UNetConfig()
        elif isinstance(config, dict):
            config = UNetConfig.from_dict(config)
        self.config = c = config
        S = len(c.pool)
        self.embedding = nn.Embedding(c.vocab_size, c.d_model)
        self.down = nn.ModuleList()
        self.down_pool = nn.ModuleList()
        self.up_pool = nn.ModuleList()
        self.up = nn.ModuleList()
        for s in range(S):
            w = c.width(s)
            self.down.append(nn.ModuleList(self._block(s, w) for _ in range(c.n_layers[s] if c.unet else 0)))
            self.down_pool.append(DownPool(w, c.pool[s], c.expand))
            self.up_pool.append(UpPool(w, c.pool[s], c.expand))
            self.up.append(nn.ModuleList(self._block(s, w) for _ in range(c.n_layers[s])))
        self.center = nn.ModuleList(self._block(S, c.width(S)) for _ in range(c.n_layers[S]))
        self.cond = None
        if c.n_classes > 0:  # row n_classes = "no label"
            self.cond = nn.ModuleList(nn.Embedding(c.n_classes + 1, c.width(s)) for s in range(S + 1))
        self.norm_f = RMSNorm(c.d_model, eps=c.norm_epsilon)
        self.head = nn.Linear(c.d_model, c.vocab_size)
        self._init_weights()

    # ---- construction -------------------------------------------------------------------------------------
    def _block(self, level: int, width: int) -> Block:
        c = self.config
        kind = c.blocks[level]
        if kind == "attention":
            cfg = dict(c.attn_cfg)
            heads = cfg.pop("num_heads", max(1, width // 32))
            cfg.setdefault("rotary_emb_dim", width // heads)
            mixer = MHA(width, num_heads=heads, causal=True, **cfg)
        else:
            mixer = Mamba(width, selective=kind.startswith("mamba"), complex_A=kind.endswith("_complex"),
                          **c.ssm_cfg)
        mlp = norm2 = None
        if c.ff[level] > 0:
            mlp = GatedMLP(width, hidden_features=round(c.ff[level] * width), multiple_of=8)
            norm2 = RMSNorm(width, eps=c.norm_epsilon)
        return Block(width, mixer, RMSNorm(width, eps=c.norm_epsilon), mlp, norm2)

    def _init_weights(self) -> None:
        """mamba_ssm's scheme: zero Linear biases (not dt_proj's), N(0, 0.02) embeddings, residual-branch output
        projections scaled by 1/sqrt(branches per block * blocks)."""
        blocks = self.blocks_in_order()
        branches = max(1, len(blocks) + sum(b.mlp is not None for b in blocks))  # residual branches in all
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit",
                                                                                          False):
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith(("mixer.out_proj.weight", "mlp.fc2.weight")):
                with torch.no_grad():
                    p /= math.sqrt(branches)

    def blocks_in_order(self) -> list[Block]:
        """Every block, in the order their states are kept: down[0], down[1], ..., centre, up[S-1], ..., up[0]."""
        S = len(self.config.pool)
        out = [b for s in range(S) for b in self.down[s]] + list(self.center)
        return out + [b for s in reversed(range(S)) for b in self.up[s]]

    def _block_offsets(self) -> tuple[list[int], int, list[int]]:
        S = len(self.config.pool)
        down, i = [], 0
        for s in range(S):
            down.append(i)
            i += len(self.down[s])
        center = i
        i += len(self.center)
        up = [0] * S
        for s in reversed(range(S)):
            up[s] = i
            i += len(self.up[s])
        return down, center, up

    # ---- state --------------------------------------------------------------------------------------------
    def empty_state(self, batch: int, device=None, dtype=None) -> UNetState:
        device = device or self.head.weight.device
        dtype = dtype or self.head.weight.dtype
        c = self.config
        blocks = [b.mixer.empty_state(batch, device, dtype) for b in self.blocks_in_order()]
        zeros = [torch.zeros(batch, c.pool[s], c.width(s), device=device, dtype=dtype) for s in range(len(c.pool))]
        return UNetState(blocks, zeros, [z.clone() for z in zeros], 0)

    def _conditioning(self, label: Tensor | int | None, batch: int, device) -> list[Tensor] | None:
        if self.cond is None:
            if label is not None and not (isinstance(label, int) and label < 0) and not (
                    isinstance(label, Tensor) and bool((label < 0).all())):
                raise ValueError("this model is unconditional (n_classes=0); it takes no label")
            return None
        n = self.config.n_classes
        if label is None:
            label = -1
        label = torch.as_tensor(label, device=device).long()
        if label.dim() == 0:
            label = label.expand(batch)
        if label.shape != (batch,):
            raise ValueError(f"label must be one int or (batch={batch},) ints, got shape {tuple(label.shape)}")
        if bool((label >= n).any()):
            raise ValueError(f"label out of range: this model knows classes 0..{n - 1} (and -1: none)")
        idx = torch.where(label < 0, torch.full_like(label, n), label)
        return [emb(idx) for emb in self.cond]

    # ---- parallel -----------------------------------------------------------------------------------------
    def forward(self, tokens: Tensor, label: Tensor | int | None = None, state: UNetState | None = None,
                return_state: bool = False) -> AudioOutput:
        """tokens: (B, L) µ-law ids -> logits (B, L, vocab); logits[:, t] predict the sample after tokens[:, t].

        Any L works: the input is padded to a multiple of the total pooling P (16 by default) at the end and
        the padding's outputs dropped (it is causal). A ``state`` must sit at a multiple of P, and with
        ``return_state`` L must be one too (use ``step`` for the samples in between)."""
        c = self.config
        B, L = tokens.shape
        P = c.total_pool
        stateful = state is not None or return_state
        if (return_state and L % P) or (state is not None and state.t % P):
            raise ValueError(f"AudioUNet: a chunk read with a state must start (and, to return the state, end) on a "
                             f"multiple of the total pooling {P} (got L={L}, state at t={state.t if state else 0}); "
                             "use step() for the samples in between")
        pad = (-L) % P
        if pad:
            tokens = F.pad(tokens, (0, pad))
        cond = self._conditioning(label, B, tokens.device)
        blocks = self.blocks_in_order()
        old = state.blocks if state is not None else [None] * len(blocks)
        new: list = [None] * len(blocks)
        d_off, c_off, u_off = self._block_offsets()

        def run(i: int, x: Tensor) -> Tensor:
            if stateful:
                x, new[i] = blocks[i](x, state=old[i], return_state=True)
                return x
            return blocks[i](x)

        S = len(c.pool)
        x = self.embedding(tokens)
        if cond is not None:
            x = x + cond[0][:, None]
        skips = []
        for s in range(S):
            for j in range(len(self.down[s])):
                x = run(d_off[s] + j, x)
            skips.append(x)
            x = self.down_pool[s](x)
            if cond is not None:
                x = x + cond[s + 1][:, None]
        for j in range(len(self.center)):
            x = run(c_off + j, x)
        pending = [None] * S
        for s in reversed(range(S)):
            x, pending[s] = self.up_pool[s](x, state.pending[s] if state is not None else None)
            x = x + skips[s]
            for j in range(len(self.up[s])):
                x = run(u_off[s] + j, x)
        logits = self.head(self.norm_f(x.to(self.norm_f.weight.dtype)))
        if pad:
            logits = logits[:, :L]
        new_state = None
        if return_state:
            empty = self.empty_state(B, tokens.device, self.head.weight.dtype)
            new_state = UNetState(new, empty.buffers, pending, (state.t if state is not None else 0) + L)
        return AudioOutput(logits, new_state)

    # ---- recurrent ----------------------------------------------------------------------------------------
    def step(self, token: Tensor, state: UNetState, label: Tensor | int | None = None,
             cond: list[Tensor] | None = None) -> tuple[Tensor, UNetState]:
        """One sample: token (B,) -> logits (B, vocab) for the next sample, and the new state.

        Equal to ``forward`` on the whole sequence (the same logits up to float rounding). ``cond``: the
        precomputed ``conditioning(label)`` (saves recomputing it every sample)."""
        B = token.shape[0]
        if cond is None:
            cond = self._conditioning(label, B, token.device)
        new = UNetState(list(state.blocks), list(state.buffers), list(state.pending), state.t + 1)
        x = self.embedding(token)
        if cond is not None:
            x = x + cond[0]
        x = self._step_level(0, x, state.t, new, cond)
        return self.head(self.norm_f(x.to(self.norm_f.weight.dtype))), new

    def conditioning(self, label: Tensor | int | None, batch: int) -> list[Tensor] | None:
        return self._conditioning(label, batch, self.head.weight.device)

    def _run_block(self, i: int, block: Block, x: Tensor, st: UNetState) -> Tensor:
        y, st.blocks[i] = block(x[:, None], state=st.blocks[i], return_state=True)
        return y[:, 0]

    def _step_level(self, s: int, x: Tensor, n: int, st: UNetState, cond) -> Tensor:
        """Level s consumes its n-th input x (B, width(s)) and returns its output for that position."""
        c = self.config
        d_off, c_off, u_off = self._block_offsets()
        if s == len(c.pool):
            for j, blk in enumerate(self.center):
                x = self._run_block(c_off + j, blk, x, st)
            return x
        for j, blk in enumerate(self.down[s]):
            x = self._run_block(d_off[s] + j, blk, x, st)
        skip = x
        p = c.pool[s]
        k = n % p
        coarse_in = st.pending[s][:, k]  # computed from the previous group: causal
        buf = st.buffers[s].clone()
        buf[:, k] = x
        st.buffers[s] = buf
        if k == p - 1:  # group complete: one step of the coarser levels
            y = self.down_pool[s].linear(buf.flatten(1))
            if cond is not None:
                y = y + cond[s + 1]
            y = self._step_level(s + 1, y, n // p, st, cond)
            st.pending[s] = self.up_pool[s].frames(y)
        x = coarse_in + skip
        for j, blk in enumerate(self.up[s]):
            x = self._run_block(u_off[s] + j, blk, x, st)
        return x

    # ---- checkpoints --------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """config.json + model.safetensors, each written atomically."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(d / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        text = json.dumps({"model_type": "hiss-audio-unet", **self.config.to_dict()}, indent=2)
        atomic_write(d / "config.json", lambda tmp: Path(tmp).write_text(text))
        return d

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device=None) -> AudioUNet:
        from safetensors.torch import load_file

        d = Path(directory)
        cfg_path = d / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{d}: no config.json (not a save_pretrained checkpoint directory)")
        cfg = json.loads(cfg_path.read_text())
        if cfg.pop("model_type", None) != "hiss-audio-unet":
            raise ValueError(f"{cfg_path}: not an apps.audio U-Net checkpoint (model_type is not hiss-audio-unet)")
        model = cls(UNetConfig.from_dict(cfg))
        weights = d / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: missing")
        model.load_state_dict(load_file(str(weights), device="cpu"))
        return model.to(device) if device is not None else model

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---- training -------------------------------------------------------------------------------------------------
LN2 = math.log(2)


class AudioLM(pl.LightningModule):
    """Next-sample training of an ``AudioUNet`` (cross-entropy over the 256 µ-law classes, in nats/sample).

    Batches: ``{"input_ids": (B, L), "labels": (B, L) (-100: not scored), "label": (B,) class or -1}``.
    chunk_len: read each batch in pieces of this many samples (a multiple of the total pooling) with the state
    carried across and each piece recomputed in backward (ssm_core.chunked_lm_loss): exact gradients at
    lengths one forward could not hold. cond_drop: for a conditional model, the fraction of training clips
    shown without their label, so one model also generates unconditionally.
    """

    def __init__(self, config: UNetConfig | None = None, lr: float = 2e-3, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 50, min_lr_ratio: float = 0.1,
                 chunk_len: int | None = None, cond_drop: float = 0.2):
        super().__init__()
        config = config or UNetConfig()
        if chunk_len is not None and chunk_len % config.total_pool:
            raise ValueError(f"AudioLM: chunk_len={chunk_len} must be a multiple of the total pooling "
                             f"{config.total_pool}")
        self.save_hyperparameters()
        self.model = AudioUNet(config)

    def forward(self, tokens: Tensor, **kwargs) -> AudioOutput:
        return self.model(tokens, **kwargs)

    def nll(self, batch: dict, train: bool = False) -> tuple[Tensor, int]:
        """(mean nats per scored sample, number scored)."""
        ids, labels = batch["input_ids"], batch["labels"]
        label = batch.get("label") if self.model.cond is not None else None
        if label is not None and train and self.hparams.cond_drop > 0:
            drop = torch.rand(label.shape, device=label.device) < self.hparams.cond_drop
            label = label.masked_fill(drop, -1)
        chunk = self.hparams.chunk_len
        if chunk and ids.shape[1] > chunk:
            def piece(x, **kw):
                return self.model(x, label=label, **kw)
            out = chunked_lm_loss(piece, ids, labels, chunk, recompute=torch.is_grad_enabled())
            return out.loss, out.n_tokens
        logits = self.model(ids, label=label).logits.float()
        n = int((labels != -100).sum())
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100), n

    def training_step(self, batch, batch_idx):
        loss, _ = self.nll(batch, train=True)
        self.log("train/nats_per_sample", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss, n = self.nll(batch)
        self.log("val/nats_per_sample", loss, prog_bar=True, batch_size=n)
        self.log("val/bits_per_sample", loss / LN2, batch_size=n)
        return loss

    def test_step(self, batch, batch_idx):
        loss, n = self.nll(batch)
        self.log("test/nats_per_sample", loss, batch_size=n)
        self.log("test/bits_per_sample", loss / LN2, batch_size=n)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_warmup_cosine(self, self.model, lr=hp.lr, weight_decay=hp.weight_decay, betas=hp.betas,
                                   warmup_steps=hp.warmup_steps, min_lr_ratio=hp.min_lr_ratio)
