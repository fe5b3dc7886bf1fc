"""Caduceus checkpoints (kuleshov-group, Hugging Face layout) -> hiss DNA models.

    python -m apps.genomics.caduceus DIR                 # what DIR holds, as hiss sees it, and the finetune flags
    python -m apps.genomics.caduceus DIR --out OUT       # convert once to a hiss save_pretrained folder

``load_caduceus(DIR)`` reads a local folder written by ``CaduceusForMaskedLM.save_pretrained`` (or the base
``Caduceus`` model): ``config.json`` (``model_type: "caduceus"``: ``d_model``, ``n_layer``, ``ssm_cfg``,
``bidirectional``, ``bidirectional_strategy``, ``bidirectional_weight_tie``, ``rcps``, ``complement_map``,
``rms_norm``, ``fused_add_norm``, ``norm_epsilon``, ``pad_vocab_size_multiple``, ...) and ``model.safetensors``
(sharded safetensors, or ``pytorch_model.bin`` through ``torch.load(weights_only=True)``; never a full unpickle)
and returns a ``DNAModel`` with a masked-LM head: backbone ``"rcps"`` for Caduceus-PS (``rcps: true``),
``"bimamba"`` for a bidirectional Caduceus, ``"mamba"`` for a one-way one. Nothing is downloaded.
``apps.genomics.predict.load_model``, ``DNAModel.from_pretrained`` and ``--model.init_from`` accept such folders.

How Caduceus maps onto our modules (read from its modeling_caduceus.py / modeling_rcps.py; our own code):

* Mixer: ``BiMambaWrapper`` = ``mamba_fwd(x) + flip_L(mamba_rev(flip_L(x)))`` ("add"). Caduceus's
  ``bidirectional_weight_tie`` ties only ``in_proj`` and ``out_proj``; conv1d, x_proj, dt_proj, A_log and D of
  the reverse Mamba are its own. Our ``Bidirectional`` either ties everything or nothing, so a Caduceus mixer
  loads as an untied ``Bidirectional`` (``bidirectional_weight_tie=False``) whose reverse in/out projections
  are copies: the same function, exactly; fine-tuning then updates the two copies separately.
  ``"ew_multiply"`` (fwd * rev) is refused: our Bidirectional merges by add, mean or concat.
* Caduceus-PS: RCPSEmbedding ``[E(x), flip_LC E(rc x)]``, per-layer RCPS wrappers, RCPS final norm and
  ``RCPSLMHead`` ``W h1 + W[comp] flip_C(h2)`` are exactly our ``backbone="rcps"`` layout (apps.genomics.model).
* ``fused_add_norm: true`` with ``rcps: true`` (the published Caduceus-PS checkpoints): Caduceus's fused branch of
  ``RCPSMambaBlock`` feeds the *second* half of the hidden state to the forward path and the first half to the
  RC path, so the two strand halves trade places at every block (still RC-equivariant; the unfused branch does
  not do this). With ``F = flip(L, C)`` and ``g`` one block, each strand stream runs ``u <- g(F(u))``. We fold
  ``F`` into the weights instead of flipping activations: ``F g F`` is the same block with the norm weight
  reversed, in_proj's input columns and out_proj's output rows reversed, and ``mamba_fwd`` / ``mamba_rev``
  exchanged. Layers ``i`` with ``n_layer - i`` even get that conjugated copy; with an odd ``n_layer`` the
  embedding becomes ``E'[v] = flip_C(E[comp v])`` (so the LM head is stored untied). Same function, exactly.
* Tokens: the published checkpoints use HyenaDNA's ids, which are ours (``[CLS]=0 [SEP]=1 [BOS]=2 [MASK]=3
  [PAD]=4 [RESERVED]=5 [UNK]=6 A=7 C=8 G=9 T=10 N=11``; complement_map 7<->10, 8<->9). The later 15-token
  tokenizer of the Caduceus repository (``[CLS]=0 [EOS]=1 [SEP]=2 [REF]=3 [MUT]=4 [BOS]=5 [MASK]=6 [PAD]=7
  [RESERVED]=8 [UNK]=9 A=10 .. N=14``) is recognised by its complement_map and its rows are re-ordered to our
  ids ([EOS], [REF], [MUT] have no id of ours and are dropped). Any other complement_map is refused.

Refused, each with a message naming the config field: ``bidirectional_strategy`` other than "add",
``rcps`` without ``bidirectional``, ``ssm_cfg`` keys our Mamba-1 does not take, an unknown ``complement_map``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from apps.common import HeadConfig
from apps.common.checkpoint import is_classifier_dir
from apps.common.errors import run_cli
from apps.genomics.data import VOCAB_SIZE
from apps.genomics.model import DNABackbone, DNAModel
from ssm_core import MambaConfig
from ssm_core.io import read_json_object
from ssm_core.models.checkpoint import load_weights

__all__ = ["is_caduceus_dir", "read_caduceus_config", "CaduceusLayout", "caduceus_layout", "load_caduceus",
           "load_caduceus_backbone", "finetune_flags", "main"]

CONFIG = "config.json"
# CaduceusConfig's defaults, used where config.json leaves a field out
DEFAULTS = {"bidirectional": True, "bidirectional_strategy": "add", "bidirectional_weight_tie": True, "rcps": False,
            "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
            "norm_epsilon": 1e-5, "tie_word_embeddings": True}
# our token id -> the checkpoint's id, for each tokenizer layout we recognise
TOKEN_LAYOUTS = {
    "hyenadna": list(range(VOCAB_SIZE)),  # ours: identity
    "caduceus-15": [0, 2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],  # CLS SEP BOS MASK PAD RESERVED UNK A C G T N
}
_BASES_AT = {"hyenadna": 7, "caduceus-15": 10}  # id of A; A, C, G, T follow
# classification heads of CaduceusForSequenceClassification: not part of a backbone or a masked LM
IGNORED_PREFIXES = ("score.",)


def _raw_config(path: Path) -> dict | None:
    try:
        raw = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def is_caduceus_dir(path: str | os.PathLike) -> bool:
    """A folder whose config.json is a Caduceus one (``model_type: "caduceus"``, or Caduceus's own ``rcps``
    field without a model_type) and that is not a hiss classifier folder (head.json)."""
    path = Path(path)
    if not path.is_dir() or is_classifier_dir(path):
        return False
    raw = _raw_config(path)
    if raw is None:
        return False
    if "model_type" in raw:
        return raw["model_type"] == "caduceus"
    return "rcps" in raw and "d_model" in raw


def read_caduceus_config(path: str | os.PathLike) -> dict:
    """config.json of a Caduceus folder, as a dict (errors name the file)."""
    return read_json_object(Path(path) / CONFIG, "Caduceus folders are read locally, nothing is downloaded")


def _flag(raw: dict, name: str, where: str) -> bool:
    """A boolean field; configs written by hand sometimes hold "true" strings (even "true,")."""
    v = raw.get(name, DEFAULTS[name])
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip(" ,").lower() in ("true", "false"):
        return v.strip(" ,").lower() == "true"
    raise ValueError(f"{where}: {name} must be true or false, got {v!r}")


def _token_layout(raw: dict, path: Path, where: str) -> str:
    """Which tokenizer's ids the checkpoint uses, from complement_map (else tokenizer_config.json)."""
    cmap = raw.get("complement_map")
    if cmap:
        try:
            comp = {int(k): int(v) for k, v in cmap.items()}
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"{where}: complement_map must map token ids to token ids, got {cmap!r}") from None
        moved = sorted(k for k, v in comp.items() if k != v)
        for name, a in _BASES_AT.items():  # A<->T, C<->G and every other id fixed
            if moved == [a, a + 1, a + 2, a + 3] and comp[a] == a + 3 and comp[a + 1] == a + 2:
                return name
        raise ValueError(f"{where}: complement_map {cmap} matches no tokenizer hiss knows (HyenaDNA's ids: "
                         "A=7 C=8 G=9 T=10; Caduceus's 15-token ids: A=10 .. T=13); cannot map its token ids")
    tok_file = path / "tokenizer_config.json"
    if tok_file.is_file():
        try:
            tok = json.loads(tok_file.read_text())
        except ValueError:
            tok = None
        added = tok.get("added_tokens_decoder") if isinstance(tok, dict) else None
        added = added if isinstance(added, dict) else {}
        mask = [k for k, v in added.items() if isinstance(v, dict) and v.get("content") == "[MASK]"]
        if mask == ["3"]:
            return "hyenadna"
        if mask == ["6"]:
            return "caduceus-15"
    if raw.get("vocab_size") == VOCAB_SIZE:  # HyenaDNA's 12 ids, before padding
        return "hyenadna"
    raise ValueError(f"{where}: no complement_map (and no tokenizer_config.json saying where [MASK] is): cannot "
                     "tell which token ids the checkpoint uses; add the tokenizer's complement_map to config.json")


