"""apps/audio with complex-A blocks (``lti_complex`` / ``mamba_complex``): the config builds them, the
recurrent step equals the parallel forward, checkpoints round-trip, and generation takes the Python step."""

from __future__ import annotations

import pytest
import torch

from apps.audio.fast import fast_unavailable_reason
from apps.audio.model import AudioUNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(blocks, seed: int = 0) -> AudioUNet:
    torch.manual_seed(seed)
    return AudioUNet(UNetConfig(d_model=8, n_layers=[1, 1, 1], ssm_cfg={"d_state": 4}, blocks=blocks)).eval()


def test_outer_level_blocks_are_complex_lti():
    model = tiny(["lti_complex", "mamba", "mamba"])
    outer = [b.mixer for b in list(model.down[0]) + list(model.up[0])]
    assert outer and all(m.complex_A and not m.selective for m in outer)
    assert all(not b.mixer.complex_A for b in model.center)
    with pytest.raises(ValueError, match="unknown block kind"):
        UNetConfig(blocks="lti_cplx")


@pytest.mark.parametrize("blocks", [["lti_complex", "mamba", "lti"], "mamba_complex"])
def test_step_equals_parallel_and_checkpoint_round_trips(blocks, tmp_path):
    model = tiny(blocks)
    tokens = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        ref = model(tokens).logits
        state = model(tokens[:, :16], return_state=True).state
        got = []
        for t in range(16, 48):
            logits, state = model.step(tokens[:, t], state)
            got.append(logits)
    assert float((torch.stack(got, 1) - ref[:, 16:]).abs().max()) <= 1e-4
    again = AudioUNet.from_pretrained(model.save_pretrained(tmp_path / "m")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, ref)


def test_compiled_audio_step_refuses_complex_models_and_generation_falls_back():
    from apps.audio.generate import generate

    model = tiny(["lti_complex", "mamba", "mamba"])
    assert "complex" in fast_unavailable_reason(model)
    assert generate(model, 2, 40 / 16000, seed=0).shape == (2, 40)  # the Python step, without complaint
