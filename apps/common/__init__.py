"""The app kit: what every hiss app shares, so a new domain is a data module, a network and a config.

    optim        AdamW with mamba_ssm's no-decay groups, warm-up + cosine (the one optimizer recipe)
    lm           CausalLMModule: next-token training of an ssm_core language model
    classify     pooling, HeadConfig, ClassifierModule (handed its network), head.json checkpoints
    callbacks    ExportPretrained, CPUTimeBudget, HeldOutEvaluation (the app supplies the evaluation),
                 LastCheckpoint (last.ckpt every N steps / minutes, atomic: a crash loses one interval)
    data         ResumableLoader: training data a resumed run continues mid-epoch
    checkpoint   load_model: exported folders, classifier folders, Lightning .ckpt files
    evaluate     read_pieces / prefill / sequence_nll: any length, the state carried across pieces
    cli          cli_main: LightningCLI with ``fit`` implied and the app's default YAML
    errors       run_cli: one clear line for a user's mistake, the traceback behind --debug
    demo         Gradio glue: 127.0.0.1 only, analytics off, input caps, checkpoint lookup
    paths        repository root, bundled samples, runs/<app>/pretrained, resolve_checkpoint (yours, else shipped)
    baselines    transformer_like: a parameter-matched Transformer config

SSM maths lives in ssm_core, not here; anything specific to one domain lives in that app.
"""

from .baselines import transformer_like
from .callbacks import CPUTimeBudget, ExportPretrained, HeldOutEvaluation, LastCheckpoint
from .checkpoint import load_model
from .classify import ClassifierModule, HeadConfig, pool, pooled_width
from .data import ResumableLoader
from .evaluate import bits_per_token, prefill, read_pieces, sequence_nll
from .lm import CausalLMModule
from .optim import adamw_warmup_cosine, param_groups, warmup_cosine

__all__ = [
    "CausalLMModule", "ClassifierModule", "HeadConfig", "pool", "pooled_width",
    "ExportPretrained", "CPUTimeBudget", "HeldOutEvaluation", "LastCheckpoint", "ResumableLoader", "load_model",
    "read_pieces", "prefill", "sequence_nll", "bits_per_token",
    "adamw_warmup_cosine", "param_groups", "warmup_cosine", "transformer_like",
]
