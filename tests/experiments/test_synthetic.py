"""experiments.synthetic: the task formats, a fast selective-copying run (selection beats the LTI ablation) and
the committed checkpoints reproducing their recorded accuracy."""

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from apps.common.optim import param_groups
from experiments.synthetic.evaluate import evaluate, last_logits
from experiments.synthetic.mechanism import capture_delta, delta_selectivity
from experiments.synthetic.records import CHECKPOINTS
from experiments.synthetic.tasks import (
    N_DATA,
    NOISE,
    RECALL,
    TRIGGER,
    VOCAB,
    copying_batch,
    induction_batch,
    write_mask,
)
from experiments.synthetic.train import SPECS, train
from ssm_core import MambaConfig, MambaLMHeadModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("L", [8, 64, 257])
def test_induction_format(L):
    ids, targets = induction_batch(200, L, torch.Generator().manual_seed(L))
    assert ids.shape == (200, L) and targets.shape == (200, 1)
    assert ids.min() >= 0 and ids.max() < VOCAB
    for row, key in zip(ids, targets[:, 0]):
        where = (row == TRIGGER).nonzero().flatten().tolist()
        assert len(where) == 2 and where[1] == L - 1  # one trigger in the body, one at the end
        p = where[0]
        assert p + 1 < L // 2  # trigger and key in the first half
        assert row[p + 1] == key and key != TRIGGER


@pytest.mark.parametrize("L, n_data", [(16, 16), (300, 16), (40, 5)])
def test_copying_format(L, n_data):
    ids, targets = copying_batch(100, L, torch.Generator().manual_seed(L), n_data)
    assert ids.shape == (100, L + n_data) and targets.shape == (100, n_data)
    assert (ids[:, L:] == RECALL).all() and not (ids[:, :L] == RECALL).any()
    data = ids[:, :L]
    assert ((data == NOISE) | (data > RECALL)).all()
    for row, tgt in zip(data, targets):
        assert torch.equal(row[row != NOISE], tgt)  # the data tokens, in order
    assert targets.min() > RECALL and targets.max() < VOCAB


