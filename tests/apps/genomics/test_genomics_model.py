"""apps.genomics.model and predict: RC equivariance (float64, exact), bidirectionality, padding, pooling, masking,
checkpoints, backbone initialisation; per-base log-likelihood, variant scores, embeddings, generation."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apps.common import HeadConfig
from apps.common.baselines import count_parameters
from apps.genomics.data import A_ID, MASK_ID, N_ID, PAD_ID, T_ID, VOCAB_SIZE, decode, encode
from apps.genomics.model import (
    DNAModel,
    backbone_config,
    check_head,
    complement_map,
    load_backbone_weights,
    mask_tokens,
    rc_ids,
)
from apps.genomics.predict import (
    SequenceDict,
    embed,
    generate_dna,
    per_base_loglik,
    read_fasta_records,
    read_variants,
    save_embeddings,
    score_variants,
)
from ssm_core import MambaConfig, MambaLMHeadModel

pytestmark = pytest.mark.usefixtures("one_thread", "ref_backend")


@pytest.fixture(scope="module")
def ref_backend():
    """Tiny models: the pure-PyTorch scan, so no compiled-kernel build happens inside these tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HISS_BACKEND", "ref")
        yield

# residual_in_fp32=False: keep the residual stream in float64 for exact-equivariance checks
CFG = MambaConfig(d_model=16, n_layer=2, vocab_size=VOCAB_SIZE, ssm_cfg={"d_state": 4}, residual_in_fp32=False)


def make(task: str, backbone: str, pooling: str = "mean", num_labels: int = 3) -> DNAModel:
    torch.manual_seed(0)
    head = HeadConfig(task=task, num_labels=num_labels, pooling=pooling, backbone=backbone)
    return DNAModel(backbone_config(CFG, backbone), head).double().eval()


