"""DNA networks on ssm_core and the LightningModules that train them.

* ``DNALM``: the causal next-base language model, apps.common.CausalLMModule with bits per base as its metric.
  The network predicts a softmax over the whole 12-token vocabulary (HyenaDNA ids, apps.genomics.data) and the
  data module ignores every target that is not A/C/G/T, so ``bits_per_base`` is the mean of -log2 p(next base)
  over real bases, with p normalised over all 12 tokens; 2.0 is what a uniform guess over A/C/G/T scores.
* ``DNAModel``: a backbone + one head (masked LM, sequence or per-base classification), trained by
  ``MaskedLMModule`` (masked-LM pretraining) and ``DNAClassifier`` (apps.common.ClassifierModule fine-tuning).
  Backbones: BiMamba, a reverse-complement-equivariant Caduceus-PS style variant, a same-size non-causal
  Transformer baseline. What is not DNA-specific (pooling, head.json, the classifier module) is apps.common's.

Backbone kinds (``backbone=``):

* ``"mamba"``       causal Mamba (what the next-base LM, model.DNALM, uses)
* ``"bimamba"``     ``MambaConfig(bidirectional=True)``: every mixer reads the sequence both ways (weights tied)
* ``"rcps"``        Caduceus-PS: BiMamba with reverse-complement (RC) parameter sharing, exactly RC-equivariant
* ``"transformer"`` ``apps.common.transformer_like`` (parameter-matched) with non-causal attention

RC parameter sharing (Schiff et al. 2024, "Caduceus"). Hidden states have 2*d channels: the first d
describe the forward strand, the last d the reverse strand *stored reversed in length and channels*, so the
RC of a hidden state is ``flip(h, dims=(L, channels))`` and every layer commutes with it:

* embedding:  h = [E(x), flip_LC(E(rc(x)))]
* any layer f: RCPS(f)(h) = [f(h1), flip_LC(f(flip_LC(h2)))]   (the same weights on both strands)
* LM head:    logits[t, v] = W[v] h1[t] + W[comp(v)] flip_C(h2)[t]   so logits(rc x) = rc(logits(x))

RCPS(f) o RCPS(g) = RCPS(f o g), so the per-layer wrappers of Caduceus collapse into one wrap of the whole
trunk (blocks + final norm): we run the shared trunk once over both strands stacked along the batch.
Per-base features for heads are ``g = (h1 + flip_C(h2)) / 2``, which satisfy g(rc x) = flip_L(g(x)): per-base
outputs are RC-equivariant and mean/max-pooled outputs RC-invariant.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from apps.common import CausalLMModule, ClassifierModule, HeadConfig, pool, pooled_width, transformer_like
from apps.common.baselines import count_parameters
from apps.common.checkpoint import is_classifier_dir
from apps.common.classify import WEIGHTS, read_head_config, save_head_checkpoint
from apps.common.optim import adamw_warmup_cosine
from apps.common.paths import resolve_checkpoint
from apps.genomics.data import A_ID, MASK_ID, N_ID, PAD_ID, T_ID, VOCAB_SIZE, reverse_complement_ids
from ssm_core import MambaConfig, MixerModel, read_safetensors
from ssm_core.modules.bidirectional import reverse_padded

__all__ = [
    "SHIPPED_LM", "default_lm",
    "DNALM", "small_config", "BACKBONES", "DNABackbone", "DNAModel", "DNAClassifier", "MaskedLMModule",
    "backbone_config", "check_head", "complement_map", "rc_ids", "mask_tokens", "load_backbone_weights",
]

# The shipped causal DNA LM (multi-genome bacteria; apps/genomics/configs/pretrain_bacteria.yaml, docs/genomics.md)
SHIPPED_LM = Path(__file__).resolve().parent / "assets" / "dna_bacteria"
HOW_TO_TRAIN = "Train one with `python -m apps.genomics.train` (or pass --ckpt DIR)."


def default_lm(ckpt: str | os.PathLike | None = None) -> Path:
    """The language model a command uses: ``ckpt`` when named (the loader says what is wrong with it), else
    ``runs/genomics/pretrained`` (the user's own ``python -m apps.genomics.train``), else the shipped model."""
    return Path(ckpt) if ckpt else resolve_checkpoint("genomics", None, SHIPPED_LM, HOW_TO_TRAIN)


BACKBONES = ("mamba", "bimamba", "rcps", "transformer")
LN2 = math.log(2)


def small_config(d_model: int = 128, n_layer: int = 4, layer: str = "Mamba1") -> MambaConfig:
    """The default model: 4 Mamba-1 blocks of width 128 (469k parameters), the 12-token DNA vocabulary."""
    return MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB_SIZE, ssm_cfg={"layer": layer})


