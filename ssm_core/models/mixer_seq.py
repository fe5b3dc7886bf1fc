"""Backbone (MixerModel) and language model (MambaLMHeadModel), mamba_ssm's layout and key names:
backbone.embedding, backbone.layers.{i}.{norm, mixer, norm2, mlp}, backbone.norm_f, lm_head."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from ..modules.bidirectional import Bidirectional
from ..modules.block import Block
from ..modules.mamba import Mamba
from ..modules.mamba2 import Mamba2
from ..modules.mha import MHA
from ..modules.mlp import GatedMLP
from ..ops.norm import RMSNorm
from ..state import ModelState
from ..validate import check_hidden, check_model_state, check_token_ids
from .config import MambaConfig
from .generation import GenerationMixin

__all__ = ["MixerModel", "MambaLMHeadModel", "LMOutput", "create_block"]


@dataclass
class LMOutput:
    logits: Tensor  # (batch, L, padded_vocab_size)
    state: ModelState | None = None


def create_block(config: MambaConfig, layer_idx: int, device=None, dtype=None) -> Block:
    factory = {"device": device, "dtype": dtype}
    d = config.d_model
    if config.rms_norm:
        norm_cls = partial(RMSNorm, eps=config.norm_epsilon, **factory)
    else:
        norm_cls = partial(nn.LayerNorm, eps=config.norm_epsilon, **factory)
    if layer_idx in config.attn_layer_idx:
        mixer = MHA(d, layer_idx=layer_idx, **config.attn_cfg, **factory)
    else:
        ssm_kwargs = {k: v for k, v in config.ssm_cfg.items() if k != "layer"}
        ssm_cls = Mamba if config.ssm_layer == "Mamba1" else Mamba2
        mixer = ssm_cls(d, layer_idx=layer_idx, **ssm_kwargs, **factory)
        if config.bidirectional:
            rev = None if config.bidirectional_weight_tie else ssm_cls(d, layer_idx=layer_idx, **ssm_kwargs, **factory)
            mixer = Bidirectional(mixer, rev, merge=config.bidirectional_strategy, d_model=d, **factory)
    mlp = norm2 = None
    if config.d_intermediate > 0:
        mlp = GatedMLP(d, hidden_features=config.d_intermediate, out_features=d, **factory)
        norm2 = norm_cls(d)
    return Block(d, mixer, norm_cls(d), mlp, norm2, residual_in_fp32=config.residual_in_fp32)


def _init_weights(module: nn.Module, n_layer: int, n_residuals_per_layer: int, initializer_range: float = 0.02):
    """mamba_ssm's init: zero Linear biases (except dt_proj), N(0, 0.02) embeddings, and output
    projections of each residual branch rescaled by 1/sqrt(n_residuals * n_layer) (GPT-2 style)."""
    if isinstance(module, nn.Linear):
        if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    for name, p in module.named_parameters():
        if name in ("out_proj.weight", "fc2.weight"):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            with torch.no_grad():
                p /= math.sqrt(n_residuals_per_layer * n_layer)


class MixerModel(nn.Module):
    api_name = "MixerModel"  # how its error messages name it (MambaLMHeadModel sets its own name)

    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(create_block(config, i, device, dtype) for i in range(config.n_layer))
        norm = RMSNorm if config.rms_norm else nn.LayerNorm
        self.norm_f = norm(config.d_model, eps=config.norm_epsilon, device=device, dtype=dtype)
        self.apply(partial(_init_weights, n_layer=config.n_layer,
                           n_residuals_per_layer=1 if config.d_intermediate == 0 else 2))

    def empty_state(self, batch: int, device=None, dtype=None) -> ModelState:
        if self.config.bidirectional:
            raise ValueError("a bidirectional model has no streaming state")
        return ModelState([layer.mixer.empty_state(batch, device, dtype) for layer in self.layers], 0)

    def forward(self, input_ids: Tensor | None = None, state: ModelState | None = None,
                return_state: bool = False, inputs_embeds: Tensor | None = None, **mixer_kwargs):
        """input_ids: (batch, L) -> hidden states (batch, L, d_model) [, ModelState]."""
        where = self.api_name
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{where}: pass either input_ids or inputs_embeds (exactly one)")
        if inputs_embeds is None:
            check_token_ids(where, input_ids, self.config.vocab_size)
        else:
            check_hidden(where, inputs_embeds, self.config.d_model, what="inputs_embeds")
        if state is not None:
            check_model_state(where, state, len(self.layers))
        x = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        want_state = return_state or state is not None
        new_layers = []
        for i, layer in enumerate(self.layers):
            if want_state:
                x, s = layer(x, state=None if state is None else state.layers[i], return_state=True, **mixer_kwargs)
                new_layers.append(s)
            else:
                x = layer(x, **mixer_kwargs)
        h = self.norm_f(x.to(self.norm_f.weight.dtype))
        if not return_state:
            return h
        offset = (0 if state is None else state.seqlen_offset) + h.shape[1]
        return h, ModelState(new_layers, offset)


class MambaLMHeadModel(nn.Module, GenerationMixin):
    """Embedding -> blocks -> final norm -> (tied) LM head.

    ``model(input_ids)`` returns an LMOutput with ``.logits``; ``model(ids, state=s, return_state=True)``
    continues from a state and returns the new one in ``.state``.
    """

    def __init__(self, config: MambaConfig, initializer_cfg=None, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.backbone = MixerModel(config, device=device, dtype=dtype)
        self.backbone.api_name = type(self).__name__  # bad input is reported as this model's
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, device=device, dtype=dtype)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def empty_state(self, batch: int, device=None, dtype=None) -> ModelState:
        return self.backbone.empty_state(batch, device, dtype)

    def forward(self, input_ids: Tensor, position_ids=None, inference_params=None, num_last_tokens: int = 0,
                state: ModelState | None = None, return_state: bool = False, **mixer_kwargs) -> LMOutput:
        if inference_params is not None:
            raise ValueError("inference_params is mamba_ssm's cache; pass state=/return_state=True instead")
        out = self.backbone(input_ids, state=state, return_state=return_state, **mixer_kwargs)
        hidden, new_state = out if return_state else (out, None)
        if num_last_tokens > 0:
            hidden = hidden[:, -num_last_tokens:]
        return LMOutput(logits=self.lm_head(hidden), state=new_state)

    # checkpoints: defined in ssm_core.models.checkpoint, attached here for the familiar API
    def save_pretrained(self, save_directory) -> None:
        from .checkpoint import save_pretrained

        save_pretrained(self, save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name, device=None, dtype=None, **kwargs) -> MambaLMHeadModel:
        from .checkpoint import load_pretrained

        return load_pretrained(pretrained_model_name, device=device, dtype=dtype, **kwargs)
