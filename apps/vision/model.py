"""Vision Mamba (Vim, Zhu et al. ICML 2024) on ssm_core, registered in timm, loading hustvl/Vim checkpoints.

    import apps.vision, timm
    model = timm.create_model("vim_tiny_patch16_224", num_classes=10, img_size=160, drop_path_rate=0.05)
    model = timm.create_model("vim_tiny_patch16_224", pretrained=True,            # hustvl weights, or a file:
                              pretrained_cfg_overlay={"file": "vim_t_midclstok_76p1acc.pth"}, num_classes=37)

The network, hustvl's ``VisionMamba`` with ``bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2``:

    tokens = patch_embed(image)                       # Conv2d(kernel=patch, stride=stride): (B, M, C);
                                                      # optionally a conv stem first (stem_channels=...)
    tokens = insert(tokens, cls_token, at=M // 2)     # the class token sits in the middle of the sequence
    x = tokens + pos_embed                            # absolute, learned; (B, M + 1, C)
    for each of `depth` layers:  x = x + drop_path(BiMambaV2(RMSNorm(x)))   # residual stream kept in fp32
    feats = RMSNorm_f(x)                              # forward_features
    logits = head(pool(feats))                        # pool: the class token (hustvl), mean, last, or none

hustvl's ``final_pool_type='mean'`` is ignored by its own code when a class token is present (the class token is
returned); our ``global_pool="cls"`` is that behaviour, "mean" averages every token, "last" is hustvl's
``final_pool_type='none'`` (the last token), "none" returns all tokens (timm's ``global_pool=''``).
Parameter names are hustvl's (``layers.{i}.mixer.*``, ``layers.{i}.norm``, ``norm_f``, ``head``), so its state
dicts load key for key; ``checkpoint_filter_fn`` adapts the position embedding and the head.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pickle
import zipfile
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, lecun_normal_, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from apps.common.checkpoint import read_lightning_checkpoint
from ssm_core import BiMambaV2, Block, RMSNorm, atomic_write

__all__ = [
    "VisionMamba", "VimBlock", "PatchEmbed", "POOLS", "checkpoint_filter_fn", "read_checkpoint", "load_hustvl",
    "resample_pos_embed", "save_vision_model", "load_vision_model", "read_any", "load_weights_into",
    "CheckpointError", "infer_vim_variant", "apply_data_config", "sync_data_config",
    "vim_tiny_patch16_224", "vim_small_patch16_224", "vim_base_patch16_224",
    "vim_tiny_patch16_stride8_224", "vim_small_patch16_stride8_224", "vim_base_patch16_stride8_224",
]

POOLS = ("cls", "mean", "last", "none")
_POOL_ALIASES = {"token": "cls", "avg": "mean", "": "none"}  # timm's names
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


def _pool_name(global_pool: str) -> str:
    name = _POOL_ALIASES.get(global_pool, global_pool)
    if name not in POOLS:
        raise ValueError(f"VisionMamba: global_pool must be one of {POOLS} (or timm's 'token', 'avg', ''), "
                         f"got {global_pool!r}")
    return name


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


class PatchEmbed(nn.Module):
    """hustvl's patch embedding: Conv2d(kernel=patch_size, stride=stride), so stride < patch overlaps patches
    (the stride-8 long-sequence models). grid = (size - patch) // stride + 1 per side.

    ``stem_channels=(c1, ..., ck)`` puts k convolutions (3x3, stride 2, BatchNorm, ReLU) in front of a
    projection of kernel = stride = patch / 2^k: the convolutional stem of Xiao et al. 2021 ("Early convolutions
    help transformers see better"), same token grid, better sample efficiency on small data. Default: none."""

    def __init__(self, img_size=224, patch_size=16, stride=16, in_chans=3, embed_dim=192,
                 stem_channels: tuple[int, ...] = ()):
        super().__init__()
        self.img_size, self.patch_size, self.stride = _pair(img_size), _pair(patch_size), _pair(stride)
        self.in_chans = in_chans
        if any(s < p for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"PatchEmbed: image size {self.img_size} is smaller than the patch {self.patch_size}")
        k, sizes = len(stem_channels), self.img_size
        if k:
            if self.stride != self.patch_size or any(p % 2**k for p in self.patch_size):
                raise ValueError(f"PatchEmbed: a {k}-conv stem halves the image {k} times, so the patch "
                                 f"{self.patch_size} must be a multiple of {2**k} and equal the stride "
                                 f"{self.stride}")
            layers, c_in = [], in_chans
            for c in stem_channels:
                layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c),
                           nn.ReLU(inplace=True)]
                c_in = c
            self.stem = nn.Sequential(*layers)
            for _ in range(k):
                sizes = tuple((s - 1) // 2 + 1 for s in sizes)
        else:
            self.stem, c_in = nn.Identity(), in_chans
        kernel = tuple(p // 2**k for p in self.patch_size)
        step = tuple(st // 2**k for st in self.stride)
        self.grid_size = tuple((s - p) // st + 1 for s, p, st in zip(sizes, kernel, step))
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(c_in, embed_dim, kernel_size=kernel, stride=step)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or tuple(x.shape[-2:]) != self.img_size or x.shape[1] != self.in_chans:
            raise ValueError(
                f"VisionMamba: expected images of shape (batch, {self.in_chans}, {self.img_size[0]}, "
                f"{self.img_size[1]}), got {tuple(x.shape)}; resize the input (the model's pretrained_cfg "
                "names the size) or create the model with img_size= (position embeddings are interpolated)")
        return self.proj(self.stem(x)).flatten(2).transpose(1, 2)  # (B, M, C)


class TimmStemPatchEmbed(PatchEmbed):
    """Our PatchEmbed (with its conv stem) behind timm's ``embed_layer`` interface, so timm's own ViT / DeiT gets
    the same stem as Vim for a like-for-like comparison (``create_vision_model`` wires it in)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, stem_channels=(), bias=True,
                 dynamic_img_pad=False, strict_img_size=True, output_fmt=None, **_device_dtype):
        if dynamic_img_pad or not strict_img_size or output_fmt not in (None, "NCL", "NLC"):
            raise ValueError("TimmStemPatchEmbed: fixed image size, flattened tokens only")
        super().__init__(img_size, patch_size, patch_size, in_chans, embed_dim, tuple(stem_channels))
        if not bias:
            self.proj.bias = None

    def feat_ratio(self, as_scalar: bool = True):
        return self.patch_size[0] if as_scalar else self.patch_size


def create_vision_model(model_name: str, **kwargs) -> nn.Module:
    """``timm.create_model`` plus one translation: ``stem_channels`` for a non-Vim timm model (DeiT / ViT) becomes
    ``embed_layer=TimmStemPatchEmbed`` with that stem, so both families take the same config key."""
    import timm

    stem = kwargs.pop("stem_channels", None) if not model_name.startswith("vim_") else None
    if stem:
        kwargs["embed_layer"] = functools.partial(TimmStemPatchEmbed, stem_channels=tuple(stem))
    return sync_data_config(timm.create_model(model_name, **kwargs))


class VimBlock(Block):
    """ssm_core's pre-norm residual Block (fp32 residual stream) plus stochastic depth on the mixer branch:
    x = x + drop_path(mixer(norm(x))). Submodule names are hustvl's (``norm``, ``mixer``)."""

    def __init__(self, dim: int, mixer: nn.Module, norm: nn.Module, drop_path: float = 0.0):
        super().__init__(dim, mixer, norm, residual_in_fp32=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        return x + self.drop_path(self.mixer(self.norm(x.to(self.norm.weight.dtype))))


class VisionMamba(nn.Module):
    """Vim with timm's model interface (forward_features / forward_head / reset_classifier / group_matcher /
    no_weight_decay / set_grad_checkpointing). ``stride`` defaults to ``patch_size``; ``class_token=False`` drops
    the middle class token (then pool with "mean" or "last")."""

    def __init__(self, img_size=224, patch_size=16, stride=None, in_chans=3, num_classes=1000, embed_dim=192,
                 depth=24, d_state=16, d_conv=4, expand=2, global_pool="cls", class_token=True, drop_rate=0.0,
                 pos_drop_rate=0.0, drop_path_rate=0.0, norm_eps=1e-5, divide_out=True,
                 stem_channels: tuple[int, ...] = ()):
        super().__init__()
        self.global_pool = _pool_name(global_pool)
        if self.global_pool == "cls" and not class_token:
            raise ValueError("VisionMamba: global_pool='cls' needs class_token=True")
        self.num_classes, self.in_chans = num_classes, in_chans
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.depth, self.has_class_token, self.grad_checkpointing = depth, class_token, False
        self.patch_embed = PatchEmbed(img_size, patch_size, stride or patch_size, in_chans, embed_dim,
                                      tuple(stem_channels))
        M = self.patch_embed.num_patches
        self.cls_index = M // 2 if class_token else None  # hustvl: token_position = M // 2
        self.num_tokens = M + int(class_token)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # hustvl's linspace(0, rate, depth)
        self.layers = nn.ModuleList([
            VimBlock(embed_dim, BiMambaV2(embed_dim, d_state=d_state, d_conv=d_conv, expand=expand,
                                          divide_out=divide_out, layer_idx=i),
                     RMSNorm(embed_dim, eps=norm_eps), drop_path=dpr[i])
            for i in range(depth)])
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self):
        """hustvl's init: trunc-normal(0.02) position/class tokens and head, LeCun-normal patch conv, zero biases
        except dt_proj's, out_proj rescaled by 1/sqrt(depth) (GPT-2's prenorm-residual scaling)."""
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for layer in self.layers:
            out_proj = layer.mixer.out_proj
            nn.init.kaiming_uniform_(out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                out_proj.weight /= math.sqrt(self.depth)

    # --- timm interface -------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {"pos_embed", "cls_token"}
        for n, p in self.named_parameters():
            if getattr(p, "_no_weight_decay", False):
                names.add(n)
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """For timm's layer-wise lr decay (timm.optim.param_groups_layer_decay): stem, then one group per layer."""
        return {"stem": r"^cls_token|^pos_embed|^patch_embed",
                "blocks": [(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))]}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = _pool_name(global_pool)
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            self.head.to(self.pos_embed.device)
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def embed(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> token sequence with the class token and position embedding (B, M + 1, C)."""
        x = self.patch_embed(x)
        if self.cls_token is not None:
            i = self.cls_index
            x = torch.cat([x[:, :i], self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x[:, i:]], dim=1)
        return self.pos_drop(x + self.pos_embed.to(x.dtype))

    def forward_features(self, x: Tensor) -> Tensor:
        """Images -> normalised tokens (B, M + 1, C), fp32 residual stream through the layers."""
        x = self.embed(x)
        for layer in self.layers:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.norm_f(x.to(self.norm_f.weight.dtype))

    def pool(self, x: Tensor) -> Tensor:
        if self.global_pool == "cls":
            return x[:, self.cls_index]
        if self.global_pool == "mean":
            return x.mean(dim=1)
        if self.global_pool == "last":
            return x[:, -1]
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def load_pretrained(self, path: str | Path, use_ema: bool = False) -> dict:
        """timm's ``custom_load`` hook (``pretrained=True`` / ``pretrained_cfg_overlay={"file": ...}``): a hustvl
        ``.pth`` or a safetensors state dict, adapted by ``checkpoint_filter_fn``. Returns a report dict."""
        return load_hustvl(path, self, use_ema=use_ema)


# --- checkpoints ----------------------------------------------------------------------------------------------

def read_checkpoint(path: str | Path, use_ema: bool = False) -> dict[str, Tensor]:
    """A state dict from a hustvl/DeiT-style ``.pth`` (``{"model", "model_ema", "optimizer", "args": Namespace,
    ...}``), a bare ``.pth`` state dict, or ``.safetensors``. Never a full unpickle: torch.load(weights_only=True)
    with only ``argparse.Namespace`` allowed. ``use_ema`` picks ``model_ema`` when present."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"checkpoint {path}: not a readable safetensors file ({e})") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"checkpoint {path} holds objects outside the weights-only allow-list "
                              f"(argparse.Namespace); refusing a full unpickle. torch said: {e}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is not a readable torch checkpoint "
                              f"(truncated or not a .pth?): {e}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict")
    keys = ("model_ema", "state_dict_ema", "model", "state_dict") if use_ema else ("model", "state_dict")
    for k in keys:
        if isinstance(ckpt.get(k), dict) and ckpt[k]:
            ckpt = ckpt[k]
            break
    sd = {k.removeprefix("module."): v for k, v in ckpt.items() if isinstance(v, Tensor)}
    if not sd:
        raise CheckpointError(f"checkpoint {path} holds no tensors under 'model' / 'state_dict' or at the top")
    return sd


def resample_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                       class_token: bool = True) -> Tensor:
    """Bicubic resampling of a middle-class-token position embedding (1, H*W [+1], C) from one patch grid to
    another. The class token's entry sits at index H*W // 2 (not 0, as DeiT-style code assumes): it is taken
    out, the patch entries are resampled on their 2-D grid (timm's resample_abs_pos_embed, no antialias, as
    hustvl/DeiT fine-tuning), and it is put back at the new middle."""
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    M_old = old_grid[0] * old_grid[1]
    if pos_embed.shape[1] != M_old + int(class_token):
        raise CheckpointError(f"pos_embed has {pos_embed.shape[1]} entries, expected {M_old + int(class_token)} "
                              f"for a {old_grid} grid{' plus a class token' if class_token else ''}")
    if old_grid == new_grid:
        return pos_embed
    if class_token:
        i = M_old // 2
        cls, patches = pos_embed[:, i:i + 1], torch.cat([pos_embed[:, :i], pos_embed[:, i + 1:]], dim=1)
    else:
        patches = pos_embed
    out = resample_abs_pos_embed(patches.float(), list(new_grid), list(old_grid), num_prefix_tokens=0,
                                 interpolation="bicubic", antialias=False).to(pos_embed.dtype)
    if class_token:
        j = new_grid[0] * new_grid[1] // 2
        out = torch.cat([out[:, :j], cls, out[:, j:]], dim=1)
    return out


def _grid_of(n: int) -> tuple[int, int]:
    s = int(round(math.sqrt(n)))
    if s * s != n:
        raise CheckpointError(f"cannot infer a square patch grid from {n} position entries")
    return s, s


def checkpoint_filter_fn(state_dict: dict, model: VisionMamba, old_grid: tuple[int, int] | None = None) -> dict:
    """timm's ``pretrained_filter_fn``: unwraps ``model`` / ``state_dict``, strips ``module.``, resamples
    ``pos_embed`` to the model's patch grid (square source grid inferred unless ``old_grid``), resamples the
    patch-embedding kernel if the patch size differs (timm's resample_patch_embed), and drops ``head.*`` when the
    class count differs (the model keeps its fresh head)."""
    for k in ("model", "state_dict"):
        if isinstance(state_dict.get(k), dict):
            state_dict = state_dict[k]
    sd = {k.removeprefix("module."): v for k, v in state_dict.items() if isinstance(v, Tensor)}
    if "pos_embed" in sd:
        pe = sd["pos_embed"]
        n = pe.shape[1] - int(model.has_class_token)
        grid = tuple(old_grid) if old_grid else _grid_of(n)
        sd["pos_embed"] = resample_pos_embed(pe, grid, model.patch_embed.grid_size, model.has_class_token)
    w = sd.get("patch_embed.proj.weight")
    if w is not None and tuple(w.shape[-2:]) != model.patch_embed.proj.kernel_size:
        from timm.layers import resample_patch_embed
        sd["patch_embed.proj.weight"] = resample_patch_embed(w, list(model.patch_embed.proj.kernel_size))
    if w is not None and w.shape[1] != model.patch_embed.proj.in_channels:
        from timm.models import adapt_input_conv
        sd["patch_embed.proj.weight"] = adapt_input_conv(model.patch_embed.proj.in_channels,
                                                         sd["patch_embed.proj.weight"])
    head = model.get_classifier()
    if "head.weight" in sd and (not isinstance(head, nn.Linear) or sd["head.weight"].shape != head.weight.shape):
        sd.pop("head.weight")
        sd.pop("head.bias", None)
    return sd


def load_hustvl(path: str | Path, model: VisionMamba, use_ema: bool = False, old_grid=None) -> dict:
    """Load a hustvl/Vim checkpoint (or any state dict in its layout) into ``model``: position embedding
    resampled, head replaced when the class count differs. Everything else must match exactly; otherwise a
    CheckpointError names the file and the keys. Returns {"head_replaced": bool, "pos_embed_resampled": bool}."""
    raw = read_checkpoint(path, use_ema=use_ema)
    try:
        sd = checkpoint_filter_fn(raw, model, old_grid)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    own = model.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in sd.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(sd) - {"head.weight", "head.bias"})
    unexpected = sorted(set(sd) - set(own))
    if wrong or missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(model).__name__}(embed_dim={model.embed_dim}, depth={model.depth})"
            + (f"; shape mismatches: {wrong[:5]}" if wrong else "")
            + (f"; missing: {missing[:8]}{' ...' if len(missing) > 8 else ''}" if missing else "")
            + (f"; unexpected: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}" if unexpected else ""))
    model.load_state_dict(sd, strict=False)
    return {"head_replaced": "head.weight" not in sd and isinstance(model.head, nn.Linear),
            "pos_embed_resampled": raw.get("pos_embed") is not None and raw["pos_embed"].shape != model.pos_embed.shape}


