"""apps.text: byte-level language modelling (MambaByte) on ssm_core.

data (bytes of any files, split by file) -> train (LightningCLI) -> evaluate (exact bits/byte in chunks)
-> generate (streaming, UTF-8 safe, state cartridges, speculative decoding) -> demo (Gradio).
"""
