"""ssm_core: the shared selective state-space (Mamba) core of hiss.

ops (functional, with ``*_ref`` twins) -> modules (Mamba, Mamba2, Bidirectional, ...) ->
models (MambaConfig, MambaLMHeadModel) and one state API (SSMState, ModelState, cartridges).
"""

from .models import ChunkedLoss, LMOutput, MambaConfig, MambaLMHeadModel, MixerModel, chunked_lm_loss
from .modules import MHA, Bidirectional, Block, GatedMLP, Mamba, Mamba2
from .ops import (
    RMSNorm,
    RMSNormGated,
    causal_conv1d,
    causal_conv1d_update,
    mamba_chunk_scan_combined,
    rms_norm,
    rms_norm_gated,
    selective_scan,
    selective_scan_ref,
    selective_state_update,
    selective_state_update_ref,
    ssd_ref,
)
from .state import AttentionState, ModelState, SSMState, load_state, save_state

__version__ = "0.1.0"

__all__ = [
    "MambaConfig", "MambaLMHeadModel", "MixerModel", "LMOutput", "ChunkedLoss", "chunked_lm_loss",
    "Mamba", "Mamba2", "MHA", "Bidirectional", "Block", "GatedMLP",
    "selective_scan", "selective_scan_ref", "selective_state_update", "selective_state_update_ref",
    "mamba_chunk_scan_combined", "ssd_ref", "causal_conv1d", "causal_conv1d_update",
    "RMSNorm", "RMSNormGated", "rms_norm", "rms_norm_gated",
    "SSMState", "AttentionState", "ModelState", "save_state", "load_state",
]
