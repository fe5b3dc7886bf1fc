"""Gradio demo for the DNA models: ``python -m apps.genomics.demo [--ckpt DIR] [--port 7860]``.

Paste or upload FASTA -> per-base surprisal along the sequence (and GC content), the predicted class of each
record from any fine-tuned classifier found, a variant-effect table (log-likelihood ratios) and a sampled
continuation. Language model: ``--ckpt``, else ``runs/genomics/pretrained`` (``python -m apps.genomics.train``),
else the shipped ``apps/genomics/assets/dna_bacteria`` (the multi-genome model). Classifiers:
``runs/genomics/{splice,genus}_classifier`` (``python -m apps.genomics.finetune``). Served on 127.0.0.1 only;
inputs are capped so the CPU stays responsive.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure registry

from apps.common.demo import cap_text, checked_seed, demo_main, find_checkpoint, gr
from apps.common.errors import run_cli
from apps.common.paths import REPO_ROOT, default_checkpoints, run_dir
from apps.genomics.model import HOW_TO_TRAIN, SHIPPED_LM
from apps.genomics.predict import (
    SequenceDict,
    generate_dna,
    load_model,
    model_kind,
    per_base_loglik,
    read_fasta_records,
    read_variants,
    score_variants,
)

__all__ = ["build_demo", "analyse", "classify", "variant_table", "continuation", "read_upload", "find_lm",
           "find_classifiers", "main"]

LM_CANDIDATES = default_checkpoints("genomics", shipped=SHIPPED_LM)
CLASSIFIER_CANDIDATES = [REPO_ROOT / run_dir("genomics") / f"{task}_classifier" for task in ("splice", "genus")]
MAX_CHARS = 60_000  # pasted/uploaded FASTA text
MAX_BASES = 20_000  # bases scored per request
MAX_VARIANTS = 50
MAX_NEW = 2_000
AMBIGUITY_CODES = "RYKMSWBDHV"  # read as N by the tokenizer
EXAMPLE = (">ecoli_thrL_region\nAGCTTTTCATTCTGACTGCAACGGGCAATATGTCTCTGTGTGGATTAAAAAAAGAGTGTCTGATAGCAGCTTCTGAACTGGTTACC"
           "TGCCGTGAGTAAATTAAAATTTTATTGACTTAGGTCACTAAATACTTTAACCAATATAGGCATAGCGCACAGACAGATAAAAATTACAGAGTACACAA"
           "CATCCATGAAACGCATTAGCACCACCATTACCACCACCATCACCATTACCACAGGTAACGGTGCGGGCTGACGCGTACAGGAAACACAGAAAAAAG\n")
EXAMPLE_VARIANTS = "ecoli_thrL_region 30 A G\necoli_thrL_region 120 G T\n"


def find_lm(ckpt: str | None = None) -> Path:
    """The language-model checkpoint to serve, or FileNotFoundError naming where it looked."""
    return find_checkpoint(LM_CANDIDATES, HOW_TO_TRAIN, ckpt)


def find_classifiers(candidates: list[Path] | None = None) -> dict[str, object]:
    """{folder name: DNAModel} for every classifier checkpoint present."""
    found = {}
    for c in candidates if candidates is not None else CLASSIFIER_CANDIDATES:
        if (Path(c) / "head.json").is_file():
            model = load_model(c)
            if model_kind(model) == "sequence":
                found[Path(c).name] = model
    return found


def read_upload(path: str | None) -> str:
    """Text of an uploaded FASTA (plain or .gz), capped; a binary or corrupt file is refused by name."""
    if not path:
        return ""
    p = Path(path)
    try:
        with (gzip.open(p, "rb") if p.suffix == ".gz" else open(p, "rb")) as f:
            raw = f.read(MAX_CHARS + 1)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a truncated .gz ends in EOFError
        raise gr.Error(f"{p.name}: cannot read it ({e}); upload a FASTA file, plain or .gz") from None
    bad = next((i for i, b in enumerate(raw[:65536]) if b == 0 or (b < 32 and b not in (9, 10, 13))), None)
    if bad is not None:
        raise gr.Error(f"{p.name}: not a text FASTA file (binary byte 0x{raw[bad]:02x} at offset {bad})")
    try:
        text = raw.decode("utf-8") if len(raw) <= MAX_CHARS else raw[:MAX_CHARS + 1].decode("utf-8", "ignore")
    except UnicodeDecodeError as e:
        raise gr.Error(f"{p.name}: not a text FASTA file (invalid UTF-8 at byte {e.start})") from None
    return cap_text(text, MAX_CHARS, f"uploaded file {p.name}")


def _records(text: str) -> dict[str, str]:
    cap_text(text, MAX_CHARS, "FASTA text")
    if not text.strip():
        raise gr.Error("paste a FASTA record (or a bare sequence) or upload a file")
    try:
        recs = read_fasta_records(text, "pasted FASTA")
    except ValueError as e:
        raise gr.Error(str(e)) from None
    total = sum(len(s) for s in recs.values())
    if total > MAX_BASES:
        raise gr.Error(f"{total:,} bases in total; this demo scores at most {MAX_BASES:,}")
    for name, seq in recs.items():
        ambiguous = sum(seq.count(c) for c in AMBIGUITY_CODES)
        if ambiguous > 0.25 * len(seq):  # IUPAC codes are rare in real DNA; protein letters are mostly codes
            raise gr.Error(f"record {name!r}: {ambiguous:,} of its {len(seq):,} letters are IUPAC ambiguity codes "
                           f"({AMBIGUITY_CODES}); this looks like a protein or another alphabet, not DNA")
    return recs


def _need(model, what: str):
    if model is None:
        raise gr.Error(f"no language model loaded, so no {what}. {HOW_TO_TRAIN}")
    return model


def _gc(seq: str, window: int) -> np.ndarray:
    gc = np.frombuffer(seq.encode(), dtype=np.uint8)
    is_gc = np.isin(gc, np.frombuffer(b"GC", dtype=np.uint8)).astype(float)
    w = max(1, min(window, len(seq)))
    return np.convolve(is_gc, np.ones(w) / w, mode="same")


def analyse(model, text: str, smooth: int = 25):
    """-> (matplotlib Figure of per-base surprisal and GC content per record, markdown summary)."""
    model = _need(model, "surprisal")
    recs = _records(text)
    shown = list(recs.items())[:4]
    fig = Figure(figsize=(10, 2.8 * len(shown)))
    axes = fig.subplots(len(shown), 1, squeeze=False)
    lines = ["| record | length | GC % | mean surprisal (bits/base) |", "|---|---:|---:|---:|"]
    for (name, seq), ax in zip(shown, axes[:, 0]):
        bits = -per_base_loglik(model, seq) / math.log(2)
        x = np.arange(1, len(seq) + 1)
        ax.plot(x, bits, lw=0.6, color="0.6", label="surprisal")
        w = max(1, min(smooth, len(seq)))
        filled = np.nan_to_num(bits, nan=float(np.nanmean(bits)) if len(seq) > 1 else 2.0)
        ax.plot(x, np.convolve(filled, np.ones(w) / w, mode="same"), color="C0", label=f"{w}-base mean")
        ax.axhline(2.0, ls=":", color="k", lw=0.8, label="2 bits (uniform)")
        ax.set_ylabel("bits")
        ax.set_title(name, fontsize=10, loc="left")
        gc_ax = ax.twinx()
        gc_ax.plot(x, 100 * _gc(seq, 100), color="C2", lw=0.9, label="GC % (100-base window)")
        gc_ax.set_ylim(0, 100)
        gc_ax.set_ylabel("GC %")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = gc_ax.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper right")
        gc_pct = 100 * sum(seq.count(b) for b in "GC") / len(seq)
        mean_bits = float(np.nanmean(bits)) if len(seq) > 1 else float("nan")
        lines.append(f"| {name} | {len(seq):,} | {gc_pct:.1f} | {mean_bits:.3f} |")
    axes[-1, 0].set_xlabel("position (1-based)")
    fig.tight_layout()
    if len(recs) > len(shown):
        lines.append(f"\nplotted the first {len(shown)} of {len(recs)} records")
    return fig, "\n".join(lines)


def classify(classifiers: dict, text: str) -> str:
    """Markdown table: each record's predicted class and probability under each classifier found."""
    if not classifiers:
        return ("No classifier checkpoint found (looked in "
                f"{', '.join(str(c) for c in CLASSIFIER_CANDIDATES)}). "
                "Fine-tune one with `python -m apps.genomics.finetune`.")
    from apps.genomics.data import encode

    recs = _records(text)
    out = []
    for cname, model in classifiers.items():
        labels = model.head_config.labels or [str(i) for i in range(model.head_config.num_labels)]
        out += [f"**{cname}** ({model.head_config.backbone})", "", "| record | prediction | probability |",
                "|---|---|---:|"]
        with torch.no_grad():
            for name, seq in recs.items():
                p = model(encode(seq)[None])[0].float().softmax(-1)
                k = int(p.argmax())
                out.append(f"| {name} | {labels[k]} | {float(p[k]):.3f} |")
        out.append("")
    return "\n".join(out)


