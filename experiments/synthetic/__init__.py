"""The Mamba paper's synthetic tasks on CPU (Gu & Dao 2023, section 4.1): selective copying (Table 1) and
induction heads with length extrapolation (Table 2).

    python -m experiments.synthetic train --task induction --model mamba   # -> checkpoints/induction_mamba here
    python -m experiments.synthetic eval  --task induction --model mamba   # accuracy at 2^6 ... 2^20
    python -m experiments.synthetic report                                  # markdown tables + docs/img plots

Models (2 layers, d_model 64, vocabulary 16): ``mamba`` (Mamba-1, S6), ``mamba2`` (SSD), ``lti`` (the Mamba
block with selection off, ssm_cfg selective=False: the paper's "S4" layer inside the Mamba architecture) and
``attention`` (a parameter-matched RoPE Transformer, apps.common.baselines.transformer_like).

Both tasks put their targets at the last K positions (K = 1 for induction, 16 for copying), so training and
evaluation only ever form the last K logits; long sequences are read in pieces with the recurrent state
(a key/value cache for attention) carried across, so memory stays bounded at L = 2^20.

Modules: ``tasks`` (batches, the training stream), ``model`` (configs, the LightningModule), ``train``
(``TrainSpec``, ``train``), ``evaluate`` (accuracy per length), ``mechanism`` (Δ through the Mamba block's
public delta hook: capture, selectivity, floor), ``report`` (tables, plots), ``records`` (checkpoint folders
and their JSON records), ``__main__`` (the CLI).
"""
