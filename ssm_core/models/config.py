"""MambaConfig: mamba_ssm's config fields (JSON-compatible with its config.json) plus a few of ours."""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import asdict, dataclass, field, fields

__all__ = ["MambaConfig"]

SSM_LAYERS = ("Mamba1", "Mamba2")
BIDIRECTIONAL_STRATEGIES = ("add", "mean", "concat")


def _allowed_kwargs(cls) -> set[str]:
    skip = {"self", "d_model", "embed_dim", "layer_idx", "device", "dtype"}
    return {p for p in inspect.signature(cls.__init__).parameters if p not in skip}


def _as_json_types(value):
    """A copy with tuples turned into lists (recursively), the way a JSON round trip returns it."""
    if isinstance(value, dict):
        return {k: _as_json_types(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_json_types(v) for v in value]
    return value


@dataclass
class MambaConfig:
    d_model: int = 2560
    d_intermediate: int = 0  # > 0 adds a gated MLP after each mixer
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=dict)  # Mamba / Mamba2 kwargs; "layer": "Mamba1" | "Mamba2"
    attn_layer_idx: list = field(default_factory=list)  # layers that are attention (MHA) instead
    attn_cfg: dict = field(default_factory=dict)  # MHA kwargs (num_heads, rotary_emb_dim, ...)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True  # accepted for mamba_ssm compatibility; same maths either way
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    norm_epsilon: float = 1e-5
    bidirectional: bool = False  # wrap each SSM mixer in ssm_core.Bidirectional (not causal)
    bidirectional_strategy: str = "add"
    bidirectional_weight_tie: bool = True

    def __post_init__(self):
        # JSON has no tuples: keep sequences as lists so that from_json(to_json(c)) == c
        self.ssm_cfg, self.attn_cfg = _as_json_types(self.ssm_cfg), _as_json_types(self.attn_cfg)
        self.attn_layer_idx = _as_json_types(self.attn_layer_idx)
        self.validate()

    @property
    def ssm_layer(self) -> str:
        return self.ssm_cfg.get("layer", "Mamba1")

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def validate(self) -> None:
        from ..modules.mamba import Mamba
        from ..modules.mamba2 import Mamba2
        from ..modules.mha import MHA

        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MambaConfig: {name} must be a positive int, got {value!r}")
        if not isinstance(self.d_intermediate, int) or self.d_intermediate < 0:
            raise ValueError(f"MambaConfig: d_intermediate must be an int >= 0, got {self.d_intermediate!r}")
        if self.ssm_layer not in SSM_LAYERS:
            raise ValueError(f"MambaConfig: ssm_cfg['layer'] must be one of {SSM_LAYERS}, got {self.ssm_layer!r}")
        cls = Mamba if self.ssm_layer == "Mamba1" else Mamba2
        unknown = set(self.ssm_cfg) - {"layer"} - _allowed_kwargs(cls)
        if unknown:
            raise ValueError(f"MambaConfig: ssm_cfg has keys {sorted(unknown)} that {cls.__name__} does not take; "
                             f"allowed: {sorted(_allowed_kwargs(cls))}")
        if self.ssm_layer == "Mamba2":
            expand = self.ssm_cfg.get("expand", 2)
            d_ssm = self.ssm_cfg.get("d_ssm") or int(expand * self.d_model)
            headdim = self.ssm_cfg.get("headdim", 64)
            if d_ssm % headdim:
                raise ValueError(f"MambaConfig: Mamba2 d_ssm={d_ssm} must be divisible by headdim={headdim}")
        bad = [i for i in self.attn_layer_idx if not (isinstance(i, int) and 0 <= i < self.n_layer)]
        if bad:
            raise ValueError(f"MambaConfig: attn_layer_idx {bad} outside 0..{self.n_layer - 1}")
        if self.attn_layer_idx:
            unknown = set(self.attn_cfg) - _allowed_kwargs(MHA)
            if unknown:
                raise ValueError(f"MambaConfig: attn_cfg has unknown keys {sorted(unknown)}")
            if "num_heads" not in self.attn_cfg:
                raise ValueError("MambaConfig: attn_cfg needs num_heads when attn_layer_idx is set")
        if self.bidirectional_strategy not in BIDIRECTIONAL_STRATEGIES:
            raise ValueError(f"MambaConfig: bidirectional_strategy must be one of {BIDIRECTIONAL_STRATEGIES}, "
                             f"got {self.bidirectional_strategy!r}")

    # --- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> MambaConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"MambaConfig: unknown keys {sorted(unknown)}; known keys: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> MambaConfig:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> MambaConfig:
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
        return cls.from_dict(d)
