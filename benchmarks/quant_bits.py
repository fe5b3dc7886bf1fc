"""What int8 weight-only decoding costs in quality: held-out bits/base of the shipped DNA model
(apps/genomics/assets/dna_small) scored token by token through the compiled decode step
(ssm_core.models.fast_decode.FastDecoder) with fp32, bf16 and int8 weights, beside the module forward (fp32).

    python -m benchmarks.quant_bits                 # the sample's held-out val + test splits (last 30 kb)
    python -m benchmarks.quant_bits --genome datasets/genomes/ecoli_ec590.fa.gz --bases 50000

Bits/base as apps.genomics.evaluate counts it: -log2 p(next base) over A/C/G/T targets, p the softmax over the
model's 12 tokens, the first base of the interval context only, state carried over the whole interval. The
decoder reads the interval ``--chunk`` tokens per call (the multi-token step: the same result as one token per
call). int8 = FastDecoder(model, state, quantize="int8") on the fp32 model (in_proj / out_proj / the tied
embedding-LM head int8 with per-row fp32 scales; activations and state fp32); bf16 = the model cast to bf16.
Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "apps" / "genomics" / "assets" / "dna_small"
SAMPLE = ROOT / "datasets" / "samples" / "ecoli_k12_w3110_300kb.fa.gz"


def decoder_bits(model, ids: torch.Tensor, quantize: str | None, chunk: int, vocab: int, keep: torch.Tensor):
    """(bits/base, scored bases) of ids[1:] given the prefix, through FastDecoder (state carried)."""
    from ssm_core.models.fast_decode import FastDecoder

    dec = FastDecoder(model, model.empty_state(1), quantize=quantize)
    inputs, targets = ids[:-1], ids[1:]
    nll = []
    with torch.inference_mode():
        for a in range(0, len(inputs), chunk):
            piece = inputs[a: a + chunk][None]
            logits = dec.forward(piece, piece.shape[1])[0, :, :vocab].float()
            nll.append(F.cross_entropy(logits, targets[a: a + chunk], reduction="none"))
    nll = torch.cat(nll)[keep]
    return float(nll.double().sum()) / len(nll) / math.log(2), len(nll)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(CKPT))
    p.add_argument("--genome", default=str(SAMPLE), help="FASTA (plain or bgzip); the first record is read")
    p.add_argument("--bases", type=int, default=30000, help="the last this many bases of the first record")
    p.add_argument("--chunk", type=int, default=512, help="tokens per decoder call")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from apps.common.evaluate import sequence_nll
    from apps.genomics.data import A_ID, T_ID, VOCAB_SIZE, FastaReader
    from apps.genomics.evaluate import load_model

    fasta = FastaReader(args.genome)
    name = fasta.names[0]
    n = fasta.length(name)
    start = max(0, n - args.bases)
    ids = fasta.tokens(name, start, n).long()
    keep = (ids[1:] >= A_ID) & (ids[1:] <= T_ID)
    model = load_model(args.ckpt).float().eval()
    print(f"{args.genome} record {name} bases [{start:,}, {n:,}); {args.ckpt}", flush=True)

    rows = []
    t0 = time.process_time()
    with torch.inference_mode():
        nll = sequence_nll(model, ids, vocab_size=VOCAB_SIZE)[keep]
    rows.append(("module forward", "fp32", float(nll.double().sum()) / len(nll) / math.log(2), len(nll), None,
                 time.process_time() - t0))
    from ssm_core.models.fast_decode import FastDecoder

    for wname, dtype, quant in (("fp32", torch.float32, None), ("bf16", torch.bfloat16, None),
                                ("int8", torch.float32, "int8")):
        m = model.to(dtype)
        nbytes = FastDecoder(m, m.empty_state(1), quantize=quant).weight_bytes
        t0 = time.process_time()
        bpb, nb = decoder_bits(m, ids, quant, args.chunk, VOCAB_SIZE, keep)
        rows.append(("decode step", wname, bpb, nb, nbytes, time.process_time() - t0))
        model = model.float()
    ref = rows[1][2]
    print("\n| path | weights | bits/base | vs fp32 step | scored bases | weight bytes / step | CPU s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for path, w, bpb, nb, nbytes, secs in rows:
        print(f"| {path} | {w} | {bpb:.5f} | {bpb - ref:+.5f} | {nb:,} | "
              f"{'' if nbytes is None else f'{nbytes:,}'} | {secs:.1f} |")
    return rows


if __name__ == "__main__":
    main()