def variant_table(model, text: str, variants_text: str, flank: int = 128) -> list[list]:
    """Rows [record, pos, ref, alt, LLR (nats), verdict] for ``name pos ref alt`` lines against the pasted
    records (1-based positions)."""
    model = _need(model, "variant scores")
    recs = _records(text)
    try:
        variants = read_variants(variants_text or "", name="variants")
    except ValueError as e:
        raise gr.Error(str(e)) from None
    if not variants:
        raise gr.Error("enter variants as lines 'record pos ref alt', e.g. 'seq1 12 A G'")
    if len(variants) > MAX_VARIANTS:
        raise gr.Error(f"{len(variants)} variants; this demo scores at most {MAX_VARIANTS}")
    try:
        rows = score_variants(model, SequenceDict(recs), variants, flank=flank)
    except ValueError as e:
        raise gr.Error(str(e)) from None
    return [[r["chrom"], r["pos"], r["ref"], r["alt"], round(r["llr"], 4),
             "alt more likely" if r["llr"] > 0 else "ref more likely"] for r in rows]


def continuation(model, text: str, n: int = 200, temperature: float = 1.0, seed: int = 0) -> str:
    """The last record continued by ``n`` sampled bases, as FASTA (prompt in upper case, new bases lower)."""
    model = _need(model, "generation")
    if model_kind(model) != "causal":
        raise gr.Error("generation needs a causal language model checkpoint")
    recs = _records(text)
    name, prompt = list(recs.items())[-1]
    n = int(n)
    if not 1 <= n <= MAX_NEW:
        raise gr.Error(f"number of bases must be 1..{MAX_NEW}")
    new = generate_dna(model, prompt, n, temperature=float(temperature), seed=checked_seed(seed))
    body = prompt + new.lower()
    return f">{name}_continued n={n} T={temperature} seed={seed}\n" + "\n".join(
        body[i: i + 80] for i in range(0, len(body), 80))


