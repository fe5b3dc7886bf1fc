"""Functional ops, each beside its ``*_ref`` reference twin."""

from .conv import causal_conv1d, causal_conv1d_update
from .norm import RMSNorm, RMSNormGated, rms_norm, rms_norm_gated
from .selective_scan import (
    selective_scan,
    selective_scan_ref,
    selective_state_update,
    selective_state_update_ref,
)
from .ssd import mamba_chunk_scan_combined, ssd_ref

__all__ = [
    "causal_conv1d", "causal_conv1d_update", "RMSNorm", "RMSNormGated", "rms_norm", "rms_norm_gated",
    "selective_scan", "selective_scan_ref", "selective_state_update", "selective_state_update_ref",
    "mamba_chunk_scan_combined", "ssd_ref",
]
