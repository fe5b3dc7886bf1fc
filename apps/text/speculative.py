"""Moved: speculative decoding is a model-level feature of ssm_core (``ssm_core.models.speculative``, also
``MambaLMHeadModel.generate(..., draft=...)``). This module only re-exports it until apps/text switches over."""

from ssm_core.models.speculative import *  # noqa: F403
from ssm_core.models.speculative import __all__  # noqa: F401