@dataclass(frozen=True)
class CaduceusLayout:
    """How a Caduceus checkpoint becomes a hiss DNAModel (see the module docstring)."""

    config: MambaConfig  # the hiss backbone config (DNAModel's)
    head: HeadConfig  # task "mlm", backbone "rcps" | "bimamba" | "mamba"
    rcps: bool
    fused_swap: bool  # fused RCPS blocks: strand halves trade places at every block (folded into the weights)
    tokens: str  # a TOKEN_LAYOUTS key
    complement: tuple[int, ...]  # the checkpoint's complement map over its own ids (empty if none)
    tied_head: bool  # Caduceus's LM head is its embedding matrix (tie_word_embeddings)
    tied_projections: bool  # bidirectional_weight_tie: mamba_rev shares in_proj / out_proj with mamba_fwd

    def conjugated(self, i: int) -> bool:
        """Layer i loads as F g F (norm, projections flipped; fwd/rev exchanged)."""
        return self.fused_swap and (self.config.n_layer - i) % 2 == 0

    @property
    def flipped_embedding(self) -> bool:
        return self.fused_swap and self.config.n_layer % 2 == 1


def caduceus_layout(raw: dict, path: str | os.PathLike = ".") -> CaduceusLayout:
    """Translate a Caduceus config.json (as a dict) into a hiss config + head; unsupported fields raise
    ValueError naming them."""
    path = Path(path)
    where = str(path / CONFIG)
    for name in ("d_model", "n_layer"):
        v = raw.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{where}: {name} must be a positive int, got {v!r}")
    bidirectional = _flag(raw, "bidirectional", where)
    rcps = _flag(raw, "rcps", where)
    strategy = raw.get("bidirectional_strategy", "add") or "add"  # Caduceus: None means "add"
    if bidirectional and strategy != "add":
        raise ValueError(f"{where}: bidirectional_strategy={strategy!r} is not supported: hiss's Bidirectional "
                         "merges the two directions by add, mean or concat, not an element-wise product "
                         "(only Caduceus's 'add' maps onto it exactly)")
    if rcps and not bidirectional:
        raise ValueError(f"{where}: rcps=true with bidirectional=false is not supported: hiss's RC-equivariant "
                         "backbone runs bidirectional mixers (every published Caduceus-PS is bidirectional)")
    fused = _flag(raw, "fused_add_norm", where)
    ssm = dict(raw.get("ssm_cfg") or {})
    if ssm.get("layer", "Mamba1") != "Mamba1":
        raise ValueError(f"{where}: ssm_cfg.layer={ssm['layer']!r}: Caduceus blocks are Mamba-1")
    ssm.pop("layer", None)
    tokens = _token_layout(raw, path, where)
    complement: tuple[int, ...] = ()
    if raw.get("complement_map"):
        comp = {int(k): int(v) for k, v in raw["complement_map"].items()}
        complement = tuple(comp.get(i, i) for i in range(max(comp) + 1))
    elif rcps:
        raise ValueError(f"{where}: rcps=true needs a complement_map (Caduceus-PS's RC embedding and LM head use it)")
    fused_swap = rcps and fused
    tied_head = _flag(raw, "tie_word_embeddings", where)
    tie_embeddings = tied_head and not (fused_swap and raw["n_layer"] % 2 == 1)
    pad_default = DEFAULTS["pad_vocab_size_multiple"]
    try:
        config = MambaConfig(
            d_model=raw["d_model"], n_layer=raw["n_layer"], vocab_size=VOCAB_SIZE, ssm_cfg={"layer": "Mamba1", **ssm},
            rms_norm=_flag(raw, "rms_norm", where), residual_in_fp32=_flag(raw, "residual_in_fp32", where),
            fused_add_norm=fused, pad_vocab_size_multiple=int(raw.get("pad_vocab_size_multiple") or pad_default),
            tie_embeddings=tie_embeddings, norm_epsilon=float(raw.get("norm_epsilon", DEFAULTS["norm_epsilon"])),
            bidirectional=bidirectional, bidirectional_strategy="add",
            # Caduceus ties only in_proj/out_proj: an untied Bidirectional holds that exactly (copies)
            bidirectional_weight_tie=not bidirectional)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: cannot be represented by hiss's Mamba-1 blocks: {e}") from e
    kind = "rcps" if rcps else "bimamba" if bidirectional else "mamba"
    return CaduceusLayout(config=config, head=HeadConfig(task="mlm", backbone=kind), rcps=rcps, fused_swap=fused_swap,
                          tokens=tokens, complement=complement, tied_head=tied_head,
                          tied_projections=bidirectional and _flag(raw, "bidirectional_weight_tie", where))


