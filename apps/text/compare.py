"""Byte Mamba vs a same-size byte Transformer, each trained for the same CPU time on the same data:

    python -m apps.text.compare --minutes 4          # writes runs/text_compare/results.json

Both runs use apps/text/configs/default.yaml (same data, windows, batch, optimiser, seed); the Transformer
is apps.common.transformer_like(mamba config): all-attention (RoPE, causal) with a gated MLP sized so the
parameter counts match. Held-out bits/byte on the test split is measured two ways: (a) non-overlapping
windows of the training length (both models see the same context), (b) whole files read in chunks with
the state carried (Mamba only: its state is constant-size; the Transformer's context would exceed what
it was trained on).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from apps.common import transformer_like
from apps.common.baselines import count_parameters
from apps.common.errors import run_cli
from apps.text.evaluate import corpus_bits_per_byte, window_bits_per_byte
from apps.text.train import main as train_main
from ssm_core import MambaConfig


def run(name: str, config: MambaConfig, minutes: float, out: Path, extra: list[str]) -> dict:
    args = ["fit", f"--trainer.max_time=00:00:{int(minutes):02d}:{int(minutes % 1 * 60):02d}",
            f"--trainer.default_root_dir={out / name}", f"--trainer.logger.init_args.save_dir={out}",
            f"--trainer.logger.init_args.name={name}", f"--model.config={json.dumps(config.to_dict())}", *extra]
    t0 = time.perf_counter()
    cli = train_main(args)
    wall = time.perf_counter() - t0
    module, dm = cli.model, cli.datamodule
    test = dm.corpus("test")
    result = {"name": name, "params": count_parameters(config), "steps": cli.trainer.global_step,
              "train_bytes": cli.trainer.global_step * dm.hparams.batch_size * dm.hparams.seq_len,
              "wall_s": round(wall, 1), "test_bytes": len(test),
              "bpb_windows": window_bits_per_byte(module.model, test, dm.hparams.seq_len, module.n_scored)}
    if name == "mamba":
        result["bpb_whole_files"] = corpus_bits_per_byte(module.model, dm.split_docs()["test"],
                                                         dm.hparams.specials, max_bytes=None)[0]
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=4.0, help="training time per model")
    p.add_argument("--out", type=Path, default=Path("runs/text_compare"))
    p.add_argument("--threads", type=int, default=1)
    a, extra = p.parse_known_args(argv)
    torch.set_num_threads(a.threads)
    mamba = MambaConfig(d_model=128, n_layer=4, vocab_size=256, ssm_cfg={"layer": "Mamba1", "d_state": 16})
    results = [run("mamba", mamba, a.minutes, a.out, extra),
               # attention reads the 512-byte window whole: no state to carry between pieces
               run("transformer", transformer_like(mamba, num_heads=4), a.minutes, a.out,
                   ["--model.chunk_len=null", *extra])]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    run_cli(main)
