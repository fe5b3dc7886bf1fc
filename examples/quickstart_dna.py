"""Train a tiny causal Mamba on real DNA for about a minute on CPU, then report bits/base.

    python -m examples.quickstart_dna                 # bundled E. coli K-12 sample, ~1 minute
    python -m examples.quickstart_dna --minutes 5 --layer Mamba2

Data: the first 300 kb of E. coli K-12 W3110 (datasets/samples/, bgzip FASTA read with pyfaidx);
the last 30 kb are held out. A reader sees the whole ssm_core API surface in use: MambaConfig,
MambaLMHeadModel, chunked evaluation with the carried state, save_pretrained, generate.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pyfaidx
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ssm_core import MambaConfig, MambaLMHeadModel

SAMPLE = Path(__file__).resolve().parents[1] / "datasets" / "samples" / "ecoli_k12_w3110_300kb.fa.gz"
BASES = "ACGT"
LUT = torch.full((256,), 4, dtype=torch.long)  # anything but ACGT (N, IUPAC) -> 4
for i, b in enumerate(BASES):
    LUT[ord(b)] = LUT[ord(b.lower())] = i


def encode(seq: str) -> torch.Tensor:
    return LUT[torch.frombuffer(bytearray(seq.encode()), dtype=torch.uint8).long()]


class Windows(Dataset):
    """Random windows of ``length + 1`` bases from one region (inputs and next-base targets)."""

    def __init__(self, tokens: torch.Tensor, length: int, n: int, seed: int = 0):
        self.tokens, self.length, self.n = tokens, length, n
        self.starts = torch.randint(0, len(tokens) - length - 1, (n,), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        w = self.tokens[self.starts[i] : self.starts[i] + self.length + 1]
        return w[:-1], w[1:]


class DNALM(pl.LightningModule):
    def __init__(self, config: MambaConfig, lr: float):
        super().__init__()
        self.model, self.lr = MambaLMHeadModel(config), lr

    def training_step(self, batch, _):
        x, y = batch
        logits = self.model(x).logits[..., :5]
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        self.log("bits_per_base", loss / math.log(2), prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


@torch.no_grad()
def bits_per_base(model: MambaLMHeadModel, tokens: torch.Tensor, chunk: int = 4096) -> float:
    """Exact log-likelihood of one long sequence, read in chunks with the state carried across."""
    was_training = model.training
    model.eval()
    state, nll = None, 0.0
    for s in range(0, len(tokens) - 1, chunk):
        x = tokens[s : s + chunk].unsqueeze(0)
        y = tokens[s + 1 : s + chunk + 1]
        out = model(x[:, : len(y)], state=state, return_state=True)
        state = out.state
        nll += F.cross_entropy(out.logits[0, :, :5], y, reduction="sum").item()
    model.train(was_training)
    return nll / (len(tokens) - 1) / math.log(2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fasta", default=str(SAMPLE))
    p.add_argument("--minutes", type=float, default=1.0)
    p.add_argument("--layer", choices=["Mamba1", "Mamba2"], default="Mamba1")
    p.add_argument("--out", default="runs/quickstart_dna")
    args = p.parse_args(argv)
    torch.manual_seed(0)

    fasta = pyfaidx.Fasta(args.fasta)
    seq = fasta[next(iter(fasta.keys()))]
    n = len(seq)
    tokens = encode(str(seq[:]))
    held_out = 30_000
    train, valid = tokens[: n - held_out], tokens[n - held_out :]

    ssm = {"layer": "Mamba1"} if args.layer == "Mamba1" else {"layer": "Mamba2", "d_state": 32, "headdim": 32,
                                                             "chunk_size": 64}
    config = MambaConfig(d_model=64, n_layer=2, vocab_size=5, ssm_cfg=ssm)
    module = DNALM(config, lr=3e-3)
    print(f"{sum(p.numel() for p in module.parameters()):,} parameters; {len(train):,} training bases; "
          f"held-out {held_out:,} bases")
    before = bits_per_base(module.model, valid)
    trainer = pl.Trainer(max_time={"minutes": args.minutes}, max_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, log_every_n_steps=10)
    t0 = time.time()
    trainer.fit(module, DataLoader(Windows(train, 512, 100_000), batch_size=8, shuffle=True))
    after = bits_per_base(module.model, valid)
    print(f"trained {time.time() - t0:.0f} s; held-out bits/base: {before:.3f} before, {after:.3f} after "
          f"(2.000 = uniform over ACGT)")
    module.model.save_pretrained(args.out)
    prompt = train[:64].unsqueeze(0)
    sample = module.model.generate(prompt, 64, temperature=0.8, top_k=4, seed=0)[0, 64:]
    print(f"checkpoint: {args.out}; sampled continuation: {''.join('ACGTN'[i] for i in sample.tolist())}")


if __name__ == "__main__":
    main()