def test_generators_are_seeded():
    a = copying_batch(4, 64, torch.Generator().manual_seed(3))
    b = copying_batch(4, 64, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_last_logits_in_pieces_equals_one_shot():
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=VOCAB)).eval()
    ids, _ = copying_batch(2, 70, torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits[:, -N_DATA:, :VOCAB]
    # 86 tokens in pieces of 32: 32 + 32 + 22, the 22-token tail holds the 16 targets
    torch.testing.assert_close(last_logits(model, ids, N_DATA, chunk_len=32), full, rtol=1e-4, atol=1e-5)
    # a 6-token tail would not hold the 16 targets: merged into the previous piece
    torch.testing.assert_close(last_logits(model, ids, N_DATA, chunk_len=40), full, rtol=1e-4, atol=1e-5)


def test_write_mask_marks_the_key_and_the_data():
    ids, targets = induction_batch(16, 64, torch.Generator().manual_seed(1))
    mask = write_mask("induction", ids)
    assert mask.sum(1).eq(1).all()
    assert torch.equal(ids[mask], targets[:, 0])  # the key is what the last position must recall
    assert torch.equal(ids.roll(1, dims=1)[mask], torch.zeros(16, dtype=torch.long))  # right after the trigger
    ids, targets = copying_batch(16, 64, torch.Generator().manual_seed(1))
    mask = write_mask("copying", ids)
    assert torch.equal(ids[mask].view(16, N_DATA), targets)


def test_delta_selectivity_separates_trained_from_random():
    """A random model's Δ hardly depends on the token (horizon ~ 1); the committed induction model writes the
    key with a Δ hundreds of times its Δ elsewhere: the quantity that bounds how far it extrapolates."""
    torch.manual_seed(0)
    random_model = MambaLMHeadModel(MambaConfig(d_model=64, n_layer=2, vocab_size=VOCAB)).eval()
    with torch.no_grad():
        rows = delta_selectivity(random_model, "induction", 256, n=16)
    assert [r["layer"] for r in rows] == [0, 1]
    assert max(r["horizon"] for r in rows) < 5, rows
    trained = MambaLMHeadModel.from_pretrained(CHECKPOINTS / "induction_mamba").eval()
    rows = delta_selectivity(trained, "induction", 256, n=16)
    assert rows[0]["horizon"] > 256, rows  # at least the training length
    assert rows[0]["delta_write"] > 10 * rows[0]["delta_other"]


def test_capture_delta_is_differentiable_and_restores_the_layers():
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=VOCAB))
    ids, _ = induction_batch(2, 24, torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    with capture_delta(model) as deltas:
        model(ids)
    assert [(tuple(d.shape), tuple(x.shape)) for d, x in deltas] == [((2, 24, 32), (2, 24, 32))] * 2
    torch.stack([d.mean() for d, _ in deltas]).sum().backward()
    for layer in model.backbone.layers:  # the L1 penalty on Δ pushes every dt bias down
        assert (layer.mixer.dt_proj.bias.grad > 0).all()
    with torch.no_grad():  # the hooks are gone: the plain forward, bit for bit
        assert torch.equal(model(ids).logits, before)


def test_delta_floor_cuts_the_memory():
    """With every Δ floored to 0 the SSM state never changes: the last logits see only the convolutions'
    reach (2 layers x 3 steps back), so a change at position 0 of 24 tokens cannot reach them."""
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=VOCAB)).eval()
    ids, _ = induction_batch(1, 24, torch.Generator().manual_seed(0))
    other = ids.clone()
    other[0, 0] = 1 + ids[0, 0] % (VOCAB - 1)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits[:, -1], model(other).logits[:, -1])
        with capture_delta(model, floor=float("inf")) as deltas:
            a, b = model(ids).logits[:, -1], model(other).logits[:, -1]
    assert all(bool((d == 0).all()) for d, _ in deltas)
    torch.testing.assert_close(a, b)


def test_train_records_recipe_and_extrapolation_monitor(tmp_path):
    spec = SPECS["induction"].override(L=16, warmup_lengths=(), batch=2, max_steps=2, eval_every=1, weight_decay=0.0,
                                       monitor_lengths=(32,), monitor_every=1, delta_l1=1e-2, delta_log=1e-3,
                                       cosine=True)
    rec = train("induction", "mamba", spec, out=tmp_path, progress=False)
    assert rec["weight_decay"] == 0.0 and rec["delta_l1"] == 1e-2 and rec["delta_log"] == 1e-3
    assert rec["schedule"] == "cosine to 0"
    assert rec["steps"] == 2
    assert 0.0 <= rec["curve"][-1]["monitor"]["32"] <= 1.0
    assert len(rec["curve"][-1]["horizon"]) == 2  # one Δ horizon per Mamba layer
    assert json.loads((tmp_path / "train.json").read_text())["curve"] == rec["curve"]
    assert (tmp_path / "model.safetensors").exists()


# --- fast reproduction: selection vs the LTI ablation on short selective copying ---------------------------
# 32 noise positions, 2 data tokens: selection solves it in ~200 steps (seeds 0-2: 0.99+); LTI 0.2-0.55 at 250
FAST = {"L": 32, "n_data": 2, "steps": 220, "batch": 32, "lr": 3e-3, "d_model": 64, "seed": 0}


def _train_copying(selective: bool, L: int, n_data: int, steps: int, batch: int, lr: float, d_model: int,
                   seed: int) -> float:
    torch.manual_seed(seed)
    model = MambaLMHeadModel(MambaConfig(d_model=d_model, n_layer=2, vocab_size=VOCAB,
                                         ssm_cfg={"selective": selective}))
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids, targets = copying_batch(batch, L, gen, n_data)
        logits = model(ids, num_last_tokens=n_data).logits[..., :VOCAB]
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids, targets = copying_batch(512, L, torch.Generator().manual_seed(10_000 + seed), n_data)
    with torch.no_grad():
        pred = model(ids, num_last_tokens=n_data).logits[..., :VOCAB].argmax(-1)
    return (pred == targets).float().mean().item()


