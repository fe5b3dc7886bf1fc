"""Shared by the apps/audio tests: a tiny U-Net, and the skip for a model the compiled step cannot run."""

from __future__ import annotations

import pytest
import torch

from apps.audio.fast import fast_unavailable_reason
from apps.audio.model import AudioUNet, UNetConfig


def tiny(seed: int = 0, **kw) -> AudioUNet:
    torch.manual_seed(seed)
    cfg = dict(d_model=8, n_layers=[1, 1, 1], ssm_cfg={"d_state": 4})
    cfg.update(kw)
    return AudioUNet(UNetConfig(**cfg)).eval()


def needs_fast(model):
    reason = fast_unavailable_reason(model)
    if reason:
        pytest.skip(f"compiled step unavailable here: {reason}")
