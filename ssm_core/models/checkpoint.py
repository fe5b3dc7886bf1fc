"""Checkpoints from local directories: hiss (config.json + model.safetensors), mamba_ssm
(config.json + pytorch_model.bin) and HF transformers MambaForCausalLM / Mamba2ForCausalLM
(config.json with model_type mamba / mamba2 + safetensors). No network access, ever."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor

from ..io import CorruptFileError, atomic_write, read_json_object, read_safetensors
from .config import MambaConfig

__all__ = ["save_pretrained", "load_pretrained", "load_weights", "config_from_hf"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_pretrained(model, save_directory: str | os.PathLike) -> None:
    """Write config.json and model.safetensors (mamba_ssm key names; a tied lm_head is not duplicated)."""
    from safetensors.torch import save_file

    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)

    def write(tmp: str) -> None:  # both files are written in full before either replaces the old one, so a
        save_file(state, tmp, metadata={"format": "pt"})  # save killed midway leaves the old pair intact
        atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(model.config.to_json()))

    atomic_write(out / WEIGHTS_NAME, write)


def _json_float(v) -> float:
    """transformers writes inf as {"__float__": "Infinity"}."""
    return float(v["__float__"]) if isinstance(v, dict) else float(v)


def config_from_hf(cfg: dict) -> MambaConfig:
    """Translate a transformers MambaConfig / Mamba2Config dict into ours."""
    kind = cfg["model_type"]
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={cfg['hidden_act']!r} is not supported (Mamba uses silu)")
    common = {
        "d_model": cfg["hidden_size"], "n_layer": cfg["num_hidden_layers"], "vocab_size": cfg["vocab_size"],
        "rms_norm": True, "residual_in_fp32": cfg.get("residual_in_fp32", True),
        "norm_epsilon": cfg.get("layer_norm_epsilon", 1e-5), "pad_vocab_size_multiple": 1,
        "tie_embeddings": cfg.get("tie_word_embeddings", True),
    }
    if kind == "mamba":
        expand = cfg.get("expand", 2)
        if cfg.get("intermediate_size", expand * cfg["hidden_size"]) != expand * cfg["hidden_size"]:
            raise ValueError("HF mamba config: intermediate_size must equal expand * hidden_size")
        rank = cfg.get("time_step_rank", "auto")
        ssm = {
            "layer": "Mamba1", "d_state": cfg["state_size"], "d_conv": cfg["conv_kernel"], "expand": expand,
            "dt_rank": rank, "conv_bias": cfg.get("use_conv_bias", True), "bias": cfg.get("use_bias", False),
            "dt_min": cfg.get("time_step_min", 0.001), "dt_max": cfg.get("time_step_max", 0.1),
            "dt_init": cfg.get("time_step_init_scheme", "random"), "dt_scale": cfg.get("time_step_scale", 1.0),
            "dt_init_floor": cfg.get("time_step_floor", 1e-4),
        }
    elif kind == "mamba2":
        expand = cfg.get("expand", 2)
        d_ssm = cfg["num_heads"] * cfg["head_dim"]
        limit = cfg.get("time_step_limit", (0.0, math.inf))
        ssm = {
            "layer": "Mamba2", "d_state": cfg["state_size"], "d_conv": cfg["conv_kernel"], "expand": expand,
            "headdim": cfg["head_dim"], "ngroups": cfg.get("n_groups", 1), "chunk_size": cfg.get("chunk_size", 256),
            "bias": cfg.get("use_bias", False), "conv_bias": cfg.get("use_conv_bias", True),
            "dt_min": cfg.get("time_step_min", 0.001), "dt_max": cfg.get("time_step_max", 0.1),
            "dt_init_floor": cfg.get("time_step_floor", 1e-4),
            "dt_limit": [_json_float(limit[0]), _json_float(limit[1])],
        }
        if d_ssm != expand * cfg["hidden_size"]:
            ssm["d_ssm"] = d_ssm
        if common["norm_epsilon"] != 1e-5:  # HF uses layer_norm_epsilon in the gated norm too
            ssm["norm_eps"] = common["norm_epsilon"]
    else:
        raise ValueError(f"unsupported HF model_type {kind!r} (expected 'mamba' or 'mamba2')")
    return MambaConfig(ssm_cfg=ssm, **common)


def _read_config(directory: Path) -> tuple[MambaConfig, str]:
    path = directory / CONFIG_NAME
    raw = read_json_object(path, "from_pretrained reads local directories only")
    try:
        if "model_type" in raw:
            return config_from_hf(raw), "hf"
        return MambaConfig.from_dict(raw), "native"
    except (ValueError, TypeError, KeyError) as e:  # name the file: "MambaConfig: ..." alone does not say which
        msg = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{path}: {msg}") from e


def load_weights(directory: Path) -> dict[str, Tensor]:
    """model.safetensors, sharded safetensors (model.safetensors.index.json) or pytorch_model.bin.
    A corrupt or truncated file is a CorruptFileError (a ValueError) naming it."""
    if (directory / WEIGHTS_NAME).is_file():
        return read_safetensors(directory / WEIGHTS_NAME, kind="checkpoint")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CorruptFileError(f"{index}: not a valid shard index (expected JSON with a \"weight_map\" of "
                                   f"tensor name -> shard file): {type(e).__name__}: {e}") from e
        return {k: v for shard in shards for k, v in read_safetensors(directory / shard, kind="checkpoint").items()}
    if (directory / "pytorch_model.bin").is_file():
        return _torch_load(directory / "pytorch_model.bin")
    raise FileNotFoundError(f"{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _torch_load(path: Path) -> dict[str, Tensor]:
    """torch.load with weights_only=True (never runs pickled code), its failures named and explained."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused something that is not plain tensors
        lines = [ln.strip() for ln in str(e).splitlines() if "unsupported" in ln.lower() or "Unpickler error" in ln]
        why = f" ({lines[0]})" if lines else ""
        raise ValueError(f"{path}: refused to load: it holds more than plain tensors and containers, and hiss "
                         f"never runs pickled code{why}") from e
    except (PermissionError, IsADirectoryError):
        raise
    except (RuntimeError, EOFError, OSError) as e:  # a truncated zip: bad central directory, mmap EINVAL
        raise CorruptFileError(f"{path}: cannot read this PyTorch checkpoint ({path.stat().st_size:,} bytes): it is "
                               f"corrupt or truncated [{str(e).strip().splitlines()[0] if str(e).strip() else ''}]; "
                               "replace it with a good copy") from e


