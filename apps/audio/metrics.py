"""SC09-style sample metrics: a spoken-digit classifier on log-mel features, then FID / IS / mIS / AM of clips.

    python -m apps.audio.metrics train [--root DIGITS_OR_SC09] [--out runs/audio/classifier]   # ~5 min on CPU
    python -m apps.audio.metrics score --samples DIR [DIR ...] [--classifier DIR] [--root ...]

The classifier trained on the espeak-ng digits ships in apps/audio/assets/digit_classifier (the default of
``score``; 100% accuracy on the unseen valid and test voices, 10 classes).

``score`` prints the SC09 table: "real train" and "real test" reference rows (the data itself) and one row per
``--samples`` folder (e.g. the WAVs of ``python -m apps.audio.generate --n 256 --seconds 1``). Clips of a
conditional model generated into sub-folders named by digit (``DIR/seven/*.wav``: ``generate --digit 7 --out
DIR/seven``) are labelled by that name, and the row also gives the classifier's accuracy: how often the model
said the digit it was asked for.

The formulas are those of the SC09 metric code used by SaShiMi and the Mamba paper (state-spaces/s4,
models/sashimi/sc09_classifier/test_speech_commands.py):
  FID   Fréchet distance between Gaussians fitted to the classifier's penultimate features of the training clips
        and of the scored clips (lower is better);
  IS    exp(mean KL(p(y|x) || p(y))), with p(y) the mean prediction of a random other half of the clips (the
        split-half form of that code);
  mIS   exp(mean KL(p(y|x) || p(y|x'))) over 10,000 random pairs (x, x'), seed 0;
  AM    KL(p_train(y) || p(y)) + mean entropy of p(y|x) (lower is better).
Where we differ: that script's optional ``--threshold`` mode was meant to pick the best of several
sample-rejection thresholds by IS, but it never updates its running best, so it always keeps the *last* pair
(lower 0.4, upper 0.95); and the "thresholds" slice the clips by file order, not by classifier confidence, so
it drops 45% of the clips more or less arbitrarily. We never reject samples: every clip is scored. Our
classifier is a small CNN on 32-band log-mel spectrograms (torchaudio) trained here, not their ResNeXt, so
absolute numbers are comparable within this table (our real-data rows) and not to the paper's.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from scipy import linalg
from torch import Tensor, nn

from apps.audio.data import (
    DIGITS,
    SAMPLE_RATE,
    Clip,
    default_data_root,
    list_audio,
    load_tokens,
    mu_law_decode,
    speech_commands_splits,
)
from apps.common.errors import run_cli
from ssm_core import atomic_write

__all__ = ["DigitClassifier", "train_classifier", "classify", "fid", "inception_score",
           "modified_inception_score", "am_score", "score_clips", "main"]


SHIPPED_CLASSIFIER = Path(__file__).parent / "assets" / "digit_classifier"
# log(mel power + floor): about 40 dB below a -1 dBFS voice; a faint noise floor (|x| ~ 1e-3, as generated
# clips have) and digital silence (as the recipe's clips have) look alike to the classifier
LOG_FLOOR = 1e-2


class DigitClassifier(nn.Module):
    """1 s of 16 kHz audio -> 32-band log-mel (torchaudio) -> 4 conv blocks -> 128 features -> 10 digits."""

    def __init__(self, n_mels: int = 32, width: int = 32, n_classes: int = 10):
        super().__init__()
        self.config = {"n_mels": n_mels, "width": width, "n_classes": n_classes}
        self.mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=1024, hop_length=256, n_mels=n_mels)
        chans = [1, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for a, b in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
        self.conv = nn.Sequential(*layers)
        self.freq_mask = torchaudio.transforms.FrequencyMasking(4)
        self.time_mask = torchaudio.transforms.TimeMasking(8)
        self.dropout = nn.Dropout(0.3)
        self.classifier = nn.Linear(4 * width, n_classes)

    @staticmethod
    def fix_length(wav: Tensor) -> Tensor:
        """(B, L) -> (B, 16000): cut or zero-pad to 1 s (SC09's FixAudioLength)."""
        if wav.shape[-1] >= SAMPLE_RATE:
            return wav[..., :SAMPLE_RATE]
        return F.pad(wav, (0, SAMPLE_RATE - wav.shape[-1]))

    def features(self, wav: Tensor) -> Tensor:
        """(B, L) waveforms -> (B, 128): the classifier's input (what FID compares). In training mode the
        log-mel gets SpecAugment masks (one band of up to 4 mel bins, one span of up to 8 frames)."""
        x = torch.log(self.mel(self.fix_length(wav)) + LOG_FLOOR)[:, None]
        if self.training:
            x = self.time_mask(self.freq_mask(x, x.mean()), x.mean())
        return self.conv(x).mean(dim=(2, 3))

    def forward(self, wav: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.features(wav)))

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.state_dict().items()}
        atomic_write(d / "model.safetensors", lambda tmp: save_file(tensors, tmp))
        text = json.dumps({"model_type": "hiss-sc09-classifier", **self.config}, indent=2)
        atomic_write(d / "config.json", lambda tmp: Path(tmp).write_text(text))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> DigitClassifier:
        from safetensors.torch import load_file

        d = Path(directory)
        cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
        if cfg.pop("model_type", None) != "hiss-sc09-classifier":
            raise ValueError(f"{d}: not a digit classifier (train one: python -m apps.audio.metrics train)")
        model = cls(**cfg)
        model.load_state_dict(load_file(str(d / "model.safetensors")))
        return model.eval()