class _Weights:
    """The checkpoint's tensors by name (``caduceus.`` prefix dropped), tracking which were used."""

    def __init__(self, tensors: dict[str, Tensor], where: str):
        self.t = {k.removeprefix("caduceus."): v for k, v in tensors.items()}
        self.used: set[str] = set()
        self.where = where

    def get(self, *names: str) -> Tensor:
        """The first of ``names`` present; names after the first are tied copies (HF keeps one of a tied set
        when it saves safetensors, torch.save keeps all): when several are present they must agree."""
        present = [n for n in names if n in self.t]
        if not present:
            raise ValueError(f"{self.where}: no tensor {names[0]!r}"
                             f"{' (nor its tied copy ' + ', '.join(map(repr, names[1:])) + ')' if names[1:] else ''};"
                             " the weights do not match config.json (rcps, fused_add_norm, bidirectional?)")
        self.used.update(present)
        t = self.t[present[0]]
        for n in present[1:]:
            if self.t[n].shape != t.shape or not torch.equal(self.t[n], t):
                raise ValueError(f"{self.where}: {present[0]!r} and {n!r} should be the same tied tensor but differ; "
                                 "config.json's weight tying does not match the weights")
        return t

    def mark(self, name: str) -> Tensor | None:
        if name in self.t:
            self.used.add(name)
            return self.t[name]
        return None

    def unused(self) -> list[str]:
        return sorted(k for k in self.t if k not in self.used and not k.startswith(IGNORED_PREFIXES))