def _hf_to_native(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    return {("backbone.embedding." + k[len("backbone.embeddings."):] if k.startswith("backbone.embeddings.")
             else k): v for k, v in weights.items()}


def load_pretrained(directory: str | os.PathLike, device=None, dtype=None, strict: bool = True):
    """Build a MambaLMHeadModel from a local checkpoint directory of any supported format."""
    from .mixer_seq import MambaLMHeadModel

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory (from_pretrained reads local directories only)")
    config, kind = _read_config(directory)
    weights = load_weights(directory)
    if kind == "hf":
        weights = _hf_to_native(weights)
    model = MambaLMHeadModel(config, device=device)
    expected = set(model.state_dict())
    if config.tie_embeddings:
        weights.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if strict and (missing or unexpected):
        raise ValueError(f"{directory}: checkpoint does not match the config; "
                         f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}, "
                         f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
    for name, t in weights.items():
        if name in expected and model.state_dict()[name].shape != t.shape:
            raise ValueError(f"{directory}: the weights do not match config.json: {name} has shape "
                             f"{tuple(t.shape)}, the config expects {tuple(model.state_dict()[name].shape)}")
    model.load_state_dict(weights, strict=False)
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
        for name, p in model.named_parameters():  # A_log, D, dt bias stay fp32
            if name.endswith((".A_log", ".A_imag", ".D", ".dt_bias", "dt_proj.bias")):
                p.data = p.data.float()
    return model