# --- our own exported format: config.json (timm name + kwargs + class names + data config) + safetensors ----------

def save_vision_model(model: nn.Module, path: str | Path, model_name: str, model_kwargs: dict,
                      class_names: list[str] | None = None, extra: dict | None = None,
                      data_config: dict | None = None) -> Path:
    """Write ``path/config.json`` and ``path/model.safetensors``; ``load_vision_model`` rebuilds the model with
    ``timm.create_model(model_name, **model_kwargs)`` (any timm model: Vim or the DeiT baseline). data_config:
    the preprocessing the model was trained with (input size, mean / std, crop, interpolation); default the
    model's timm data config."""
    from safetensors.torch import save_file
    from timm.data import resolve_data_config

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    num_classes = getattr(model, "num_classes", None)
    if class_names is not None and num_classes is not None and len(class_names) != num_classes:
        raise ValueError(f"save_vision_model: {len(class_names)} class names for a {num_classes}-class model")
    data_cfg = dict(resolve_data_config({}, model=model), **(data_config or {}))
    cfg = {"model": model_name, "model_kwargs": dict(model_kwargs, num_classes=num_classes),
           "class_names": class_names, "data_config": {k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in data_cfg.items()}, **(extra or {})}
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # each file atomically, config.json last: a folder with config.json is complete; usual umask permissions
    atomic_write(path / WEIGHTS_NAME, lambda p: save_file(sd, p, metadata={"format": "pt"}))
    atomic_write(path / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(cfg, indent=2) + "\n"))
    return path