def test_fast_selective_copying_mamba_beats_lti():
    t0 = time.perf_counter()
    mamba = _train_copying(True, **FAST)
    lti = _train_copying(False, **FAST)
    print(f"fast selective copying: mamba {mamba:.3f}, lti {lti:.3f} ({time.perf_counter() - t0:.0f} s)")
    assert mamba >= 0.9, mamba
    assert lti <= mamba - 0.3, (mamba, lti)


# --- committed checkpoints reproduce their recorded accuracy --------------------------------------------
def _committed(task: str) -> list[Path]:
    return sorted(d for d in CHECKPOINTS.glob(f"{task}_*") if (d / "eval.json").exists())


@pytest.mark.parametrize("task, L", [("induction", 64), ("induction", 256), ("copying", 256)])
def test_committed_checkpoint_reproduces_table(task, L):
    dirs = _committed(task)
    if not dirs:
        pytest.fail(f"no committed {task} checkpoints with eval.json under {CHECKPOINTS}")
    for d in dirs:
        rec = json.loads((d / "eval.json").read_text())
        row = next((r for r in rec["results"] if r["L"] == L), None)
        if row is None:
            continue
        model_name = d.name.split("_", 1)[1]
        again = evaluate(task, model_name, [L], d, n_max=row["n_seq"], n_min=row["n_seq"], progress=False,
                         chunk_len=rec["chunk_len"])["results"][0]
        assert again["n_seq"] == row["n_seq"]
        assert again["acc"] == pytest.approx(row["acc"], abs=1.5 / row["n_seq"]), (d.name, again, row)


def test_delta_penalty_is_a_no_op_without_mamba1_layers(tmp_path):
    """The induction defaults carry the Δ penalty; models without selective Mamba-1 layers still train."""
    spec = SPECS["induction"].override(L=16, warmup_lengths=(), batch=2, max_steps=1, eval_every=1, delta_l1=1e-2,
                                       delta_log=1e-3)
    rec = train("induction", "lti", spec, out=tmp_path, progress=False)
    assert rec["steps"] == 1 and rec["delta_l1"] == 1e-2


def test_passing_a_curriculum_stage_keeps_its_weights(tmp_path):
    spec = SPECS["induction"].override(L=16, warmup_lengths=(8,), batch=2, max_steps=3, eval_every=1, stage_acc=0.0,
                                       delta_l1=0.0)  # stage 8 passes after 2 checks
    rec = train("induction", "mamba", spec, out=tmp_path, progress=False)
    assert rec["reached_L"] == 16
    snap = MambaLMHeadModel.from_pretrained(tmp_path / "stage_8")
    final = MambaLMHeadModel.from_pretrained(tmp_path)
    assert any(not torch.equal(a, b) for a, b in zip(snap.state_dict().values(), final.state_dict().values()))


def test_cli_flags_left_unset_keep_the_task_recipe():
    from experiments.synthetic.__main__ import parser, train_spec

    args = parser().parse_args(["train", "--task", "induction", "--model", "mamba"])
    assert train_spec(args) == SPECS["induction"]
    args = parser().parse_args(["train", "--task", "copying", "--model", "lti", "--L", "64", "--warmup-lengths",
                                "--steps", "5", "--cosine", "--delta-log", "0.5"])
    assert train_spec(args) == replace(SPECS["copying"], L=64, warmup_lengths=(), max_steps=5, cosine=True,
                                       delta_log=0.5)


def test_old_benchmarks_command_still_runs_with_a_notice():
    ckpt = CHECKPOINTS / "induction_mamba"
    done = subprocess.run([sys.executable, "-m", "benchmarks.synthetic", "selectivity", "--task", "induction",
                           "--ckpt", str(ckpt), "--L", "64"], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert "moved: running `python -m experiments.synthetic`" in done.stderr
    assert done.stdout.startswith("layer 0: channel")
