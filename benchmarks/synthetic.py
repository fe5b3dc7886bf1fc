"""The Mamba paper's synthetic tasks on CPU (Gu & Dao 2023, section 4.1): selective copying (Table 1) and
induction heads with length extrapolation (Table 2).

    python -m benchmarks.synthetic train --task induction --model mamba      # -> benchmarks/checkpoints/induction_mamba
    python -m benchmarks.synthetic eval  --task induction --model mamba      # accuracy at 2^6 ... 2^20
    python -m benchmarks.synthetic report                                     # markdown tables + docs/img plots

Models (2 layers, d_model 64, vocabulary 16): ``mamba`` (Mamba-1, S6), ``mamba2`` (SSD), ``lti`` (the Mamba
block with selection off, ssm_cfg selective=False: the paper's "S4" layer inside the Mamba architecture) and
``attention`` (a parameter-matched RoPE Transformer, apps.common.baselines.transformer_like).

Both tasks put their targets at the last K positions (K = 1 for induction, 16 for copying), so training and
evaluation only ever form the last K logits; long sequences are read in pieces with the recurrent state
(a key/value cache for attention) carried across, so memory stays bounded at L = 2^20.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from apps.common.baselines import transformer_like
from apps.common.lm import param_groups, warmup_cosine
from ssm_core import MambaConfig, MambaLMHeadModel, atomic_write

VOCAB = 16
CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
MODELS = ("mamba", "mamba2", "lti", "attention")
TASKS = ("induction", "copying")
EVAL_SEED = 1234  # evaluation sequences come from their own generator, never the training stream

# --- tasks -----------------------------------------------------------------------------------------------
TRIGGER = 0  # induction heads: token 0 is the trigger, 1..15 content
NOISE, RECALL, N_DATA = 0, 1, 16  # selective copying: 0 noise, 1 recall marker, 2..15 data; 16 data tokens


def induction_batch(batch: int, L: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(ids (batch, L), targets (batch, 1)). Content tokens uniform in 1..15; the trigger at a random p in
    the first half (p + 1 < L // 2 so the key is in the first half too), the key at p + 1 and the trigger
    again as the last token, whose target is the key."""
    if L < 8:
        raise ValueError(f"induction: L must be >= 8, got {L}")
    ids = torch.randint(1, VOCAB, (batch, L), generator=gen)
    p = torch.randint(0, L // 2 - 1, (batch,), generator=gen)
    rows = torch.arange(batch)
    ids[rows, p] = TRIGGER
    ids[:, -1] = TRIGGER
    return ids, ids[rows, p + 1].unsqueeze(1)


def copying_batch(batch: int, L: int, gen: torch.Generator, n_data: int = N_DATA) -> tuple[Tensor, Tensor]:
    """(ids (batch, L + n_data), targets (batch, n_data)). L noise positions, n_data (16) of them replaced by
    data tokens (uniform in 2..15) at random distinct positions, then n_data recall markers; the targets at
    the markers are the data tokens in order of position."""
    if L < n_data:
        raise ValueError(f"copying: L must be >= n_data={n_data}, got {L}")
    pos = torch.rand(batch, L, generator=gen).argsort(dim=1)[:, :n_data].sort(dim=1).values
    data = torch.randint(RECALL + 1, VOCAB, (batch, n_data), generator=gen)
    ids = torch.full((batch, L + n_data), NOISE, dtype=torch.long)
    ids.scatter_(1, pos, data)
    ids[:, L:] = RECALL
    return ids, data


MAKE_BATCH = {"induction": induction_batch, "copying": copying_batch}
N_TARGETS = {"induction": 1, "copying": N_DATA}


class TaskStream(IterableDataset):
    """Fresh batches forever from one seeded generator: the training stream is a function of the seed.
    ``L`` may be changed between batches (the length curriculum); read in the main process (num_workers=0)."""

    def __init__(self, task: str, batch: int, L: int, seed: int):
        self.task, self.batch, self.L, self.seed = task, batch, L, seed

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            yield MAKE_BATCH[self.task](self.batch, self.L, gen)


# --- models ----------------------------------------------------------------------------------------------
def model_config(model: str) -> MambaConfig:
    """2 layers, d_model 64, vocabulary 16 (the paper's synthetic-task size)."""
    base = MambaConfig(d_model=64, n_layer=2, vocab_size=VOCAB)
    if model == "mamba":
        return base
    if model == "lti":
        return MambaConfig(d_model=64, n_layer=2, vocab_size=VOCAB, ssm_cfg={"selective": False})
    if model == "mamba2":
        return MambaConfig(d_model=64, n_layer=2, vocab_size=VOCAB,
                           ssm_cfg={"layer": "Mamba2", "headdim": 32, "d_state": 64, "chunk_size": 64})
    if model == "attention":
        return transformer_like(base, num_heads=2)
    raise ValueError(f"unknown model {model!r}; choose from {MODELS}")


@dataclass
class TrainSpec:
    """Per-task defaults (CLI flags override). Copying's L is the noise length; sequences are L + 16.
    ``warmup_lengths``: a length curriculum before L: each stage runs until the held-out accuracy at its length
    reaches stop_acc (CPU budget: the last-token signal is sparse, and at L = 256 the plateau before the
    induction circuit forms is long; at L = 32 it forms in a few hundred steps)."""

    L: int
    warmup_lengths: tuple[int, ...]
    min_final_steps: int  # at least this many steps at L, even once held-out accuracy is 100%
    batch: int
    max_steps: int
    lr: float
    eval_every: int
    weight_decay: float = 0.1
    delta_l1: float = 0.0


SPECS = {
    # the committed run: batch 8 and Adam without weight decay as in the paper, plus the Δ penalty (see
    # docs/paper_results.md); min_final_steps = max_steps: no early stop at 100% (margin grows after that)
    "induction": TrainSpec(L=256, warmup_lengths=(32,), min_final_steps=18_000, batch=8, max_steps=18_000, lr=1e-3,
                           eval_every=100, weight_decay=0.0, delta_l1=1e-2),
    "copying": TrainSpec(L=256, warmup_lengths=(64,), min_final_steps=0, batch=32, max_steps=3000, lr=3e-3,
                         eval_every=50),
}


STAGE_ACC = 0.95  # default held-out accuracy that ends a curriculum stage (the last stage runs to stop_acc)


class SyntheticModule(pl.LightningModule):
    """Cross-entropy on the last K positions only (the targets), plus ``delta_l1`` x mean Δ and ``delta_log`` x
    mean log Δ of the Mamba-1 layers when set; AdamW,
    linear warm-up then constant lr (or a cosine to 0 over ``cosine_steps``); the run ends at max_steps or by
    early stopping (below). ``lengths``: the curriculum, the last one the training length."""

    def __init__(self, config: MambaConfig, task: str, lengths: list[int], stream: TaskStream, lr: float,
                 weight_decay: float = 0.1, warmup_steps: int = 100, eval_every: int = 50, n_val: int = 256,
                 stop_acc: float = 1.0, patience: int = 2, min_final_steps: int = 0, seed: int = 0,
                 monitor_lengths: tuple[int, ...] = (), monitor_every: int = 500, n_monitor: int = 64,
                 stage_acc: float = STAGE_ACC, adam_eps: float = 1e-8, delta_l1: float = 0.0,
                 delta_log: float = 0.0, cosine_steps: int | None = None, snapshot_dir: Path | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["config", "stream"])
        self.config, self.task, self.K, self.stream = config, task, N_TARGETS[task], stream
        self.model = MambaLMHeadModel(config)
        self.curve: list[dict] = []  # {"step", "L", "loss", "val_acc", "time_s"}
        self._t0, self._loss = None, float("nan")
        self._set_stage(0)
        # held-out sets at lengths beyond L: extrapolation tracked during training (logged only: the code never
        # stops or selects on them; their seeds differ from the training stream's and the evaluation's)
        self.monitor = {}
        for L in monitor_lengths:
            gen = torch.Generator().manual_seed(seed + 2_000_003 + L)
            self.monitor[L] = MAKE_BATCH[task](n_monitor, L, gen)

    def _set_stage(self, i: int) -> None:
        self.stage, self._good, self._stage_start = i, 0, self.global_step
        L = self.stream.L = self.hparams.lengths[i]
        gen = torch.Generator().manual_seed(self.hparams.seed + 1_000_003 + L)  # held out: not the train stream
        self.val_ids, self.val_targets = MAKE_BATCH[self.task](self.hparams.n_val, L, gen)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.shape[1] > 8192 and not self.training:  # long held-out sets: read in pieces, bounded memory
            return last_logits(self.model, ids, self.K, 8192)
        return self.model(ids, num_last_tokens=self.K).logits[..., :VOCAB]

    def training_step(self, batch, batch_idx):
        ids, targets = batch
        hp = self.hparams
        if hp.delta_l1 or hp.delta_log:  # sparse selection: pay for every step size Δ, so only needed writes stay
            with capture_delta(self.model) as deltas:
                logits = self(ids)
            penalty = 0.0
            if deltas and hp.delta_l1:  # no deltas in attention, LTI or Mamba-2 models: the penalty is Mamba-1's
                penalty = penalty + hp.delta_l1 * torch.stack([d.mean() for d, _ in deltas]).mean()
            if deltas and hp.delta_log:
                # log Δ: a constant push per unit of log Δ, however small Δ already is (L1's push fades with Δ);
                # below 1e-30 the clamp stops the push (and keeps log finite where Δ underflows to 0)
                log_delta = torch.stack([d.clamp_min(1e-30).log().mean() for d, _ in deltas]).mean()
                penalty = penalty + hp.delta_log * log_delta
        else:
            logits, penalty = self(ids), 0.0
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        self._loss = loss.item()
        self.log("loss", loss, prog_bar=True)
        return loss + penalty

    def on_train_start(self):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        step = self.global_step
        if step % self.hparams.eval_every and step != self.trainer.max_steps:
            return
        acc = accuracy(self, self.val_ids, self.val_targets, batch=64)
        self.curve.append({"step": step, "L": self.stream.L, "loss": self._loss, "val_acc": acc,
                           "time_s": round(time.perf_counter() - self._t0, 1)})
        self.log("val_acc", acc, prog_bar=True)
        extra = ""
        if self.monitor and (step % self.hparams.monitor_every == 0 or step == self.trainer.max_steps):
            self.curve[-1]["monitor"] = {str(L): accuracy(self, ids, t, batch=max(1, 2**16 // L))
                                         for L, (ids, t) in self.monitor.items()}
            extra = "  at " + " ".join(f"{L}: {a:.3f}" for L, a in self.curve[-1]["monitor"].items())
            with torch.no_grad():  # the selectivity behind extrapolation (Mamba-1 layers only)
                horizons = [r["horizon"] for r in delta_selectivity(self.model, self.task, self.stream.L, n=16)]
            if horizons:
                self.curve[-1]["horizon"] = horizons
                extra += "  Δ horizon " + " ".join(f"{h:.3g}" for h in horizons)
        print(f"step {step:>5}  L {self.stream.L:>5}  loss {self._loss:.3g}  held-out acc {acc:.4f}  "
              f"{self.curve[-1]['time_s']:.0f} s{extra}", flush=True)
        # next stage (or stop) once held-out accuracy has stayed at the target for `patience` checks in a row
        last = self.stage + 1 == len(self.hparams.lengths)
        self._good = self._good + 1 if acc >= (self.hparams.stop_acc if last else self.hparams.stage_acc) else 0
        if self._good >= self.hparams.patience:
            if not last:
                if self.hparams.snapshot_dir is not None:  # keep the weights that passed this stage: the next
                    # stage may end at the time cap in a worse state (lr spikes right after a length change)
                    self.model.save_pretrained(Path(self.hparams.snapshot_dir) / f"stage_{self.stream.L}")
                self._set_stage(self.stage + 1)
            elif step - self._stage_start >= self.hparams.min_final_steps:  # margin: sharper gates extrapolate
                self.trainer.should_stop = True

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(param_groups(self.model, hp.weight_decay), lr=hp.lr, betas=(0.9, 0.98),
                                eps=hp.adam_eps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, hp.warmup_steps, hp.cosine_steps, 0.0))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def accuracy(module: SyntheticModule, ids: Tensor, targets: Tensor, batch: int) -> float:
    was = module.training
    module.eval()
    hits = sum(int((module(ids[i:i + batch]).argmax(-1) == targets[i:i + batch]).sum())
               for i in range(0, len(ids), batch))
    module.train(was)
    return hits / targets.numel()


def checkpoint_dir(task: str, model: str, root: Path = CHECKPOINTS) -> Path:
    return root / f"{task}_{model}"


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(obj, indent=1) + "\n"))