class DNALM(CausalLMModule):
    """Next-base language model on ssm_core. ``config`` defaults to ``small_config()``; ``chunk_len`` reads
    long windows in pieces with exact gradients (ssm_core.chunked_lm_loss), see configs/long_1m.yaml."""

    unit = "base"

    def __init__(self, config: MambaConfig | None = None, lr: float = 2e-3, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 50, min_lr_ratio: float = 0.1,
                 chunk_len: int | None = None, detach_state: bool = False):
        config = config or small_config()
        if config.vocab_size < VOCAB_SIZE:
            raise ValueError(f"DNALM: config.vocab_size must be at least {VOCAB_SIZE} (the DNA tokenizer's), "
                             f"got {config.vocab_size}")
        super().__init__(config, lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                         min_lr_ratio=min_lr_ratio, chunk_len=chunk_len, detach_state=detach_state,
                         vocab_size=VOCAB_SIZE)


def complement_map(size: int = VOCAB_SIZE) -> Tensor:
    """(size,) long: the id of each token's complement (A<->T, C<->G; N, specials and padding ids fixed)."""
    comp = torch.arange(size)
    comp[:VOCAB_SIZE] = reverse_complement_ids(torch.arange(VOCAB_SIZE)).flip(0)
    return comp


def rc_ids(ids: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Reverse complement of token ids (batch, L), each row within its first ``lengths[b]`` positions."""
    comp = complement_map().to(ids.device)[ids]
    return reverse_padded(comp[..., None], lengths)[..., 0]


def _rc_hidden(h: Tensor, lengths: Tensor | None) -> Tensor:
    """RC of a half hidden state (batch, L, d): flip channels and (within lengths) positions."""
    return reverse_padded(h.flip(-1), lengths)


def check_head(head: HeadConfig) -> None:
    """The DNA-specific rules on a HeadConfig: a known backbone kind, and strand-symmetric pooling for rcps."""
    if head.backbone not in BACKBONES:
        raise ValueError(f"HeadConfig: backbone must be one of {BACKBONES}, got {head.backbone!r}")
    if head.backbone == "rcps" and head.task == "sequence" and head.pooling in ("first", "cls", "last", "center"):
        # g[0] of rc(x) is g[L-1] of x: an end position (or the centre of an even length) is not strand-symmetric
        raise ValueError(f"HeadConfig: pooling {head.pooling!r} is not RC-invariant; use 'mean' or 'max' "
                         "with the rcps backbone")


def backbone_config(config: MambaConfig, kind: str) -> MambaConfig:
    """The ssm_core config a backbone kind runs: ``config`` describes the Mamba size; the Transformer gets a
    parameter-matched all-attention config with non-causal attention."""
    if kind not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {kind!r}")
    if kind == "mamba":
        return replace(config, bidirectional=False)
    if kind in ("bimamba", "rcps"):
        return replace(config, bidirectional=True)
    return MambaConfig.from_json(_matched_transformer(replace(config, bidirectional=False).to_json()))


@functools.lru_cache(maxsize=32)
def _matched_transformer(config_json: str) -> str:
    """Non-causal transformer_like config (as JSON: cacheable) with about the Mamba's parameter count.
    GatedMLP widths come in steps of 128, too coarse at small d_model: when the same depth misses the count by
    more than 5%, take the depth that comes closest."""
    base = MambaConfig.from_json(config_json)
    target = count_parameters(base)
    t = transformer_like(base)
    if abs(count_parameters(t) - target) > 0.05 * target:
        options = [transformer_like(base, n_layer=n) for n in range(1, 2 * base.n_layer + 1)]
        t = min(options, key=lambda c: abs(count_parameters(c) - target))
    return replace(t, attn_cfg={**t.attn_cfg, "causal": False}).to_json()


def _is_causal(config: MambaConfig) -> bool:
    return not config.bidirectional and (not config.attn_layer_idx or config.attn_cfg.get("causal", True))


class DNABackbone(nn.Module):
    """ssm_core's MixerModel (embedding -> blocks -> final norm), optionally RC-parameter-shared.

    ``forward(ids, lengths)``: ids (batch, L) -> per-base features (batch, L, d_model), position-aligned.
    ``hidden(ids, lengths)``: (batch, L, d_model), or (batch, L, 2*d_model) in the Caduceus layout when RC.
    ``lengths`` (batch,) marks right-padded rows; positions past a row's length are ignored by pooling.
    """

    def __init__(self, config: MambaConfig, rc_equivariant: bool = False):
        super().__init__()
        self.config, self.rc_equivariant = config, rc_equivariant
        self.core = MixerModel(config)
        self.causal = _is_causal(config)
        if rc_equivariant and self.causal:
            raise ValueError("the RC-equivariant backbone reads both strands; use a bidirectional config")
        self.register_buffer("complement", complement_map(config.padded_vocab_size), persistent=False)

    @property
    def d_model(self) -> int:
        return self.config.d_model

    def _trunk(self, x: Tensor, lengths: Tensor | None) -> Tensor:
        """Blocks + final norm on embeddings x: (batch, L, d) -> (batch, L, d)."""
        kwargs = {}
        if lengths is not None:
            if self.config.attn_layer_idx:  # MHA has no key padding mask: refuse silently-wrong padding
                if bool((lengths != x.shape[1]).any()):
                    raise ValueError("the attention backbone has no padding mask; give equal-length sequences")
            elif self.config.bidirectional:  # the reverse direction must start at each row's own end
                kwargs["lengths"] = lengths
        return self.core(inputs_embeds=x, **kwargs)

    def hidden(self, input_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        emb = self.core.embedding
        if not self.rc_equivariant:
            return self._trunk(emb(input_ids), lengths)
        # RCPS embedding + RCPS(trunk): both strands through the shared trunk in one batched pass
        B = input_ids.shape[0]
        both = torch.cat([input_ids, rc_ids(input_ids, lengths)], 0)
        lens2 = None if lengths is None else lengths.repeat(2)
        h = self._trunk(emb(both), lens2)
        return torch.cat([h[:B], _rc_hidden(h[B:], lengths)], -1)

    def merge_strands(self, h: Tensor) -> Tensor:
        """Caduceus layout (batch, L, 2d) -> position-aligned strand-averaged features (batch, L, d)."""
        d = h.shape[-1] // 2
        return (h[..., :d] + h[..., d:].flip(-1)) / 2

    def forward(self, input_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        h = self.hidden(input_ids, lengths)
        return self.merge_strands(h) if self.rc_equivariant else h


class DNAModel(nn.Module):
    """Backbone + one head. ``model(ids, lengths)`` returns logits: mlm (batch, L, padded_vocab),
    sequence (batch, num_labels), token (batch, L, num_labels).

    ``config`` is the backbone's own ssm_core config (see ``backbone_config``). Checkpoints:
    ``save_pretrained(dir)`` writes config.json + head.json + model.safetensors; ``DNAModel.from_pretrained``.
    """

    def __init__(self, config: MambaConfig, head: HeadConfig):
        super().__init__()
        check_head(head)
        self.config, self.head_config = config, head
        self.backbone = DNABackbone(config, rc_equivariant=head.backbone == "rcps")
        d = config.d_model
        self.dropout = nn.Dropout(head.dropout)
        if head.task == "mlm":
            self.head = nn.Linear(d, config.padded_vocab_size, bias=False)
            if config.tie_embeddings:
                self.head.weight = self.backbone.core.embedding.weight
        else:
            self.head = nn.Linear(d if head.task == "token" else pooled_width(head, d), head.num_labels)

    @property
    def rc_equivariant(self) -> bool:
        return self.backbone.rc_equivariant

    def forward(self, input_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        task = self.head_config.task
        if task == "mlm":
            h = self.backbone.hidden(input_ids, lengths)
            if not self.rc_equivariant:
                return self.head(h)
            d = h.shape[-1] // 2  # RCPS LM head: reverse-strand logits through complemented rows of W
            w = self.head.weight
            return F.linear(h[..., :d], w) + F.linear(h[..., d:].flip(-1), w[self.backbone.complement])
        feats = self.dropout(self.backbone(input_ids, lengths))
        if task == "token":
            return self.head(feats)
        return self.head(pool(feats, lengths, self.head_config.pooling, self.head_config.center_window))

    # --- checkpoints ---------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        state = self.state_dict()
        if self.head_config.task == "mlm" and self.config.tie_embeddings:
            state.pop("head.weight", None)
        save_head_checkpoint(save_directory, state, self.config.to_json(), self.head_config)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str = "cpu") -> DNAModel:
        from safetensors.torch import load_file

        path = Path(path)
        if not is_classifier_dir(path):  # a Caduceus (Hugging Face) folder: apps.genomics.caduceus converts it
            from apps.genomics.caduceus import is_caduceus_dir, load_caduceus

            if is_caduceus_dir(path):
                return load_caduceus(path, map_location)
        head = read_head_config(path)
        model = cls(MambaConfig.load(path / "config.json"), head)
        state = load_file(str(path / WEIGHTS), device=map_location)
        if head.task == "mlm" and model.config.tie_embeddings:
            state["head.weight"] = state["backbone.core.embedding.weight"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path / WEIGHTS}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        return model.eval()


def load_backbone_weights(backbone: DNABackbone, path: str | os.PathLike) -> int:
    """Initialise ``backbone`` from a save_pretrained directory: a causal MambaLMHeadModel (e.g. the pretrained
    DNALM; its causal mixers become the tied forward/backward mixers of a bidirectional backbone) or a
    DNAModel, or a Caduceus folder (apps.genomics.caduceus). Returns the number of tensors copied; a shape
    mismatch or a backbone key left unset raises."""
    from apps.genomics.caduceus import is_caduceus_dir, load_caduceus_backbone

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder (init_from takes a save_pretrained directory)")
    if is_caduceus_dir(path):
        return load_caduceus_backbone(backbone, path)
    src = read_safetensors(path / WEIGHTS, kind="checkpoint")  # a missing or corrupt file is named
    prefix = "backbone.core." if is_classifier_dir(path) else "backbone."
    src_cfg = MambaConfig.load(path / "config.json")
    mapped = {}
    for k, v in src.items():
        if not k.startswith(prefix):
            continue
        k = k[len(prefix):]
        if backbone.config.bidirectional and not src_cfg.bidirectional and ".mixer." in k:
            k = k.replace(".mixer.", ".mixer.mixer.", 1)
        mapped[k] = v
    own = backbone.core.state_dict()
    bad = [k for k, v in mapped.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in mapped]
    if bad or missing:
        raise ValueError(f"{path}: cannot initialise this backbone from it: shape mismatch {bad[:5]}, "
                         f"missing {missing[:5]} (sizes must match: d_model, n_layer, ssm_cfg)")
    backbone.core.load_state_dict({k: mapped[k] for k in own})
    return len(own)


def mask_tokens(ids: Tensor, mask_prob: float = 0.15, generator: torch.Generator | None = None,
                lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """BERT masking of the base positions (A, C, G, T, N; never specials or padding).

    ids (batch, L) -> (inputs, labels): of the chosen ``mask_prob`` positions 80% become [MASK], 10% a random
    base, 10% stay; labels hold the original id there and -100 elsewhere. At least one position per row.
    """
    B, L = ids.shape
    maskable = (ids >= A_ID) & (ids <= N_ID)
    if lengths is not None:
        maskable &= torch.arange(L, device=ids.device)[None] < lengths[:, None]
    u = torch.rand(B, L, generator=generator, device=ids.device)
    chosen = maskable & (u < mask_prob)
    # rows that drew nothing get their lowest-u maskable position: every row contributes to the loss
    first = u.masked_fill(~maskable, 2.0).argmin(1)
    empty = ~chosen.any(1) & maskable.any(1)
    chosen[empty, first[empty]] = True
    labels = ids.masked_fill(~chosen, -100)
    r = torch.rand(B, L, generator=generator, device=ids.device)
    inputs = ids.clone()
    inputs[chosen & (r < 0.8)] = MASK_ID
    rand = chosen & (r >= 0.8) & (r < 0.9)
    inputs[rand] = torch.randint(A_ID, T_ID + 1, (int(rand.sum()),), generator=generator, device=ids.device)
    return inputs, labels


def _lengths(batch: dict) -> Tensor | None:
    if "lengths" in batch:
        return batch["lengths"]
    ids = batch["input_ids"]
    if bool((ids == PAD_ID).any()):
        return (ids != PAD_ID).sum(1)
    return None


class MaskedLMModule(pl.LightningModule):
    """Masked-LM pretraining of a bidirectional backbone ("bimamba" or "rcps"). Batches are dicts with
    ``input_ids`` (batch, L) (other keys, e.g. causal ``labels``, are ignored); masking happens here.
    Logs bits per masked base."""

    def __init__(self, config: MambaConfig, backbone: str = "bimamba", mask_prob: float = 0.15, lr: float = 2e-3,
                 weight_decay: float = 0.1, warmup_steps: int = 50, min_lr_ratio: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        if backbone not in ("bimamba", "rcps", "transformer"):
            raise ValueError(f"masked LM needs a bidirectional backbone (bimamba, rcps, transformer), got {backbone!r}")
        self.model = DNAModel(backbone_config(config, backbone), HeadConfig(task="mlm", backbone=backbone))

    def mlm_loss(self, batch: dict) -> tuple[Tensor, int]:
        ids, lengths = batch["input_ids"], _lengths(batch)
        inputs, labels = mask_tokens(ids, self.hparams.mask_prob, lengths=lengths)
        logits = self.model(inputs, lengths)[..., :VOCAB_SIZE]
        n = int((labels != -100).sum())
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100), n

    def training_step(self, batch, batch_idx):
        loss, _ = self.mlm_loss(batch)
        self.log("train/mlm_bits_per_base", loss / LN2, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss, n = self.mlm_loss(batch)
        self.log("val/mlm_bits_per_base", loss / LN2, prog_bar=True, batch_size=n)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_warmup_cosine(self, self.model, hp.lr, hp.weight_decay, (0.9, 0.95), hp.warmup_steps,
                                   hp.min_lr_ratio)


class DNAClassifier(ClassifierModule):
    """apps.common.ClassifierModule handed a DNAModel built from these arguments (what the finetune YAML names).

    config: the Mamba size (YAML ``model.config``); ``backbone`` picks the kind (the Transformer is built
    parameter-matched from the same config). ``init_from``: a save_pretrained directory whose backbone
    weights start the run. Batches: ``input_ids`` (batch, L), ``labels`` (batch,) for task "sequence" or
    (batch, L) with -100 ignored for task "token", optional ``lengths`` (batch,).
    """

    def __init__(self, config: MambaConfig, num_labels: int, backbone: str = "bimamba", task: str = "sequence",
                 pooling: str = "mean", labels: list[str] | None = None, dropout: float = 0.1, lr: float = 2e-3,
                 weight_decay: float = 0.1, warmup_steps: int = 50, min_lr_ratio: float = 0.1,
                 init_from: str | None = None, center_window: int = 0):
        head = HeadConfig(task=task, num_labels=num_labels, pooling=pooling, backbone=backbone,
                          labels=list(labels or []), dropout=dropout, center_window=center_window)
        net = DNAModel(backbone_config(config, backbone), head)
        if init_from:
            n = load_backbone_weights(net.backbone, init_from)
            print(f"backbone initialised from {init_from} ({n} tensors)")
        super().__init__(net, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)
        self.save_hyperparameters()  # this class's arguments rebuild it from a .ckpt