def _waves(items) -> tuple[Tensor, Tensor]:
    wav = torch.stack([DigitClassifier.fix_length(mu_law_decode(t.long())) for _, t in items])
    return wav, torch.tensor([c.label for c, _ in items])


def _augment(wav: Tensor, gen: torch.Generator) -> Tensor:
    """Test voices are unseen: perturb speed and pitch together (resample by 0.8-1.25, torchaudio), shift (up to
    0.1 s, circular), gain (-6..0 dB), and for half the clips a faint noise floor (std up to 3e-3)."""
    B = wav.shape[0]
    factor = float(torch.empty(()).uniform_(0.8, 1.25, generator=gen))
    new_rate = int(round(SAMPLE_RATE * factor / 100)) * 100
    if new_rate != SAMPLE_RATE:  # played back at 16 kHz: faster/higher (< 1) or slower/lower (> 1)
        wav = DigitClassifier.fix_length(torchaudio.functional.resample(wav, SAMPLE_RATE, new_rate))
    shifts = torch.randint(-1600, 1601, (B,), generator=gen)
    wav = torch.stack([torch.roll(w, int(s)) for w, s in zip(wav, shifts)])
    gain = 10 ** (-torch.rand(B, 1, generator=gen) * 6 / 20)
    noise = torch.rand(B, 1, generator=gen) * 3e-3 * (torch.rand(B, 1, generator=gen) < 0.5)  # half: none
    return wav * gain + noise * torch.randn(wav.shape, generator=gen)


def train_classifier(root: str | Path, epochs: int = 8, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                     progress: bool = True) -> tuple[DigitClassifier, dict]:
    """Train on a Speech Commands layout's train split; returns (classifier, {"valid_acc", "test_acc"})."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    splits = speech_commands_splits(root)
    data = {k: _waves(load_tokens(v, progress=progress, what=f"{k} clips")) for k, v in splits.items()}
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    x, y = data["train"]
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    bar = tqdm(total=steps, desc="training the digit classifier", disable=not progress)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), batch_size):
            idx = order[s : s + batch_size]
            loss = F.cross_entropy(model(_augment(x[idx], gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    model.eval()
    acc = {f"{k}_acc": float((classify(model, data[k][0])[0].argmax(1) == data[k][1]).float().mean())
           for k in ("valid", "test")}
    return model, acc


@torch.no_grad()
def classify(model: DigitClassifier, wav: Tensor, batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """(N, L) waveforms -> (probabilities (N, 10), features (N, 128))."""
    model.eval()
    probs, feats = [], []
    for s in range(0, len(wav), batch_size):
        f = model.features(wav[s : s + batch_size])
        feats.append(f)
        probs.append(model.classifier(f).softmax(-1))
    return torch.cat(probs).double(), torch.cat(feats).double()


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) along the last axis (scipy.stats.entropy's convention, natural log)."""
    p = p / p.sum(-1, keepdims=True)
    q = q / q.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / q), 0.0)
    return terms.sum(-1)


def fid(feat_ref: np.ndarray, feat: np.ndarray) -> float:
    mu1, mu2 = feat_ref.mean(0), feat.mean(0)
    s1, s2 = np.cov(feat_ref, rowvar=False), np.cov(feat, rowvar=False)
    with warnings.catch_warnings():  # a singular product (few clips) is handled below, as in the SC09 code
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1.dot(s2))
        if not np.isfinite(covmean).all():
            off = np.eye(s1.shape[0]) * 1e-4
            covmean = linalg.sqrtm((s1 + off).dot(s2 + off))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean.real))