def read_any(path: str | Path, use_ema: bool = False) -> tuple[dict[str, Tensor], dict]:
    """(state dict, config) of a ``save_vision_model`` folder, a Lightning ``.ckpt`` of apps.vision.train, or a
    hustvl ``.pth`` / safetensors state dict in its layout (the Vim variant inferred from the shapes). config:
    {"model", "model_kwargs" (with num_classes), "class_names", "data_config"}."""
    path = Path(path)
    if path.is_dir():
        cfg_file = path / CONFIG_NAME
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: not a checkpoint folder written by "
                                    "apps.vision (save_vision_model)")
        try:
            cfg = json.loads(cfg_file.read_text())
            cfg["model"], cfg["model_kwargs"] = str(cfg["model"]), dict(cfg["model_kwargs"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{cfg_file}: unreadable config ({e})") from None
        return read_checkpoint(path / WEIGHTS_NAME), cfg
    if path.suffix == ".ckpt":
        ckpt = read_lightning_checkpoint(path)  # weights only; errors name the file
        hp = ckpt.get("hyper_parameters", {})
        if "model_name" not in hp:
            raise CheckpointError(f"{path}: not a Lightning checkpoint of apps.vision.train (no model_name)")
        kwargs = dict(hp.get("model_kwargs") or {}, num_classes=hp["num_classes"])
        sd = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
        return sd, {"model": hp["model_name"], "model_kwargs": kwargs, "class_names": hp.get("class_names"),
                    "data_config": hp.get("data_config")}
    sd = read_checkpoint(path, use_ema=use_ema)
    name, kwargs = infer_vim_variant(sd, path)
    return sd, {"model": name, "model_kwargs": kwargs, "class_names": None, "data_config": None}


def load_weights_into(model: nn.Module, sd: dict[str, Tensor], source_kwargs: dict, path: str | Path,
                      source_name: str | None = None) -> bool:
    """Load ``sd`` (from ``read_any``) into ``model``: Vim position embeddings resampled to the model's grid,
    the head left fresh when its shape differs. Returns whether the head was replaced; anything else that does
    not fit is a CheckpointError naming ``path``."""
    if isinstance(model, VisionMamba):
        old_grid = None
        if source_name is not None and "pos_embed" in sd:
            with torch.device("meta"):
                src = create_vision_model(source_name, **dict(source_kwargs, num_classes=0))
            old_grid = src.patch_embed.grid_size
        try:
            sd = checkpoint_filter_fn(sd, model, old_grid)
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint {path}: {e}") from None
    else:
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        own = model.state_dict()
        sd = {k: v for k, v in sd.items() if not (k in own and own[k].shape != v.shape and head is not None
                                                   and k.startswith(model.pretrained_cfg.get("classifier", "head")))}
    own = model.state_dict()
    wrong = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"checkpoint {path}: shapes differ from the model for {wrong[:6]}")
    result = model.load_state_dict(sd, strict=False)
    head_prefix = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    bad = [k for k in result.missing_keys if not k.startswith(head_prefix + ".")] + list(result.unexpected_keys)
    if bad:
        raise CheckpointError(f"checkpoint {path} does not fit {type(model).__name__}: keys {bad[:8]}")
    return bool(result.missing_keys)


def load_vision_model(path: str | Path, num_classes: int | None = None, use_ema: bool = False,
                      **overrides) -> tuple[nn.Module, dict]:
    """(model in eval mode, config) from anything ``read_any`` reads. ``num_classes`` different from the
    checkpoint's gives a fresh head (fine-tuning); ``overrides`` go to timm.create_model (img_size=, ...)."""
    sd, cfg = read_any(path, use_ema=use_ema)
    name, src_kwargs = cfg["model"], dict(cfg["model_kwargs"])
    kwargs = dict(src_kwargs, **overrides)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = create_vision_model(name, **kwargs)
    apply_data_config(model, cfg.get("data_config"))
    replaced = load_weights_into(model, sd, src_kwargs, path, name)
    if replaced and num_classes is None:
        raise CheckpointError(f"checkpoint {path} has no classifier head for {name}")
    if replaced:
        cfg["class_names"] = None
    cfg["model_kwargs"] = kwargs
    return model.eval(), cfg


def apply_data_config(model: nn.Module, data_config: dict | None) -> None:
    """Make ``timm.data.resolve_data_config(model=model)`` return the preprocessing a checkpoint was trained with
    (its mean / std / crop / interpolation; the input size stays the model's own)."""
    if not data_config:
        return
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    for k in ("mean", "std", "interpolation", "crop_pct", "crop_mode"):
        if data_config.get(k) is not None:
            cfg[k] = tuple(data_config[k]) if k in ("mean", "std") else data_config[k]
    c = getattr(model, "in_chans", None) or cfg.get("input_size", (3,))[0]
    if len(cfg.get("mean", ())) != c:  # a grey checkpoint's statistics for an RGB model or the reverse
        return
    if "input_size" not in cfg and data_config.get("input_size"):
        cfg["input_size"] = tuple(data_config["input_size"])
    model.pretrained_cfg = model.default_cfg = cfg


def infer_vim_variant(sd: dict[str, Tensor], path: str | Path = "checkpoint") -> tuple[str, dict]:
    """(timm name, kwargs) for a state dict in hustvl's layout, from its shapes: width, depth, patch size,
    stride (from the position-embedding count at the patch size), class token, d_state, expand, classes."""
    try:
        w = sd["patch_embed.proj.weight"]
        embed_dim, in_chans, patch = w.shape[0], w.shape[1], w.shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
        d_state = sd["layers.0.mixer.A_log"].shape[1]
        expand = sd["layers.0.mixer.A_log"].shape[0] // embed_dim
        class_token = "cls_token" in sd
        n = sd["pos_embed"].shape[1] - int(class_token)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is not in hustvl/Vim's layout (missing {e})") from None
    side = _grid_of(n)[0]
    # the grid alone does not fix the stride: prefer the (stride, size) that gives hustvl's 224, else stride = patch
    options = [(s, (side - 1) * s + patch) for s in (patch, patch // 2)]
    stride, size = next((o for o in options if o[1] == 224), options[0])
    name = {192: "vim_tiny", 384: "vim_small", 768: "vim_base"}.get(embed_dim, "vim_tiny")
    name += "_patch16" + ("_stride8" if stride == patch // 2 else "") + "_224"  # kwargs carry the exact shape
    kwargs = {"embed_dim": embed_dim, "depth": depth, "patch_size": patch, "stride": stride, "img_size": size,
              "in_chans": in_chans, "d_state": d_state, "expand": expand, "class_token": class_token,
              "num_classes": sd["head.weight"].shape[0] if "head.weight" in sd else 0}
    if not class_token:
        kwargs["global_pool"] = "mean"
    return name, kwargs


# --- timm registration -----------------------------------------------------------------------------------------

def _cfg(hf_hub_id: str = "", hf_hub_filename: str = "", **kwargs) -> dict:
    return {"url": "", "hf_hub_id": hf_hub_id or None, "hf_hub_filename": hf_hub_filename or None,
            "custom_load": "hf" if hf_hub_id else False,  # hustvl .pth: our weights-only loader, not timm's
            "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
            "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head",
            "license": "apache-2.0", "paper_ids": "arXiv:2401.09417", **kwargs}


default_cfgs = generate_default_cfgs({
    "vim_tiny_patch16_224.hustvl_in1k": _cfg("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth"),
    "vim_small_patch16_224.hustvl_in1k": _cfg("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth"),
    "vim_base_patch16_224.hustvl_in1k": _cfg("hustvl/Vim-base-midclstok", "vim_b_midclstok_81p9acc.pth"),
    "vim_tiny_patch16_stride8_224.hustvl_in1k": _cfg("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_ft_78p3acc.pth"),
    "vim_small_patch16_stride8_224.hustvl_in1k": _cfg("hustvl/Vim-small-midclstok",
                                                      "vim_s_midclstok_ft_81p6acc.pth"),
    "vim_base_patch16_stride8_224": _cfg(),
})


def _create_vim(variant: str, pretrained: bool = False, **kwargs) -> VisionMamba:
    # timm rebuilds the cfg from an overlay and drops custom_load: keep our weights-only hustvl loader in charge
    if kwargs.get("pretrained_cfg_overlay") is not None:
        kwargs["pretrained_cfg_overlay"] = {"custom_load": "hf", **kwargs["pretrained_cfg_overlay"]}
    # hustvl's .pth files hold an argparse.Namespace: allow exactly that class for weights-only loading
    with torch.serialization.safe_globals([argparse.Namespace]):
        model = build_model_with_cfg(VisionMamba, variant, pretrained,
                                     pretrained_filter_fn=checkpoint_filter_fn, **kwargs)
    return sync_data_config(model)


def sync_data_config(model: nn.Module) -> nn.Module:
    """Make a timm model's ``pretrained_cfg`` (what timm.data.resolve_data_config reads) follow the model actually
    built: timm keeps the pretrained input size (3, 224, 224) even for ``img_size=28, in_chans=1``. Models with a
    ``patch_embed`` (Vim, ViT / DeiT) get their real input size; channel statistics are averaged for grey input."""
    pe = getattr(model, "patch_embed", None)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if pe is None or not cfg or getattr(pe, "img_size", None) is None:
        return model
    chans = getattr(pe, "in_chans", None) or pe.proj.in_channels
    cfg["input_size"] = (chans, *_pair(pe.img_size))
    if "mean" in cfg and len(cfg["mean"]) != chans:
        cfg["mean"] = (sum(cfg["mean"]) / len(cfg["mean"]),) * chans
        cfg["std"] = (sum(cfg["std"]) / len(cfg["std"]),) * chans
    model.pretrained_cfg = model.default_cfg = cfg
    return model


def _vim(variant: str, defaults: dict, pretrained: bool, kwargs: dict) -> VisionMamba:
    return _create_vim(variant, pretrained, **dict(defaults, **kwargs))


_TINY = {"patch_size": 16, "embed_dim": 192, "depth": 24}
_SMALL = {"patch_size": 16, "embed_dim": 384, "depth": 24}
_BASE = {"patch_size": 16, "embed_dim": 768, "depth": 24}


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Ti: 7M parameters, ImageNet-1k top-1 76.1 (hustvl)."""
    return _vim("vim_tiny_patch16_224", _TINY, pretrained, kwargs)


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S: 26M parameters, top-1 80.5 (hustvl)."""
    return _vim("vim_small_patch16_224", _SMALL, pretrained, kwargs)


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-B: 98M parameters, top-1 81.9 (hustvl, EMA weights)."""
    return _vim("vim_base_patch16_224", _BASE, pretrained, kwargs)


@register_model
def vim_tiny_patch16_stride8_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-Ti long-sequence fine-tune (stride 8: 729 patches at 224), top-1 78.3 (hustvl)."""
    return _vim("vim_tiny_patch16_stride8_224", dict(_TINY, stride=8), pretrained, kwargs)


@register_model
def vim_small_patch16_stride8_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S long-sequence fine-tune (stride 8), top-1 81.6 (hustvl)."""
    return _vim("vim_small_patch16_stride8_224", dict(_SMALL, stride=8), pretrained, kwargs)


@register_model
def vim_base_patch16_stride8_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-B at stride 8 (no hustvl weights released for it)."""
    return _vim("vim_base_patch16_stride8_224", dict(_BASE, stride=8), pretrained, kwargs)

