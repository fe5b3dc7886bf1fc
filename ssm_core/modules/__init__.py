from .bidirectional import Bidirectional
from .block import Block
from .mamba import Mamba
from .mamba2 import Mamba2
from .mha import MHA
from .mlp import GatedMLP
from .vim import BiMambaV2

__all__ = ["Bidirectional", "Block", "Mamba", "Mamba2", "MHA", "GatedMLP", "BiMambaV2"]