def build_demo(ckpt: str | None = None) -> gr.Blocks:
    """The Gradio UI. Missing checkpoints do not stop it: the page says what is missing and how to make it."""
    try:
        lm_path = find_lm(ckpt)
        lm = load_model(lm_path)
        status = f"Language model: `{lm_path}` ({model_kind(lm)}, {sum(p.numel() for p in lm.parameters()):,} params)."
    except (FileNotFoundError, ValueError) as e:
        lm, status = None, f"**No language model loaded.** {e}"
    classifiers = find_classifiers()
    status += (f" Classifiers: {', '.join(classifiers)}." if classifiers
               else " No classifier checkpoint (run `python -m apps.genomics.finetune`).")

    with gr.Blocks(title="hiss DNA") as demo:
        gr.Markdown("## hiss DNA: surprisal, classification, variant effects, generation\n" + status)
        with gr.Row():
            text = gr.Textbox(value=EXAMPLE, lines=8, label=f"FASTA (paste; up to {MAX_BASES:,} bases)",
                              max_length=MAX_CHARS)
            upload = gr.File(label="or upload .fa / .fa.gz", type="filepath")
        upload.change(read_upload, upload, text)
        with gr.Tab("Surprisal"):
            go = gr.Button("Score", variant="primary")
            plot = gr.Plot(label="per-base surprisal and GC content")
            summary = gr.Markdown()
            classes = gr.Markdown()
            go.click(lambda: (None, "", ""), None, [plot, summary, classes], queue=False).then(
                lambda t: analyse(lm, t), text, [plot, summary]).then(
                lambda t: classify(classifiers, t), text, classes)
        with gr.Tab("Variant effects"):
            vtext = gr.Textbox(value=EXAMPLE_VARIANTS, lines=4, label="variants: record pos ref alt (1-based)")
            vgo = gr.Button("Score variants", variant="primary")
            table = gr.Dataframe(headers=["record", "pos", "ref", "alt", "LLR (nats)", "verdict"],
                                 label="log P(alt) - log P(ref)")
            vgo.click(lambda: None, None, table, queue=False).then(
                lambda t, v: variant_table(lm, t, v), [text, vtext], table)
        with gr.Tab("Continue"):
            with gr.Row():
                n = gr.Slider(10, MAX_NEW, value=200, step=10, label="new bases")
                temp = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="temperature (0 = greedy)")
                seed = gr.Number(value=0, precision=0, label="seed")
            cgo = gr.Button("Generate", variant="primary")
            out = gr.Textbox(lines=8, label="continuation (new bases in lower case)")
            cgo.click(lambda: "", None, out, queue=False).then(
                lambda t, k, tt, s: continuation(lm, t, k, tt, s), [text, n, temp, seed], out)
    return demo


def main(argv: list[str] | None = None) -> None:
    demo_main(build_demo, argv, __doc__, ckpt_help="language-model checkpoint directory (save_pretrained)")


if __name__ == "__main__":
    run_cli(main)
