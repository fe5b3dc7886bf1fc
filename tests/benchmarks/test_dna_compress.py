"""benchmarks.dna_compress: the adaptive order-k Markov code length is right where the answer is known, the
compressor and model columns measure the same cleaned bases, and the command runs end to end on a tiny FASTA."""

import gzip
import math

import numpy as np
import pytest
import torch

from benchmarks import dna_compress as dc

pytestmark = pytest.mark.usefixtures("one_thread")


def _naive_bits(codes, k, alpha):
    """The definition, one base at a time: counts of everything before t in the previous-k-bases context."""
    counts, total = {}, 0.0
    for t, x in enumerate(codes):
        ctx = ("start", t) if t < k else tuple(codes[t - k:t])
        c = counts.setdefault(ctx, [0, 0, 0, 0])
        total += -math.log2((c[x] + alpha) / (sum(c) + 4 * alpha))
        c[x] += 1
    return total


@pytest.mark.parametrize("k", [0, 1, 3, 5])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_vectorised_markov_equals_the_definition(k, alpha):
    rng = np.random.default_rng(k)
    codes = rng.choice(4, size=600, p=[0.4, 0.1, 0.1, 0.4]).astype(np.uint8)
    codes[300:400] = codes[100:200]  # a repeat, so high orders see contexts again
    assert dc.markov_bits(codes, k, alpha) == pytest.approx(_naive_bits(codes.tolist(), k, alpha), rel=1e-12)


