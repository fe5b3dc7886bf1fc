"""Functional ops, each beside its ``*_ref`` reference twin."""

from .complex_scan import complex_scan, complex_scan_ref, complex_state_update
from .conv import (
    causal_conv1d,
    causal_conv1d_ref,
    causal_conv1d_time_major,
    causal_conv1d_update,
    causal_conv1d_update_ref,
)
from .norm import RMSNorm, RMSNormGated, rms_norm, rms_norm_gated, rms_norm_ref
from .selective_scan import (
    selective_scan,
    selective_scan_ref,
    selective_scan_time_major,
    selective_scan_time_major_ref,
    selective_state_update,
    selective_state_update_ref,
)
from .ssd import mamba_chunk_scan_combined, ssd_ref

__all__ = [
    "complex_scan", "complex_scan_ref", "complex_state_update",
    "causal_conv1d", "causal_conv1d_ref", "causal_conv1d_time_major", "causal_conv1d_update",
    "causal_conv1d_update_ref",
    "RMSNorm", "RMSNormGated", "rms_norm", "rms_norm_ref", "rms_norm_gated",
    "selective_scan", "selective_scan_ref", "selective_scan_time_major", "selective_scan_time_major_ref",
    "selective_state_update", "selective_state_update_ref",
    "mamba_chunk_scan_combined", "ssd_ref",
]
