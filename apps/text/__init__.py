"""hiss text: byte-level language modelling (MambaByte) on ssm_core.

data.py (bytes of any files, split by file; PG19 / enwik8) -> model.py (TextLMModule) -> train.py (LightningCLI)
-> evaluate.py (exact bits/byte in chunks) -> generate.py (streaming, UTF-8 safe, state cartridges, speculative
decoding) -> demo.py (Gradio); compare.py: Mamba vs a same-size Transformer at equal CPU time.
"""
