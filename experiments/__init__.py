"""hiss.experiments: reproductions of published experiments on ssm_core (run from a checkout, not installed).

``experiments.synthetic``: the Mamba paper's synthetic tasks (selective copying, induction heads). Speed
measurements live in ``benchmarks/``. Dependency rule: experiments -> apps, ssm_core; nothing imports
experiments.
"""