def test_periodic_sequence_costs_almost_nothing_at_orders_above_the_period():
    period = np.array([0, 2, 1, 3, 3, 0, 1], dtype=np.uint8)  # period 7, no shorter period
    codes = np.tile(period, 20_000 // 7)
    bpb = dc.markov_sweep(codes, 10)
    for k in range(7, 11):
        assert bpb[k] < 0.01, (k, bpb[k])  # log terms only: ~ contexts * log2(n) / n
    assert bpb[1] > 0.5  # order 1 cannot resolve a period-7 pattern with repeated letters


def test_iid_uniform_sequence_costs_two_bits():
    codes = np.random.default_rng(0).integers(0, 4, 200_000).astype(np.uint8)
    bpb = dc.markov_sweep(codes, 3)
    for k, v in bpb.items():
        assert 2.0 - 1e-3 < v < 2.01, (k, v)  # random data does not compress; learning costs ~ contexts/n
    sizes = dc.compressed_sizes(np.frombuffer(b"ACGT", np.uint8)[codes].tobytes())
    for name, size in sizes.items():
        if size is not None:
            assert 8 * size / len(codes) > 1.95, name  # no compressor beats the entropy


def _naive_mixture_bits(log2p, gamma):
    """The definition, one base at a time: weights from the discounted products of past probabilities."""
    M, n = log2p.shape
    logw, total = np.zeros(M), 0.0
    for t in range(n):
        w = 2.0 ** (logw - logw.max())
        w /= w.sum()
        total -= math.log2(float((w * 2.0 ** log2p[:, t]).sum()))
        logw = gamma * logw + log2p[:, t]
    return total


@pytest.mark.parametrize("gamma", [0.9, 0.995, 1.0])
def test_mixture_equals_the_definition(gamma):
    rng = np.random.default_rng(4)
    log2p = np.log2(rng.dirichlet(np.ones(4), size=(3, 400))[..., 0])  # each predictor's p of the base that came
    assert dc.mixture_bits(log2p, gamma) == pytest.approx(_naive_mixture_bits(log2p, gamma), rel=1e-10)


def test_mixture_follows_the_best_predictor_lately():
    """gamma = 1 (Bayes) is within log2 M bits of the best single predictor; with forgetting, a skewed random
    sequence with a long repeat costs less than under any one order: order 1 on the random parts (~1.36 bits a
    base), order 16 in the copy (~1 bit: a context seen once, Krichevsky-Trofimov)."""
    rng = np.random.default_rng(5)
    draw = lambda n: rng.choice(4, n, p=[0.7, 0.1, 0.1, 0.1]).astype(np.uint8)  # noqa: E731
    part = draw(6000)
    codes = np.concatenate([part, draw(3000), part])
    orders = np.stack([dc.markov_log2p(codes, k) for k in (1, 2, 16)])
    single = -orders.sum(1)
    assert dc.mixture_bits(orders, 1.0) <= single.min() + math.log2(3) + 1e-9
    assert dc.mixture_bits(orders, 0.99) < single.min() - 1500  # 6,000 copied bases at ~1 bit, not ~1.36
    with pytest.raises(ValueError, match="gamma"):
        dc.mixture_bits(orders, 0.0)
    with pytest.raises(ValueError, match="predictors, bases"):
        dc.mixture_bits(orders[0], 0.99)


def _write(path, text):
    with gzip.open(path, "wt") as f:
        f.write(text)
    return path


def test_reader_removes_and_counts_non_acgt_runs(tmp_path):
    fa = _write(tmp_path / "g.fa.gz", ">chr1 desc\nACGTNNNNacgt\nRYAC\n>plasmid\nNNGGCCNN\n")
    g = dc.read_genome(fa)
    assert g.name == "g"
    assert [n for n, _ in g.records] == ["chr1", "plasmid"]
    assert g.text() == b"ACGTACGTAC" + b"GGCC"
    assert g.removed == 4 + 2 + 4 and g.removed_runs == 4  # NNNN, RY, NN, NN
    with pytest.raises(ValueError, match="before the first"):
        dc.read_genome(_write(tmp_path / "bad.fa.gz", "ACGT\n>x\nACGT\n"))


def test_command_runs_on_a_tiny_fasta_and_writes_its_block(tmp_path):
    rng = np.random.default_rng(1)
    seq = "".join(rng.choice(list("ACGT"), 700)) + "NNNN" + "ACGTTGCA" * 40
    fa = tmp_path / "tiny.fa"
    fa.write_text(">r1\n" + "\n".join(seq[i:i + 60] for i in range(0, len(seq), 60)) + "\n>r2\nA\n")
    doc = tmp_path / "genomics.md"
    doc.write_text("# Genomics\n\n<!-- dna_compress:begin -->\nold\n<!-- dna_compress:end -->\n\nafter\n")
    rows = dc.main(["--fasta", str(fa), "--max-order", "6", "--doc", str(doc), "--chunk-len", "256"])
    (r,) = rows
    assert r.bases == 700 + 320 + 1 and r.removed == 4 and r.records == 2
    assert set(r.markov) == set(range(1, 7)) and r.markov[r.best_k] < 2.1
    assert r.model is not None and 1.0 < r.model < 3.0  # the shipped model, charged for every base
    assert all(v is None or v > 1.0 for v in r.compressors.values())
    assert set(r.mix) == {dc.MIX_MARKOV, dc.MIX_HISS}  # the mixtures, by default
    assert r.mix[dc.MIX_MARKOV] <= min(r.markov.values()) + 0.1 and r.mix[dc.MIX_HISS] <= r.model + 0.1
    text = doc.read_text()
    assert f"| {dc.MIX_HISS} |" in text and f"{dc.MIX_HISS} below every classical coder" in text
    assert "old" not in text and text.rstrip().endswith("after")
    assert "| tiny | 1,021 (4 in 1 runs) |" in text and "order-k Markov" in text


def test_model_code_length_is_the_evaluator_s_bits_per_base(tmp_path):
    """The hiss column is exactly apps.genomics.evaluate.bits_per_base on the record, plus 2 bits for its first
    base: the number a user gets from `python -m apps.genomics.evaluate` on the same sequence."""
    from apps.genomics.data import FastaReader, Interval
    from apps.genomics.evaluate import bits_per_base, load_model

    seq = "".join(np.random.default_rng(2).choice(list("ACGT"), 500))
    fa = tmp_path / "one.fa"
    fa.write_text(">s\n" + seq + "\n")
    bits, n = dc.model_bits(dc.DEFAULT_CKPT, dc.read_genome(fa), chunk_len=128, progress=False)
    ref, scored = bits_per_base(load_model(dc.DEFAULT_CKPT), FastaReader(fa), [Interval("s", 0, 500, "test")],
                                progress=False)
    assert n == 500 and scored == 499
    assert bits == pytest.approx(ref * 499 + 2.0, rel=1e-9)


def test_held_out_split_rows_and_context_sweep(tmp_path):
    """--bed scores each test interval of a multi-genome FASTA as its own row (cut by --max-bases); a context of
    at least the record's length is the whole-record number, a short one scores each window from scratch."""
    from apps.common.evaluate import sequence_nll
    from apps.genomics.data import A_ID, VOCAB_SIZE
    from apps.genomics.evaluate import load_model

    rng = np.random.default_rng(3)
    recs = {name: "".join(rng.choice(list("ACGT"), n)) for name, n in (("gi|1|ref|NC_1.1|", 300), ("chrB", 260),
                                                                        ("chrC", 200))}
    fa = tmp_path / "set.fa"
    fa.write_text("".join(f">{k}\n{v}\n" for k, v in recs.items()))
    bed = tmp_path / "set.bed"
    bed.write_text("gi|1|ref|NC_1.1|\t0\t300\ttest\nchrB\t0\t200\ttrain\nchrB\t200\t260\tval\nchrC\t0\t200\ttest\n")
    doc = tmp_path / "g.md"
    doc.write_text("<!-- dna_compress:begin -->\n<!-- dna_compress:end -->\n")
    rows = dc.main(["--fasta", str(fa), "--bed", str(bed), "--max-bases", "250", "--max-order", "4",
                    "--contexts", "64", "1000", "--doc", str(doc), "--chunk-len", "128"])
    assert [(r.genome, r.bases) for r in rows] == [("NC_1.1", 250), ("chrC", 200)]
    for r in rows:
        assert r.contexts[1000] == pytest.approx(r.model, rel=1e-9)  # one window = the whole record
    model, g = load_model(dc.DEFAULT_CKPT), dc.read_split(fa, bed, "test", 250)[1]
    ids = torch.tensor([A_ID + "ACGT".index(c) for c in recs["chrC"]])
    want = sum(2.0 + float(sequence_nll(model, ids[s: s + 64], vocab_size=VOCAB_SIZE).double().sum()) / math.log(2)
               for s in range(0, 200, 64))
    assert dc.context_bits(model, g, 64, progress=False) == pytest.approx(want, rel=1e-6)
    assert "C = 64" in doc.read_text() and "first 250 bases" in doc.read_text()
    with pytest.raises(SystemExit):
        dc.main(["--fasta", str(fa), "--max-bases", "10", "--no-docs"])  # --max-bases needs --bed
    # --records: only the named records of the split, named in the doc's scope; an unknown name is refused
    only = dc.main(["--fasta", str(fa), "--bed", str(bed), "--max-bases", "250", "--max-order", "4", "--no-model",
                    "--records", "chrC", "--doc", str(doc)])
    assert [r.genome for r in only] == ["chrC"] and "interval of chrC in" in doc.read_text()
    with pytest.raises(SystemExit):
        dc.main(["--fasta", str(fa), "--bed", str(bed), "--records", "chrB", "--no-docs"])  # chrB is not in test
