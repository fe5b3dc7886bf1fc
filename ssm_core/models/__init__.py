from .checkpoint import load_pretrained, save_pretrained
from .config import MambaConfig
from .fast_decode import FastDecoder
from .long_context import ChunkedLoss, chunked_lm_loss
from .mixer_seq import LMOutput, MambaLMHeadModel, MixerModel
from .speculative import SpecStats, speculative_stream

__all__ = ["MambaConfig", "MambaLMHeadModel", "MixerModel", "LMOutput", "ChunkedLoss", "chunked_lm_loss",
           "save_pretrained", "load_pretrained", "SpecStats", "speculative_stream", "FastDecoder"]
