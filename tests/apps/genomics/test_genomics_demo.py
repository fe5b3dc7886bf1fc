"""apps.genomics.demo: the UI builds without a server, and its handlers work on a tiny saved model."""


import pytest
import torch

from apps.common import HeadConfig
from apps.common.demo import gr
from apps.genomics import demo
from apps.genomics.data import VOCAB_SIZE
from apps.genomics.model import DNAModel, backbone_config
from apps.genomics.predict import load_model
from ssm_core import MambaConfig, MambaLMHeadModel

pytestmark = pytest.mark.usefixtures("one_thread", "ref_backend")
CFG = MambaConfig(d_model=16, n_layer=2, vocab_size=VOCAB_SIZE, ssm_cfg={"d_state": 4})
FASTA = ">a desc\nACGTGGCCAATTGCGC\nGGCATT\n>b\nATATATATGCGCAT\n"


@pytest.fixture(scope="module")
def ref_backend():
    """Tiny models: the pure-PyTorch scan, so no compiled-kernel build happens inside these tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HISS_BACKEND", "ref")
        yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lm")
    MambaLMHeadModel(CFG).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm(ckpt):
    return load_model(ckpt)


def test_build_demo_with_and_without_checkpoint(ckpt, monkeypatch, tmp_path):
    assert isinstance(demo.build_demo(str(ckpt)), gr.Blocks)
    monkeypatch.setattr(demo, "LM_CANDIDATES", [tmp_path / "nothing"])
    monkeypatch.setattr(demo, "CLASSIFIER_CANDIDATES", [tmp_path / "nothing"])
    with pytest.raises(FileNotFoundError, match="no checkpoint found.*apps.genomics.train"):
        demo.find_lm()
    assert isinstance(demo.build_demo(), gr.Blocks)  # the page still builds and says what is missing
    with pytest.raises(gr.Error, match="no language model loaded"):
        demo.analyse(None, FASTA)
    assert "No classifier checkpoint found" in demo.classify({}, FASTA)


def test_analyse_plot_and_gc(lm):
    fig, md = demo.analyse(lm, FASTA)
    axes = [ax for ax in fig.axes if ax.get_ylabel() == "bits"]
    assert len(axes) == 2
    surprisal = axes[0].lines[0].get_ydata()
    assert len(surprisal) == 22 and all(v > 0 for v in surprisal[1:])
    assert "| a | 22 | 59.1 |" in md and "| b | 14 | 28.6 |" in md  # GC: 13/22, 4/14


def test_input_caps_and_errors(lm):
    with pytest.raises(gr.Error, match="at most"):
        demo.analyse(lm, "A" * (demo.MAX_CHARS + 1))
    with pytest.raises(gr.Error, match="character 'Z' at column 3"):
        demo.analyse(lm, ">a\nACZ\n")
    with pytest.raises(gr.Error, match="paste"):
        demo.analyse(lm, "  ")


def test_variant_table(lm):
    rows = demo.variant_table(lm, FASTA, "a 2 C T\nb 3 A G\n")
    assert [r[:4] for r in rows] == [["a", 2, "C", "T"], ["b", 3, "A", "G"]]
    assert all(isinstance(r[4], float) for r in rows)
    with pytest.raises(gr.Error, match=r"variants:2: ref allele A does not match the genome at a:3 \(genome has G\)"):
        demo.variant_table(lm, FASTA, "a 2 C T\na 3 A G\n")


def test_continuation(lm):
    out = demo.continuation(lm, FASTA, n=30, temperature=0.8, seed=1)
    header, *body = out.splitlines()
    seq = "".join(body)
    assert header.startswith(">b_continued") and seq.startswith("ATATATATGCGCAT")
    new = seq[len("ATATATATGCGCAT"):]
    assert len(new) == 30 and set(new) <= set("acgt")
    assert out == demo.continuation(lm, FASTA, n=30, temperature=0.8, seed=1)


def test_classify_with_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = DNAModel(backbone_config(CFG, "rcps"), HeadConfig(num_labels=3, backbone="rcps", labels=["EI", "IE", "N"]))
    model.save_pretrained(tmp_path / "splice_classifier")
    found = demo.find_classifiers([tmp_path / "splice_classifier", tmp_path / "absent"])
    md = demo.classify(found, FASTA)
    assert "splice_classifier" in md and "| a |" in md and "| b |" in md
    assert any(lab in md for lab in ("EI", "IE", "N"))


def test_read_upload(tmp_path):
    import gzip

    p = tmp_path / "x.fa.gz"
    with gzip.open(p, "wt") as f:
        f.write(FASTA)
    assert demo.read_upload(str(p)) == FASTA and demo.read_upload(None) == ""


def test_a_mistyped_ckpt_is_an_error_not_the_default_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint there"):
        demo.find_lm(str(tmp_path / "typo"))


@pytest.mark.parametrize("content, name, message", [
    (bytes(range(256)) * 4, "random.bin", "not a text FASTA file \\(binary byte 0x00 at offset 0\\)"),
    (b"\x1f\x8b\x08\x00garbage", "reads.fa.gz", "reads.fa.gz: cannot read it"),
    (b">p\n\xff\xfeACGT\n", "latin.fa", "invalid UTF-8 at byte 3"),
])
def test_bad_uploads_are_named(tmp_path, content, name, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(gr.Error, match=message):
        demo.read_upload(str(path))


def test_protein_letters_are_not_scored_as_dna(lm):
    protein = ">insulin\nMALWMRLLPLLALLALWGPDPAAAFVNQHLCGSHLVEALYLVCGERGFFYTPKTRREAEDLQVGQ\n"
    letters = ">iupac\n" + "RYKMSWBDHV" * 5 + "\n"
    with pytest.raises(gr.Error, match="IUPAC ambiguity codes"):
        demo.analyse(lm, letters)
    with pytest.raises(gr.Error):  # E, F, I, L, P, Q are not nucleotide letters at all
        demo.analyse(lm, protein)
