"""ssm_core: the shared selective state-space (Mamba) core of hiss.

ops (functional, with ``*_ref`` twins) -> modules (Mamba, Mamba2, Bidirectional, ...) ->
models (MambaConfig, MambaLMHeadModel) and one state API (SSMState, ModelState, cartridges).
"""

from .io import CorruptFileError, atomic_write, read_safetensors
from .models import (
    ChunkedLoss,
    LMOutput,
    MambaConfig,
    MambaLMHeadModel,
    MixerModel,
    SpecStats,
    chunked_lm_loss,
    speculative_stream,
)
from .modules import MHA, Bidirectional, BiMambaV2, Block, GatedMLP, Mamba, Mamba2
from .ops import (
    RMSNorm,
    RMSNormGated,
    causal_conv1d,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
    complex_scan,
    complex_scan_ref,
    mamba_chunk_scan_combined,
    rms_norm,
    rms_norm_gated,
    rms_norm_ref,
    selective_scan,
    selective_scan_ref,
    selective_scan_time_major,
    selective_scan_time_major_ref,
    selective_state_update,
    selective_state_update_ref,
    ssd_ref,
)
from .state import AttentionState, ModelState, SSMState, load_state, save_state

__version__ = "0.1.0"

__all__ = [
    "MambaConfig", "MambaLMHeadModel", "MixerModel", "LMOutput", "ChunkedLoss", "chunked_lm_loss",
    "SpecStats", "speculative_stream",
    "Mamba", "Mamba2", "MHA", "Bidirectional", "Block", "GatedMLP", "BiMambaV2",
    "selective_scan", "selective_scan_ref", "selective_scan_time_major", "selective_scan_time_major_ref",
    "selective_state_update", "selective_state_update_ref",
    "complex_scan", "complex_scan_ref",
    "mamba_chunk_scan_combined", "ssd_ref", "causal_conv1d", "causal_conv1d_ref", "causal_conv1d_update",
    "causal_conv1d_update_ref", "RMSNorm", "RMSNormGated", "rms_norm", "rms_norm_ref", "rms_norm_gated",
    "SSMState", "AttentionState", "ModelState", "save_state", "load_state", "atomic_write",
    "read_safetensors", "CorruptFileError",
]