def train(task: str, model: str, seed: int = 0, out: Path | None = None, L: int | None = None,
          warmup_lengths: tuple[int, ...] | None = None, batch: int | None = None, max_steps: int | None = None,
          lr: float | None = None, eval_every: int | None = None, stop_acc: float = 1.0,
          max_minutes: float | None = None, min_final_steps: int | None = None, init: Path | None = None,
          weight_decay: float | None = None, monitor_lengths: tuple[int, ...] = (), monitor_every: int = 500,
          stage_acc: float = STAGE_ACC, adam_eps: float = 1e-8, delta_l1: float | None = None,
          delta_log: float = 0.0, cosine: bool = False,
          progress: bool = True) -> dict:
    """Train one model on one task; writes out/ (save_pretrained) + out/train.json, and out/stage_L/ with the
    weights that passed each curriculum stage L. Returns the record.
    ``init``: continue from that checkpoint (weights only; its train.json is kept as "previous")."""
    spec = SPECS[task]
    L, batch = L or spec.L, batch or spec.batch
    warmup_lengths = spec.warmup_lengths if warmup_lengths is None else tuple(warmup_lengths)
    lengths = [x for x in warmup_lengths if x < L] + [L]
    max_steps, lr, eval_every = max_steps or spec.max_steps, lr or spec.lr, eval_every or spec.eval_every
    weight_decay = spec.weight_decay if weight_decay is None else weight_decay
    delta_l1 = spec.delta_l1 if delta_l1 is None else delta_l1
    out = Path(out) if out else checkpoint_dir(task, model)
    pl.seed_everything(seed, workers=True, verbose=False)
    config = model_config(model)
    stream = TaskStream(task, batch, lengths[0], seed)
    module = SyntheticModule(config, task, lengths, stream, lr, weight_decay=weight_decay, eval_every=eval_every,
                             warmup_steps=min(100, max_steps // 10), stop_acc=stop_acc,
                             min_final_steps=spec.min_final_steps if min_final_steps is None else min_final_steps,
                             seed=seed, monitor_lengths=tuple(monitor_lengths), monitor_every=monitor_every,
                             stage_acc=stage_acc, adam_eps=adam_eps, delta_l1=delta_l1, delta_log=delta_log,
                             cosine_steps=max_steps if cosine else None, snapshot_dir=out)
    previous = None
    if init is not None:
        module.model.load_state_dict(MambaLMHeadModel.from_pretrained(init).state_dict())
        if (Path(init) / "train.json").exists():
            previous = json.loads((Path(init) / "train.json").read_text())
    loader = DataLoader(stream, batch_size=None, num_workers=0)
    trainer = pl.Trainer(
        max_steps=max_steps, max_time={"minutes": max_minutes} if max_minutes else None,
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
        gradient_clip_val=1.0,
    )
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    wall = time.perf_counter() - t0
    module.model.save_pretrained(out)
    record = {
        "task": task, "model": model, "seed": seed, "L": L, "curriculum": lengths, "reached_L": stream.L,
        "batch": batch, "lr": lr, "weight_decay": weight_decay, "max_steps": max_steps, "stage_acc": stage_acc,
        "adam_eps": adam_eps, "delta_l1": delta_l1, "delta_log": delta_log,
        "schedule": "cosine to 0" if cosine else "constant",
        "steps": trainer.global_step, "min_final_steps": module.hparams.min_final_steps,
        "wall_s": round(wall, 1), "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in module.model.parameters()),
        "final_val_acc": module.curve[-1]["val_acc"] if module.curve else None, "curve": module.curve,
        "previous": previous,
    }
    write_json(out / "train.json", record)
    return record


# --- evaluation ------------------------------------------------------------------------------------------
@torch.no_grad()
def last_logits(model: MambaLMHeadModel, ids: Tensor, K: int, chunk_len: int) -> Tensor:
    """Logits of the last K positions, reading ids in pieces of chunk_len with the state carried across:
    memory is one piece's activations (plus the key/value cache for attention)."""
    T = ids.shape[1]
    starts = list(range(0, T, chunk_len))
    if len(starts) > 1 and T - starts[-1] < K:  # the last piece must hold all K target positions
        starts.pop()
    state, logits = None, None
    for i, s in enumerate(starts):
        e = starts[i + 1] if i + 1 < len(starts) else T
        out = model(ids[:, s:e], state=state, return_state=True, num_last_tokens=K)
        state, logits = out.state, out.logits
    return logits[..., :VOCAB]


def correct(model: MambaLMHeadModel, ids: Tensor, targets: Tensor, chunk_len: int) -> int:
    """How many of targets (batch, K) the model's last K positions predict (argmax), reading in pieces."""
    return int((last_logits(model, ids, targets.shape[1], chunk_len).argmax(-1) == targets).sum())


def n_eval_sequences(T: int, budget_tokens: int, n_max: int, n_min: int) -> int:
    """Fewer sequences at long lengths: the cost is sequences x tokens."""
    return int(max(n_min, min(n_max, budget_tokens // T)))


def evaluate(task: str, model_name: str, lengths: list[int], ckpt: Path | None = None, n_max: int = 512,
             n_min: int = 8, budget_tokens: int = 2**20, batch_tokens: int = 2**16, chunk_len: int = 8192,
             progress: bool = True, on_result=None) -> dict:
    """Accuracy of a checkpoint at each length (L is the full length for induction, the noise length for
    copying). Sequences come from a generator seeded with EVAL_SEED + L, so results are reproducible."""
    ckpt = Path(ckpt) if ckpt else checkpoint_dir(task, model_name)
    model = MambaLMHeadModel.from_pretrained(ckpt).eval()
    K = N_TARGETS[task]
    results = []
    for L in lengths:
        T = L + (N_DATA if task == "copying" else 0)
        n = n_eval_sequences(T, budget_tokens, n_max, n_min)
        gen = torch.Generator().manual_seed(EVAL_SEED + L)
        per_batch = max(1, min(n, batch_tokens // T))
        hits = total = 0
        t0 = time.perf_counter()
        bar = tqdm(total=n, desc=f"{task}/{model_name} L={L}", disable=not progress, leave=False)
        while total < n * K:
            b = min(per_batch, n - total // K)
            ids, targets = MAKE_BATCH[task](b, L, gen)
            hits += correct(model, ids, targets, chunk_len)
            total += targets.numel()
            bar.update(b)
        bar.close()
        row = {"L": L, "n_seq": n, "acc": hits / total, "time_s": round(time.perf_counter() - t0, 1)}
        results.append(row)
        if on_result is not None:  # e.g. save after each length: the long ones take minutes
            on_result(row)
        if progress:
            print(f"{task}/{model_name} L={L:>8}: acc {row['acc']:.4f} on {n} sequences ({row['time_s']} s)",
                  flush=True)
    return {"task": task, "model": model_name, "eval_seed": EVAL_SEED, "chunk_len": chunk_len, "results": results}


# --- mechanism: how selective is Δ? ----------------------------------------------------------------------
@contextmanager
def capture_delta(model: torch.nn.Module, floor: float | None = None):
    """Within the block, each selective Mamba-1 layer's forward appends (Δ, x) to the yielded list (one entry
    per layer call, in call order; gradients flow): its step size Δ = softplus(dt + dt_bias) and the scan
    input x (after the conv), both (batch, L, d_inner). Δ·x is what a token writes into the state (times B).
    ``floor``: an intervention, not a measurement: every Δ below it is set to exactly 0 (no write, no decay)."""
    from ssm_core.modules.mamba import Mamba  # Mamba-1 only: Mamba-2's Δ is per head

    deltas: list[Tensor] = []
    layers = [m for m in model.modules() if isinstance(m, Mamba) and m.selective]
    for layer in layers:
        def dt_B_C(x, layer=layer, original=layer._dt_B_C):
            dt, B, C = original(x)
            delta = F.softplus(dt.float() + layer._dt_bias())
            if floor is not None:  # softplus(-1e4) == 0 in every float dtype
                dt = torch.where(delta < floor, torch.full_like(dt, -1e4), dt)
                delta = torch.where(delta < floor, torch.zeros_like(delta), delta)
            deltas.append((delta, x))
            return dt, B, C
        layer._dt_B_C = dt_B_C  # instance attribute shadows the method
    try:
        yield deltas
    finally:
        for layer in layers:
            del layer._dt_B_C


def write_mask(task: str, ids: Tensor) -> Tensor:
    """(batch, T) bool: the positions a model must write into its state (induction: the key after the first
    trigger; copying: the data tokens)."""
    if task == "induction":
        mask = torch.zeros_like(ids, dtype=torch.bool)
        p = (ids[:, :-1] == TRIGGER).float().argmax(1)
        mask[torch.arange(len(ids)), p + 1] = True
        return mask
    return ids > RECALL


@torch.no_grad()
def delta_selectivity(model: MambaLMHeadModel, task: str, L: int, n: int = 64, seed: int = EVAL_SEED) -> list[dict]:
    """Per Mamba layer, the channel that best separates write positions from the rest, by what a token
    writes into the state, |Δ·x| (Δ the step size, x the scan input; B is shared by all channels).

    Each ignored token adds its |Δ·x|·B to the state and decays it by exp(A·Δ), so a write survives about
    ``horizon`` = |Δ·x|(write) / mean |Δ·x|(other) ignored tokens before their sum matches it; ``delta_write``
    and ``delta_other`` give Δ alone (a layer can select through Δ or through x). The write value is the
    largest one from a write position to the d_conv - 1 positions after it (the conv still sees the token
    there, so a layer may write it a step or two late); those positions are not "other"."""
    ids, _ = MAKE_BATCH[task](n, L, torch.Generator().manual_seed(seed))
    write = write_mask(task, ids)
    near = write.clone()
    for k in range(1, 4):  # d_conv - 1 positions after a write still see it through the conv
        near[:, k:] |= write[:, :-k]
    other = ~near & (ids != TRIGGER if task == "induction" else ids == NOISE)
    with capture_delta(model) as deltas:
        model(ids)
    def late(v: Tensor) -> Tensor:  # max over v[t : t + 4]
        return F.max_pool1d(F.pad(v.transpose(1, 2), (0, 3)), 4, stride=1).transpose(1, 2)

    rows = []
    for i, (delta, x) in enumerate(deltas):
        gain = (delta * x.float()).abs()
        on, off = late(gain)[write].mean(0), gain[other].mean(0)  # (d_inner,)
        # Δ can underflow to exactly 0: a channel that writes nothing anywhere has horizon 0, not 0/0
        ratio = torch.where(off > 0, on / off.clamp_min(1e-38), torch.where(on > 0, math.inf, 0.0))
        infinite = torch.isinf(ratio)  # several channels may never write elsewhere: take the strongest writer
        ch = int(torch.where(infinite, on, -1.0).argmax()) if infinite.any() else int(ratio.argmax())
        rows.append({"layer": i, "channel": ch, "delta_write": float(late(delta)[write].mean(0)[ch]),
                     "delta_other": float(delta[other].mean(0)[ch]), "horizon": float(ratio[ch])})
    return rows


# --- report ----------------------------------------------------------------------------------------------
def load_records(root: Path = CHECKPOINTS) -> tuple[dict, dict]:
    train_rec, eval_rec = {}, {}
    for d in sorted(root.glob("*_*")):
        if (d / "train.json").exists():
            train_rec[d.name] = json.loads((d / "train.json").read_text())
        if (d / "eval.json").exists():
            eval_rec[d.name] = json.loads((d / "eval.json").read_text())
    return train_rec, eval_rec


def plot_curves(train_rec: dict, task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    for rec in train_rec.values():
        if rec["task"] != task:
            continue
        steps = [c["step"] for c in rec["curve"]]
        ax_loss.plot(steps, [c["loss"] for c in rec["curve"]], label=rec["model"])
        ax_acc.plot(steps, [c["val_acc"] for c in rec["curve"]], label=rec["model"])
    ax_loss.set(xlabel="step", ylabel="train loss (nats)", yscale="log", title=f"{task}: training loss")
    ax_acc.set(xlabel="step", ylabel="held-out accuracy", ylim=(0, 1.02), title=f"{task}: accuracy at train length")
    ax_acc.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def plot_extrapolation(eval_rec: dict, path: Path, train_L: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for rec in eval_rec.values():
        if rec["task"] != "induction":
            continue
        ax.plot([r["L"] for r in rec["results"]], [r["acc"] for r in rec["results"]], marker="o", label=rec["model"])
    ax.axvline(train_L, color="grey", linestyle=":", label="train length")
    ax.set(xscale="log", xlabel="test sequence length", ylabel="accuracy", ylim=(-0.02, 1.02),
           title="Induction heads: length extrapolation")
    ax.set_xscale("log", base=2)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


def report(root: Path = CHECKPOINTS, img: Path = IMG) -> str:
    """Markdown tables from the committed train.json / eval.json files; writes the PNGs to docs/img."""
    train_rec, eval_rec = load_records(root)
    lines = ["| task | model | params | seed | curriculum | steps | wall (min) | held-out acc at the last length |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for rec in train_rec.values():
        steps, wall, prev = rec["steps"], rec["wall_s"], rec.get("previous")
        while prev:  # continued runs (--init): count every leg
            steps, wall, prev = steps + prev["steps"], wall + prev["wall_s"], prev.get("previous")
        reached = "" if rec.get("reached_L", rec["L"]) == rec["L"] else f" (stopped at {rec['reached_L']})"
        lines.append(f"| {rec['task']} | {rec['model']} | {rec['params']:,} | {rec['seed']} | "
                     f"{' → '.join(map(str, rec.get('curriculum', [rec['L']])))}{reached} | {steps} | "
                     f"{wall / 60:.1f} | {100 * rec['final_val_acc']:.1f}% |")
    ind = {k: v for k, v in eval_rec.items() if v["task"] == "induction"}
    if ind:
        lengths = sorted({r["L"] for v in ind.values() for r in v["results"]})
        lines += ["", "| model | " + " | ".join(f"2^{int(math.log2(L))}" for L in lengths) + " |",
                  "| --- |" + " ---: |" * len(lengths)]
        for v in ind.values():
            acc = {r["L"]: r for r in v["results"]}
            cells = [f"{100 * acc[L]['acc']:.1f} ({acc[L]['n_seq']})" if L in acc else "-" for L in lengths]
            lines.append(f"| {v['model']} | " + " | ".join(cells) + " |")
    cop = {k: v for k, v in eval_rec.items() if v["task"] == "copying"}
    if cop:
        lines += ["", "| model | L (noise) | accuracy | data tokens scored |", "| --- | ---: | ---: | ---: |"]
        for v in cop.values():
            for r in v["results"]:
                lines.append(f"| {v['model']} | {r['L']} | {100 * r['acc']:.2f}% | {r['n_seq'] * N_DATA} |")
    if train_rec:
        for task in TASKS:
            if any(r["task"] == task for r in train_rec.values()):
                plot_curves(train_rec, task, img / f"synthetic_{task}_curves.png")
    if ind:
        plot_extrapolation(ind, img / "synthetic_induction_extrapolation.png", SPECS["induction"].L)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.synthetic", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("train", "eval"):
        p = sub.add_parser(name)
        p.add_argument("--task", choices=TASKS, required=True)
        p.add_argument("--model", choices=MODELS, required=True)
        p.add_argument("--ckpt", type=Path, help="checkpoint directory (default benchmarks/checkpoints/TASK_MODEL)")
        p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    tr = sub.choices["train"]
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--L", type=int, help="training length (copying: noise length)")
    tr.add_argument("--warmup-lengths", type=int, nargs="*", help="length curriculum before L (default per task)")
    tr.add_argument("--batch", type=int)
    tr.add_argument("--steps", type=int, help="maximum optimizer steps")
    tr.add_argument("--lr", type=float)
    tr.add_argument("--adam-eps", type=float, default=1e-8,
                    help="AdamW eps; below the gradient scale of a near-zero loss, updates keep their size")
    tr.add_argument("--cosine", action="store_true",
                    help="lr decays to 0 by a cosine over --steps after the warm-up (default: constant)")
    tr.add_argument("--delta-l1", type=float,
                    help="weight of an L1 penalty on the mean step size Δ of the Mamba-1 layers (default per task)")
    tr.add_argument("--delta-log", type=float, default=0.0, help="weight of a penalty on mean log Δ (default off)")
    tr.add_argument("--weight-decay", type=float, help="AdamW decay on matrices (default per task)")
    tr.add_argument("--monitor-lengths", type=int, nargs="*", default=[],
                    help="also log held-out accuracy at these (longer) lengths; logged only, never used to stop")
    tr.add_argument("--monitor-every", type=int, default=500, help="steps between monitor evaluations")
    tr.add_argument("--eval-every", type=int, help="steps between held-out checks at the training length")
    tr.add_argument("--stop-acc", type=float, default=1.0, help="stop after 2 held-out checks in a row at it")
    tr.add_argument("--stage-acc", type=float, default=STAGE_ACC,
                    help="held-out accuracy (2 checks in a row) that ends a curriculum stage")
    tr.add_argument("--max-minutes", type=float, help="wall-clock cap")
    tr.add_argument("--init", type=Path, help="continue from this checkpoint directory (weights)")
    tr.add_argument("--min-final-steps", type=int, help="at least this many steps at L (default per task)")
    ev = sub.choices["eval"]
    ev.add_argument("--lengths", type=int, nargs="+",
                    help="default: 2^6..2^20 (induction), the training L (copying)")
    ev.add_argument("--max-len", type=int, help="skip lengths above this (attention is quadratic)")
    ev.add_argument("--n-max", type=int, default=512, help="sequences per length at short lengths")
    ev.add_argument("--n-min", type=int, default=8, help="sequences per length at the longest lengths")
    ev.add_argument("--budget-tokens", type=int, default=2**20, help="about this many tokens per length")
    ev.add_argument("--chunk-len", type=int, default=8192, help="tokens per piece (state carried across)")
    sub.add_parser("report", help="print the markdown tables and write docs/img/synthetic_*.png")
    se = sub.add_parser("selectivity", help="per layer: Δ at write positions vs elsewhere (Mamba-1 checkpoints)")
    se.add_argument("--task", choices=TASKS, required=True)
    se.add_argument("--ckpt", type=Path, required=True)
    se.add_argument("--L", type=int, default=256)
    se.add_argument("--floor", type=float, help="also: accuracy at --lengths with every Δ below this set to 0")
    se.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096, 16384])
    se.add_argument("--n", type=int, default=64, help="sequences per length for --floor")
    args = ap.parse_args(argv)
    if args.cmd == "report":
        print(report())
        return
    if args.cmd == "selectivity":
        model = MambaLMHeadModel.from_pretrained(args.ckpt).eval()
        for r in delta_selectivity(model, args.task, args.L):
            print(f"layer {r['layer']}: channel {r['channel']:>3}  Δ at writes {r['delta_write']:.3g}  "
                  f"elsewhere {r['delta_other']:.3g}  horizon {r['horizon']:.3g} tokens")
        for L in args.lengths if args.floor else []:
            ids, targets = MAKE_BATCH[args.task](args.n, L, torch.Generator().manual_seed(EVAL_SEED + L))
            with torch.no_grad():
                plain = correct(model, ids, targets, 8192) / targets.numel()
                with capture_delta(model, floor=args.floor):
                    floored = correct(model, ids, targets, 8192) / targets.numel()
            print(f"L={L}: accuracy {plain:.3f}; with every Δ < {args.floor:g} set to 0: {floored:.3f} ({args.n} seqs)")
        return
    torch.set_num_threads(args.threads)
    ckpt = args.ckpt or checkpoint_dir(args.task, args.model)
    if args.cmd == "train":
        rec = train(args.task, args.model, seed=args.seed, out=ckpt, L=args.L, warmup_lengths=args.warmup_lengths,
                    batch=args.batch, eval_every=args.eval_every,
                    max_steps=args.steps, lr=args.lr, stop_acc=args.stop_acc, max_minutes=args.max_minutes,
                    min_final_steps=args.min_final_steps, init=args.init, weight_decay=args.weight_decay,
                    monitor_lengths=args.monitor_lengths, monitor_every=args.monitor_every,
                    stage_acc=args.stage_acc, adam_eps=args.adam_eps, delta_l1=args.delta_l1,
                    delta_log=args.delta_log,
                    cosine=args.cosine)
        print(f"{args.task}/{args.model}: {rec['steps']} steps, {rec['wall_s']} s, held-out acc "
              f"{rec['final_val_acc']:.4f} -> {ckpt}")
        return
    if args.lengths:
        lengths = args.lengths
    elif args.task == "induction":
        lengths = [2**k for k in range(6, 21)]
    else:
        lengths = [json.loads((ckpt / "train.json").read_text())["L"]]
    lengths = [L for L in lengths if args.max_len is None or L <= args.max_len]
    path = ckpt / "eval.json"

    def save(row: dict) -> None:  # merge into eval.json: lengths evaluated earlier and not redone are kept
        rec = json.loads(path.read_text()) if path.exists() else {
            "task": args.task, "model": args.model, "eval_seed": EVAL_SEED, "chunk_len": args.chunk_len,
            "results": []}
        old = {r["L"]: r for r in rec["results"]}
        old[row["L"]] = row
        rec["results"] = [old[L] for L in sorted(old)]
        write_json(path, rec)

    evaluate(args.task, args.model, lengths, ckpt, n_max=args.n_max, n_min=args.n_min,
             budget_tokens=args.budget_tokens, chunk_len=args.chunk_len, on_result=save)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
