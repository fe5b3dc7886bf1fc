"""apps/audio/fast.py's sampling inside the compiled step (many steps per call): greedy output equals the Python
step loop's exactly; the C++ sampler draws from softmax(filtered logits) (chi-square on many draws, top-k / top-p
truncation respected), reproducibly for a seed; rows, chunks and threads do not change a row's samples; models the
compiled step cannot run (complex A) fall back to the Python step."""

from __future__ import annotations

import math

import pytest
import torch
from audio_support import needs_fast, tiny

from apps.audio.fast import FastStepper, compiled_draws, fast_unavailable_reason
from apps.audio.generate import generate, stream
from ssm_core.models.sampling import filter_logits

pytestmark = pytest.mark.usefixtures("one_thread")


def tokens(model, n, batch, **kw) -> torch.Tensor:
    return torch.cat(list(stream(model, n, batch, **kw)), 1)


@pytest.mark.parametrize("kw", [{"n_classes": 10}, {"blocks": ["lti", "mamba", "lti"], "ff": 2, "unet": False},
                                {"pool": [2, 2, 4], "n_layers": 1, "d_model": 20}])
def test_greedy_compiled_equals_python_step_loop(kw):
    """Temperature 0: the compiled multi-step path (parallel prefix + C++ teacher forcing of the prompt's tail,
    then T steps per call with the argmax fed back) must give exactly the Python step loop's tokens. Batch 5 runs
    the batch-major tiles with a remainder row; threads=2 splits it into groups."""
    model = tiny(**kw)
    needs_fast(model)
    prompt = torch.randint(0, 256, (37,))
    label = torch.tensor([3, -1, 7, 0, 9]) if model.cond is not None else None
    ref = tokens(model, 70, 5, label=label, prompt=prompt, temperature=0.0, fast=False)
    for threads in (1, 2):
        got = tokens(model, 70, 5, label=label, prompt=prompt, temperature=0.0, fast=True, chunk=32,
                     threads=threads)
        assert torch.equal(got, ref)
    # top_k 1 is greedy too
    assert torch.equal(tokens(model, 70, 5, label=label, prompt=prompt, top_k=1, chunk=70), ref)


def test_sampled_rows_do_not_depend_on_batch_chunks_or_threads():
    """A row's generator depends on (seed, row) only, and rows never mix: the same row gets the same samples
    whatever the batch size, the chunking of the calls and the number of threads."""
    model = tiny(d_model=16)
    needs_fast(model)
    kw = dict(temperature=0.9, top_p=0.95, seed=11)
    a = tokens(model, 90, 6, chunk=1600, **kw)
    assert torch.equal(tokens(model, 90, 6, chunk=13, threads=2, **kw), a)
    assert torch.equal(tokens(model, 90, 1, chunk=40, **kw)[0], a[0])
    assert not torch.equal(a[0], a[1])  # rows draw independently
    assert not torch.equal(tokens(model, 90, 6, temperature=0.9, top_p=0.95, seed=12), a)


def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson's statistic over the categories with probability > 0, and a bound 6 standard deviations above
    its mean (df) under the null: a false alarm is ~1e-8 likely."""
    keep = probs > 0
    n = counts.sum()
    expected = probs[keep] * n
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    df = int(keep.sum()) - 1
    return stat, df + 6 * math.sqrt(2 * df)


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9),
                                      dict(temperature=1.3, top_k=40), dict(temperature=1.0, top_k=60, top_p=0.8)])
def test_compiled_sampler_draws_from_the_softmax(settings):
    torch.manual_seed(0)
    logits = torch.randn(256) * 2.5
    needs_fast(tiny())
    n = 200_000
    draws = compiled_draws(logits, n, seed=5, **settings)
    probs = filter_logits(logits[None], **settings)[0].softmax(-1).double()
    counts = torch.bincount(draws, minlength=256).double()
    assert int(counts[probs == 0].sum()) == 0, "a token outside top-k / the top-p nucleus was drawn"
    stat, bound = chi_square_ok(counts, probs)
    assert stat < bound, f"chi-square {stat:.1f} >= {bound:.1f}"
    tv = 0.5 * float((counts / n - probs).abs().sum())
    assert tv < 0.03
    assert torch.equal(compiled_draws(logits, 1000, seed=5, **settings), draws[:1000])  # reproducible
    assert not torch.equal(compiled_draws(logits, 1000, seed=6, **settings), draws[:1000])


def test_compiled_sampler_greedy_and_bad_settings():
    needs_fast(tiny())
    logits = torch.tensor([0.0, 3.0, 3.0, -1.0])
    assert compiled_draws(logits, 5, temperature=0.0).tolist() == [1] * 5  # first maximum, as torch.argmax
    with pytest.raises(ValueError):
        compiled_draws(logits, 5, temperature=-1.0)
    with pytest.raises(ValueError):
        compiled_draws(logits, 5, top_p=1.5)


def test_stepper_sample_feed_and_errors():
    model = tiny()
    needs_fast(model)
    st = FastStepper(model, model.empty_state(2), seed=0)
    with pytest.raises(RuntimeError, match="no logits"):
        st.sample(3)
    st.feed(torch.full((2, 5), 128))
    assert st.t == 5
    out = st.sample(10, temperature=0.0)
    assert out.shape == (2, 10) and st.t == 15
    out = st.sample(4, temperature=0.0, feed_last=False)
    assert st.t == 18
    with pytest.raises(ValueError, match="out of range"):
        st.feed(torch.tensor([[1], [300]]))


def test_complex_models_are_refused_and_fall_back():
    from apps.audio.model import BLOCK_KINDS

    if "lti_complex" not in BLOCK_KINDS:  # before the complex-A blocks exist: the check reads the attribute
        model = tiny()
        model.blocks_in_order()[0].mixer.complex_A = True
        assert "complex" in fast_unavailable_reason(model)
        return
    model = tiny(blocks=["lti_complex", "mamba", "mamba"])
    assert "complex" in fast_unavailable_reason(model)
    wav = generate(model, 2, 50 / 16000, seed=0)  # the Python step, without complaint
    assert wav.shape == (2, 50)


PORTABLE_CHECK = """
import torch
from apps.audio.fast import FastStepper, build_info
from apps.audio.model import AudioUNet, UNetConfig
torch.manual_seed(0)
model = AudioUNet(UNetConfig(d_model=8, n_layers=[1, 1, 1], ssm_cfg={"d_state": 4}, n_classes=3)).eval()
tokens = torch.randint(0, 256, (5, 64))
with torch.no_grad():
    ref = model(tokens, label=1).logits
    state = model(tokens[:, :16], label=1, return_state=True).state
st = FastStepper(model, state, 1)
got = torch.stack([st.step(tokens[:, t]) for t in range(16, 64)], 1)
assert float((got - ref[:, 16:]).abs().max()) <= 1e-4
assert build_info().startswith("portable"), build_info()
print("ok", build_info())
"""


def test_portable_build_matches_the_forward(tmp_path):
    """HISS_AUDIO_STEP_PORTABLE=1 (also the fallback when -march=native does not build): the baseline-ISA
    library, in its own cache folder, gives the same logits."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    needs_fast(tiny())
    env = dict(os.environ, HISS_AUDIO_STEP_PORTABLE="1", HISS_AUDIO_STEP_CACHE=str(tmp_path), OMP_NUM_THREADS="1")
    root = Path(__file__).resolve().parents[3]
    r = subprocess.run([sys.executable, "-c", PORTABLE_CHECK], cwd=root, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ok portable" in r.stdout