def inception_score(probs: np.ndarray, seed: int = 0) -> float:
    rng = np.random.RandomState(seed)
    p = probs[rng.permutation(len(probs))]
    half1, half2 = p[: len(p) // 2], p[len(p) // 2 :]
    return float(np.exp(_kl(half1, half2.mean(0, keepdims=True)).mean()))


def modified_inception_score(probs: np.ndarray, n: int = 10_000, seed: int = 0) -> float:
    rng = np.random.RandomState(seed)
    pairs = rng.randint(0, len(probs), size=(n, 2))
    return float(np.exp(_kl(probs[pairs[:, 0]], probs[pairs[:, 1]]).mean()))


def am_score(probs_ref: np.ndarray, probs: np.ndarray) -> float:
    entropy = -(np.where(probs > 0, probs * np.log(probs), 0.0)).sum(-1).mean()
    return float(_kl(probs_ref.mean(0), probs.mean(0)) + entropy)


def score_clips(model: DigitClassifier, wav: Tensor, ref: tuple[np.ndarray, np.ndarray],
                labels: Tensor | None = None) -> dict:
    """FID / IS / mIS / AM of clips (N, L) against the reference (train probs, train features)."""
    probs, feats = (t.numpy() for t in classify(model, wav))
    out = {"n": len(wav), "fid": fid(ref[1], feats), "is": inception_score(probs),
           "mis": modified_inception_score(probs), "am": am_score(ref[0], probs)}
    if labels is not None and bool((labels >= 0).all()):
        out["acc"] = float((probs.argmax(1) == labels.numpy()).mean())
    return out


def requested_digits(paths) -> Tensor:
    """The digit each generated clip was asked for, from its folder's name (``.../seven/x.wav`` -> 7), else -1."""
    return torch.tensor([DIGITS.index(Path(f).parent.name) if Path(f).parent.name in DIGITS else -1 for f in paths])


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the digit classifier")
    t.add_argument("--root", default=str(default_data_root() / "digits"), help="Speech Commands / SC09 layout")
    t.add_argument("--out", default="runs/audio/classifier")
    t.add_argument("--epochs", type=int, default=8)
    s = sub.add_parser("score", help="SC09 metrics of folders of generated clips")
    s.add_argument("--classifier", default=str(SHIPPED_CLASSIFIER))
    s.add_argument("--root", default=str(default_data_root() / "digits"), help="the real data (reference rows)")
    s.add_argument("--samples", nargs="*", default=[], help="folders of generated WAVs, one row each")
    s.add_argument("--max-real", type=int, default=2000, help="at most this many real clips per reference row")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.cmd == "train":
        model, acc = train_classifier(a.root, a.epochs)
        model.save(a.out)
        print(f"digit classifier -> {a.out}: accuracy on unseen voices {acc['valid_acc']:.1%} (valid), "
              f"{acc['test_acc']:.1%} (test)")
        return acc
    model = DigitClassifier.load(a.classifier)
    splits = speech_commands_splits(a.root)

    def real(split: str) -> tuple[Tensor, Tensor]:
        clips = splits[split]
        if len(clips) > a.max_real:
            step = len(clips) / a.max_real
            clips = [clips[int(i * step)] for i in range(a.max_real)]
        return _waves(load_tokens(clips, progress=True, what=f"{split} clips"))

    train_wav, train_y = real("train")
    ref = tuple(t.numpy() for t in classify(model, train_wav))
    rows = {"real train": score_clips(model, train_wav, ref, train_y)}
    test_wav, test_y = real("test")
    rows["real test"] = score_clips(model, test_wav, ref, test_y)
    for folder in a.samples:
        items = load_tokens([Clip(f) for f in list_audio(folder)], what=f"clips in {folder}", skip_silent=False)
        wav = torch.stack([DigitClassifier.fix_length(mu_law_decode(tk.long())) for _, tk in items])
        rows[folder] = score_clips(model, wav, ref, requested_digits([clip.path for clip, _ in items]))
    print(f"{'':28s} {'n':>5s} {'FID':>8s} {'IS':>6s} {'mIS':>7s} {'AM':>6s} {'acc':>6s}")
    for name, r in rows.items():
        acc = f"{r['acc']:.1%}" if "acc" in r else "-"
        print(f"{name[-28:]:28s} {r['n']:5d} {r['fid']:8.3f} {r['is']:6.2f} {r['mis']:7.2f} {r['am']:6.3f} {acc:>6s}")
    return rows


if __name__ == "__main__":
    run_cli(main)