def bases(batch: int, L: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(A_ID, N_ID + 1, (batch, L), generator=torch.Generator().manual_seed(seed))


def test_complement_map_and_rc_ids():
    comp = complement_map(16)
    assert decode(comp[encode("ACGTN")]) == "TGCAN"
    assert comp[PAD_ID] == PAD_ID and comp[15] == 15 and torch.equal(comp[comp], torch.arange(16))
    x = encode("AACGT")[None]
    assert decode(rc_ids(x)[0]) == "ACGTT"
    padded = torch.tensor([[A_ID, A_ID, C, PAD_ID] for C in [encode("C")[0]]])
    assert torch.equal(rc_ids(padded, torch.tensor([3])), torch.tensor([[encode("G")[0], T_ID, T_ID, PAD_ID]]))


@pytest.mark.parametrize("task", ["mlm", "token", "sequence"])
def test_rcps_is_exactly_rc_equivariant(task):
    m = make(task, "rcps")
    x = bases(3, 41)
    with torch.no_grad():
        a, b = m(x), m(rc_ids(x))
    if task == "mlm":  # logits(rc x)[L-1-t, comp v] == logits(x)[t, v]
        err = (b.flip(1)[..., complement_map(a.shape[-1])] - a).abs().max()
    elif task == "token":  # per-base outputs follow their base pair
        err = (b.flip(1) - a).abs().max()
    else:  # pooled: invariant
        err = (b - a).abs().max()
    assert a.dtype == torch.float64 and float(err) < 1e-10
    assert float(a.abs().max()) > 1e-3  # not trivially zero


def test_rcps_equivariance_with_padding_and_max_pooling():
    m = make("sequence", "rcps", pooling="max")
    lengths = torch.tensor([41, 23, 7])
    x = bases(3, 41)
    x[torch.arange(41)[None] >= lengths[:, None]] = PAD_ID
    with torch.no_grad():
        a, b = m(x, lengths), m(rc_ids(x, lengths), lengths)
        alone = m(x[1:2, :23])  # a padded row equals the row on its own
    assert float((a - b).abs().max()) < 1e-10
    assert float((alone - a[1:2]).abs().max()) < 1e-10


def test_bimamba_is_bidirectional_but_not_rc_equivariant():
    m = make("token", "bimamba")
    x = bases(2, 30)
    y = x.clone()
    y[:, -1] = torch.where(y[:, -1] == A_ID, T_ID, A_ID)  # change only the last base
    with torch.no_grad():
        a, b = m(x), m(y)
        assert float((a[:, 0] - b[:, 0]).abs().max()) > 1e-8  # position 0 saw the future
        seq = make("sequence", "bimamba")
        assert float((seq(x) - seq(rc_ids(x))).abs().max()) > 1e-6
        causal = make("token", "mamba")
        assert float((causal(x)[:, :-1] - causal(y)[:, :-1]).abs().max()) == 0.0


def test_transformer_baseline_is_noncausal_and_same_size():
    cfg = MambaConfig(d_model=64, n_layer=2, vocab_size=VOCAB_SIZE)
    t = backbone_config(cfg, "transformer")
    assert t.attn_cfg["causal"] is False and t.attn_layer_idx == list(range(t.n_layer))
    mamba, trans = count_parameters(backbone_config(cfg, "bimamba")), count_parameters(t)
    assert abs(trans - mamba) / mamba < 0.1, (trans, mamba)
    m = DNAModel(replace(t, residual_in_fp32=False), HeadConfig(task="token", backbone="transformer")).double().eval()
    x = bases(1, 20)
    y = x.clone()
    y[0, -1] = A_ID if y[0, -1] != A_ID else C_ID()
    with torch.no_grad():
        assert float((m(x)[0, 0] - m(y)[0, 0]).abs().max()) > 1e-8
    with pytest.raises(ValueError, match="padding mask"):
        m(x, torch.tensor([10]))


def C_ID():
    return int(encode("C")[0])


def test_head_config_errors():
    with pytest.raises(ValueError, match="RC-invariant"):
        check_head(HeadConfig(task="sequence", backbone="rcps", pooling="first"))
    with pytest.raises(ValueError, match="RC-invariant"):
        check_head(HeadConfig(task="sequence", backbone="rcps", pooling="center"))
    with pytest.raises(ValueError, match="backbone must be one of"):
        DNAModel(CFG, HeadConfig(task="sequence", backbone="cnn"))
    with pytest.raises(ValueError, match="task"):
        HeadConfig(task="regression")
    with pytest.raises(ValueError, match="bidirectional"):
        DNAModel(CFG, HeadConfig(task="mlm", backbone="rcps"))  # causal config for an RC model


def test_mask_tokens_bert_recipe():
    ids = bases(64, 500)
    ids[:, :3] = torch.tensor([0, 2, PAD_ID])  # specials are never masked
    inputs, labels = mask_tokens(ids, 0.15, torch.Generator().manual_seed(0))
    chosen = labels != -100
    assert not chosen[:, :3].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert abs(float(chosen.float().mean()) - 0.15) < 0.01
    frac_mask = float((inputs[chosen] == MASK_ID).float().mean())
    kept = float((inputs[chosen] == ids[chosen]).float().mean())
    assert abs(frac_mask - 0.8) < 0.02 and 0.1 < kept < 0.16  # 10% kept + random bases equal by chance
    assert torch.equal(inputs[~chosen], ids[~chosen])
    short = torch.full((4, 3), A_ID)
    assert ((mask_tokens(short, 0.0)[1] != -100).sum(1) == 1).all()  # every row contributes


@pytest.mark.parametrize("task,backbone", [("mlm", "rcps"), ("sequence", "bimamba"), ("token", "transformer")])
def test_save_load_roundtrip(tmp_path, task, backbone):
    m = make(task, backbone).float()
    m.head_config.labels = ["a", "b", "c"] if task != "mlm" else []
    m.save_pretrained(tmp_path)
    back = DNAModel.from_pretrained(tmp_path)
    x = bases(2, 17)
    with torch.no_grad():
        assert torch.equal(m(x), back(x))
    assert back.head_config == m.head_config


def test_backbone_from_causal_checkpoint(tmp_path):
    torch.manual_seed(1)
    lm = MambaLMHeadModel(CFG)
    lm.save_pretrained(tmp_path)
    m = make("sequence", "bimamba").float()
    assert load_backbone_weights(m.backbone, tmp_path) > 0
    own = m.backbone.core.layers[1].mixer.mixer.in_proj.weight
    assert torch.equal(own, lm.backbone.layers[1].mixer.in_proj.weight)
    with pytest.raises(ValueError, match="shape mismatch"):
        big = DNAModel(backbone_config(replace(CFG, d_model=32), "bimamba"), HeadConfig(backbone="bimamba"))
        load_backbone_weights(big.backbone, tmp_path)


# --- inference ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return MambaLMHeadModel(replace(CFG, residual_in_fp32=True)).eval()


def test_causal_loglik_matches_full_forward(lm):
    seq = "ACGTTGCAACGGTACCATG"
    ll = per_base_loglik(lm, seq, chunk_len=5)  # pieces with the carried state
    ids = encode(seq)
    ref = lm(ids[None]).logits[0, :-1, :VOCAB_SIZE].log_softmax(-1).gather(1, ids[1:, None])[:, 0]
    assert np.isnan(ll[0]) and np.allclose(ll[1:], ref.detach().numpy(), atol=1e-5)


def test_masked_pseudo_loglik_matches_single_mask():
    m = make("mlm", "bimamba").float()
    seq = "ACGTTGCAACGG"
    ll = per_base_loglik(m, seq, batch=5)
    ids = encode(seq)
    x = ids.clone()
    x[7] = MASK_ID
    with torch.no_grad():
        want = m(x[None])[0, 7, :VOCAB_SIZE].log_softmax(-1)[ids[7]]
    assert abs(ll[7] - float(want)) < 1e-5 and np.all(ll < 0)


def test_variant_scores_and_errors(lm):
    genome = SequenceDict({"chr1": "ACGTTGCAACGGTACCATGCATGCA" * 4})
    rows = score_variants(lm, genome, read_variants("chr1 5 T G\nchr1 10 C CTT\n"), flank=8)
    ll_ref = np.nansum(per_base_loglik(lm, genome.fetch("chr1", 0, 13)))
    ll_alt = np.nansum(per_base_loglik(lm, "ACGT" + "G" + genome.fetch("chr1", 5, 13)))
    assert abs(rows[0]["llr"] - (ll_alt - ll_ref)) < 1e-4 and rows[1]["alt"] == "CTT"
    msg = r"calls\.txt:3: ref allele A does not match the genome at chr1:5 \(genome has T\)"
    with pytest.raises(ValueError, match=msg):
        score_variants(lm, genome, read_variants("# header\nchr1 4 T C\nchr1 5 A G\n", name="calls.txt"))
    with pytest.raises(ValueError, match="v:1: .*no sequence named 'chr2'"):
        score_variants(lm, genome, read_variants("chr2 5 T G", name="v"))
    with pytest.raises(ValueError, match="v:1: expected 4 columns"):
        read_variants("chr1 5 T", name="v")
    vcf = "##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\nchr1\t5\t.\tT\tG,A\n"
    assert [(v.pos, v.alt, v.where) for v in read_variants(vcf, name="x.vcf")] == [(5, "G", "x.vcf:3"),
                                                                                   (5, "A", "x.vcf:3")]
    mlm = make("mlm", "rcps").float()
    snv = score_variants(mlm, genome, read_variants("chr1 5 T G"), flank=8)[0]
    assert snv["llr"] == pytest.approx(snv["ll_alt"] - snv["ll_ref"])
    with pytest.raises(ValueError, match="single-base"):
        score_variants(mlm, genome, read_variants("chr1 10 C CTT", name="v"))


def test_generation_bases_only_and_seeded(lm):
    a = generate_dna(lm, "ACGTACGT", 40, seed=3)
    assert len(a) == 40 and set(a) <= set("ACGT") and a == generate_dna(lm, "ACGTACGT", 40, seed=3)
    greedy = generate_dna(lm, "ACGTACGT", 5, temperature=0)
    ids = encode("ACGTACGT")
    for base in greedy:  # greedy equals argmax over the four bases of a full forward pass
        logits = lm(ids[None]).logits[0, -1]
        assert base == "ACGT"[int(logits[A_ID: T_ID + 1].argmax())]
        ids = torch.cat([ids, encode(base)])
    with pytest.raises(ValueError, match="causal"):
        generate_dna(make("mlm", "rcps"), "ACGT", 5)


def test_embeddings_export(lm, tmp_path):
    from safetensors.numpy import load_file

    e = embed(lm, "ACGTTGCA")
    full = lm.backbone(encode("ACGTTGCA")[None])[0]
    assert np.allclose(e, full.mean(0).detach().numpy(), atol=1e-6)
    save_embeddings(tmp_path / "e.npy", ["a", "b"], [e, e * 2])
    assert np.load(tmp_path / "e.npy").shape == (2, 16)
    assert (tmp_path / "e.names.txt").read_text().split() == ["a", "b"]
    per = [embed(lm, "ACGT", per_base=True), embed(lm, "ACGTTG", per_base=True)]
    save_embeddings(tmp_path / "p.safetensors", ["a", "b"], per)
    assert load_file(tmp_path / "p.safetensors")["b"].shape == (6, 16)
    with pytest.raises(ValueError, match="safetensors"):
        save_embeddings(tmp_path / "p.npy", ["a", "b"], per)
    # RC model embeddings are strand-invariant after pooling
    m = make("sequence", "rcps")
    s = "ACGTTGCAAGGT"
    rc = decode(rc_ids(encode(s)[None])[0])
    assert np.allclose(embed(m, s), embed(m, rc), atol=1e-10)


def test_read_fasta_records_errors():
    assert read_fasta_records(">a x\nACG\nTT\n>b\nGG\n") == {"a": "ACGTT", "b": "GG"}
    assert read_fasta_records("acgt\nAC") == {"seq1": "ACGTAC"}
    with pytest.raises(ValueError, match="in.fa:3: character 'X' at column 1"):
        read_fasta_records(">a\nACG\nXA\n", "in.fa")
    with pytest.raises(ValueError, match="duplicate"):
        read_fasta_records(">a\nA\n>a\nC\n")
    with pytest.raises(ValueError, match="no sequence"):
        read_fasta_records(">a\n>b\nAC\n")


def test_classifier_logits_shapes():
    x = bases(2, 9)
    assert make("sequence", "rcps")(x).shape == (2, 3)
    assert make("token", "bimamba", num_labels=5)(x).shape == (2, 9, 5)
    assert make("mlm", "bimamba")(x).shape == (2, 9, CFG.padded_vocab_size)
    assert F.softmax(make("sequence", "transformer")(x), -1).sum(-1).allclose(torch.ones(2, dtype=torch.float64))
