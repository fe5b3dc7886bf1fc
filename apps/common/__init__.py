"""Glue every app shares: the causal-LM LightningModule, the LightningCLI entry point, chunked evaluation,
parameter-matched baselines and the Gradio launcher. SSM maths lives in ssm_core, not here."""

from .baselines import transformer_like
from .evaluate import bits_per_token, sequence_nll
from .lm import CausalLMModule, ExportPretrained

__all__ = ["CausalLMModule", "ExportPretrained", "bits_per_token", "sequence_nll", "transformer_like"]
