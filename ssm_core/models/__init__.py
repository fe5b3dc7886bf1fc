from .checkpoint import load_pretrained, save_pretrained
from .config import MambaConfig
from .mixer_seq import LMOutput, MambaLMHeadModel, MixerModel

__all__ = ["MambaConfig", "MambaLMHeadModel", "MixerModel", "LMOutput", "save_pretrained", "load_pretrained"]