def _rows(lay: CaduceusLayout, table: Tensor, padded: int) -> Tensor:
    """The checkpoint's (vocab, d) embedding / LM-head rows re-ordered to our ids, padded to ``padded`` rows."""
    out = table.new_zeros(padded, table.shape[1])
    if lay.tokens == "hyenadna":
        n = min(padded, table.shape[0])
        out[:n] = table[:n]
    else:
        out[:VOCAB_SIZE] = table[TOKEN_LAYOUTS[lay.tokens]]
    return out


def _conjugate_mamba(suffix: str, t: Tensor) -> Tensor:
    """A Mamba-1 parameter of F_C m F_C (input and output channels reversed)."""
    if suffix == "in_proj.weight":
        return t.flip(1)
    if suffix in ("out_proj.weight", "out_proj.bias"):
        return t.flip(0)
    return t


def _state_dict(lay: CaduceusLayout, model: DNAModel, w: _Weights) -> dict[str, Tensor]:
    """Our DNAModel's state dict from the checkpoint's tensors (module docstring: the mapping)."""
    cfg = lay.config
    own = model.state_dict()
    wrap = "submodule." if lay.rcps and not cfg.fused_add_norm else ""  # RCPSAddNormWrapper(norm)
    emb_key = "backbone.embeddings.word_embeddings." + ("embedding.weight" if lay.rcps else "weight")
    head_key = "lm_head.lm_head.weight" if lay.rcps else "lm_head.weight"
    emb = w.get(emb_key, head_key) if lay.tied_head else w.get(emb_key)
    src_vocab = emb.shape[0]
    if src_vocab < max(TOKEN_LAYOUTS[lay.tokens]) + 1:
        raise ValueError(f"{w.where}: {emb_key} has {src_vocab} rows, fewer than the tokenizer's ids")
    for buf in ("backbone.embeddings.word_embeddings.complement_map", "lm_head.complement_map"):
        t = w.mark(buf)  # RCPS modules keep their complement map as a buffer: it must be config.json's
        if t is not None and lay.complement:
            expect = [lay.complement[i] if i < len(lay.complement) else i for i in range(len(t))]
            if t.tolist() != expect:
                raise ValueError(f"{w.where}: {buf} differs from config.json's complement_map")
    comp_src = torch.tensor([lay.complement[i] if i < len(lay.complement) else i for i in range(src_vocab)])
    padded = cfg.padded_vocab_size
    out: dict[str, Tensor] = {}
    table = emb[comp_src].flip(-1) if lay.flipped_embedding else emb  # E'[v] = flip_C(E[comp v])
    out["backbone.core.embedding.weight"] = _rows(lay, table, padded)
    if "head.weight" in own and not cfg.tie_embeddings:
        out["head.weight"] = _rows(lay, emb if lay.tied_head else w.get(head_key), padded)
    if lay.tied_head and "head.weight" in own and cfg.tie_embeddings:
        w.mark(head_key)
    for i in range(cfg.n_layer):
        src, dst = f"backbone.layers.{i}.", f"backbone.core.layers.{i}."
        conj = lay.conjugated(i)
        for p in ("weight", "bias"):
            if dst + "norm." + p in own:
                t = w.get(src + "norm." + wrap + p)
                out[dst + "norm." + p] = t.flip(0) if conj else t
        mix = src + ("mixer.submodule." if lay.rcps else "mixer.")
        if not cfg.bidirectional:
            names = [k[len(dst + "mixer."):] for k in own if k.startswith(dst + "mixer.")]
            for s in names:
                out[dst + "mixer." + s] = w.get(mix + "mamba_fwd." + s)
            continue
        names = [k[len(dst + "mixer.mixer."):] for k in own if k.startswith(dst + "mixer.mixer.")]
        for ours, theirs in (("mixer.mixer.", "mamba_fwd."), ("mixer.mixer_rev.", "mamba_rev.")):
            if conj:  # F g F reads the sequence the other way: the directions exchange their Mambas
                theirs = "mamba_rev." if theirs == "mamba_fwd." else "mamba_fwd."
            for s in names:
                alt = ()
                if lay.tied_projections and s.startswith(("in_proj.", "out_proj.")):
                    other = "mamba_rev." if theirs == "mamba_fwd." else "mamba_fwd."
                    alt = (mix + other + s,)
                t = w.get(mix + theirs + s, *alt)
                out[dst + ours + s] = _conjugate_mamba(s, t) if conj else t
    for p in ("weight", "bias"):
        if "backbone.core.norm_f." + p in own:
            out["backbone.core.norm_f." + p] = w.get("backbone.norm_f." + wrap + p)
    bad = [f"{k}: checkpoint {tuple(v.shape)}, config.json implies {tuple(own[k].shape)}"
           for k, v in out.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{w.where}: the weights do not match config.json (d_model, n_layer, ssm_cfg): {bad[:3]}")
    unused = w.unused()
    if unused:
        raise ValueError(f"{w.where}: tensors this config does not use: {unused[:8]}"
                         f"{' ...' if len(unused) > 8 else ''} (does config.json describe these weights?)")
    return out


def load_caduceus(path: str | os.PathLike, map_location: str = "cpu") -> DNAModel:
    """A Caduceus folder -> DNAModel with a masked-LM head (eval mode), computing Caduceus's logits over our ids."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a folder (Caduceus checkpoints are read from local folders)")
    lay = caduceus_layout(read_caduceus_config(path), path)
    tensors = load_weights(path)  # safetensors (sharded too) or pytorch_model.bin with weights_only=True
    w = _Weights(tensors, str(path))
    model = DNAModel(lay.config, lay.head)
    state = _state_dict(lay, model, w)
    if lay.config.tie_embeddings:
        state["head.weight"] = state["backbone.core.embedding.weight"]
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def _shape_fields(cfg: MambaConfig) -> dict:
    """The config fields that decide a backbone's weights and function (not its init)."""
    ssm = {"layer": "Mamba1", "d_state": 16, "d_conv": 4, "expand": 2, "dt_rank": "auto", "conv_bias": True,
           "bias": False, "selective": True}
    ssm = {k: cfg.ssm_cfg.get(k, v) for k, v in ssm.items()}
    if ssm["dt_rank"] == "auto":
        ssm["dt_rank"] = math.ceil(cfg.d_model / 16)
    return {"d_model": cfg.d_model, "n_layer": cfg.n_layer, "d_intermediate": cfg.d_intermediate,
            "attn_layer_idx": list(cfg.attn_layer_idx), "rms_norm": cfg.rms_norm, "norm_epsilon": cfg.norm_epsilon,
            "bidirectional": cfg.bidirectional, "bidirectional_strategy": cfg.bidirectional_strategy,
            "bidirectional_weight_tie": cfg.bidirectional_weight_tie, "padded_vocab_size": cfg.padded_vocab_size,
            **{f"ssm_cfg.{k}": v for k, v in ssm.items()}}


def finetune_flags(config: MambaConfig) -> str:
    """``--model.config.*`` flags that make ``python -m apps.genomics.finetune`` build this backbone."""
    ssm = {k: v for k, v in config.ssm_cfg.items() if k in ("d_state", "d_conv", "expand", "dt_rank", "conv_bias",
                                                               "bias")}
    flags = [f"--model.config.d_model={config.d_model}", f"--model.config.n_layer={config.n_layer}",
             f"--model.config.ssm_cfg='{json.dumps(ssm)}'",
             f"--model.config.bidirectional_weight_tie={str(config.bidirectional_weight_tie).lower()}",
             f"--model.config.norm_epsilon={config.norm_epsilon}",
             f"--model.config.pad_vocab_size_multiple={config.pad_vocab_size_multiple}"]
    if not config.rms_norm:
        flags.append("--model.config.rms_norm=false")
    return " ".join(flags)


def load_caduceus_backbone(backbone: DNABackbone, path: str | os.PathLike) -> int:
    """Initialise ``backbone`` (e.g. a DNAClassifier's, ``--model.init_from=DIR``) from a Caduceus folder.
    Its config must describe the same network (sizes, norms, untied bidirectional mixers); a mismatch raises
    ValueError listing each field and the flags that fix it. Returns the number of tensors copied."""
    src = load_caduceus(path)
    want, have = _shape_fields(src.config), _shape_fields(backbone.config)
    diff = [f"{k}: yours {have[k]!r}, the checkpoint's {want[k]!r}" for k in want if have[k] != want[k]]
    if diff:
        raise ValueError(f"{path}: a Caduceus checkpoint whose backbone differs from this one: {'; '.join(diff)}. "
                         f"Build the same backbone with: {finetune_flags(src.config)}")
    state = src.backbone.core.state_dict()
    backbone.core.load_state_dict(state)
    return len(state)


def describe(path: str | os.PathLike) -> str:
    lay = caduceus_layout(read_caduceus_config(path), path)
    cfg = lay.config
    what = {"rcps": "Caduceus-PS (RC-equivariant)", "bimamba": "BiMamba Caduceus", "mamba": "one-way Caduceus"}
    lines = [f"{path}: {what[lay.head.backbone]}, d_model={cfg.d_model}, n_layer={cfg.n_layer}, "
             f"backbone={lay.head.backbone!r}, masked-LM head",
             f"token ids: {lay.tokens}{' (ours)' if lay.tokens == 'hyenadna' else ' (re-ordered to ours)'}"]
    if cfg.bidirectional:
        lines.append("bidirectional mixers: loaded untied (Caduceus "
                     + ("ties in_proj/out_proj only; copied" if lay.tied_projections else "does not tie them") + ")")
    if lay.fused_swap:
        lines.append("fused RCPS blocks (strand halves trade places each block): folded into the weights")
    # the default task (splice) reads the centre positions, which an RC-invariant backbone cannot: mean pooling
    readout = " --model.pooling=mean --model.center_window=0" if lay.head.backbone == "rcps" else ""
    lines.append(f"fine-tune from it: python -m apps.genomics.finetune --model.backbone={lay.head.backbone} "
                 f"--model.init_from={path} {finetune_flags(cfg)}{readout}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="a local Caduceus folder (config.json + model.safetensors or pytorch_model.bin)")
    p.add_argument("--out", help="write the converted model here (hiss save_pretrained: config, head.json, weights)")
    args = p.parse_args(argv)
    if not is_caduceus_dir(args.ckpt):
        raise ValueError(f"{args.ckpt}: not a Caduceus folder (config.json with model_type 'caduceus')")
    print(describe(args.ckpt))
    if args.out:
        load_caduceus(args.ckpt).save_pretrained(args.out)
        print(f"converted -> {args.out} (loads with DNAModel.from_pretrained, predict --ckpt, --model.init_from)")


if __name__ == "__main__":
    run_cli(main)
