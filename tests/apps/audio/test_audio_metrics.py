"""apps/audio SC09-style metrics: the formulas on known distributions, the classifier's save/load, features,
and a short training run on the bundled sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from apps.audio.metrics import (
    DigitClassifier,
    am_score,
    classify,
    fid,
    inception_score,
    modified_inception_score,
    score_clips,
    train_classifier,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLE = Path(__file__).resolve().parents[3] / "datasets" / "samples" / "digits_small"


def one_hot(labels, n=10, eps=1e-12):
    p = np.full((len(labels), n), eps)
    p[np.arange(len(labels)), labels] = 1.0
    return p / p.sum(1, keepdims=True)


def test_scores_on_known_distributions():
    perfect = one_hot(np.arange(2000) % 10)  # confident and balanced: IS = mIS = 10 classes (up to eps)
    assert inception_score(perfect) == pytest.approx(10, rel=0.02)
    assert modified_inception_score(perfect) > 1e3  # KL between different one-hots is huge (eps), as in SC09 code
    assert am_score(perfect, perfect) == pytest.approx(0, abs=1e-6)
    collapsed = one_hot(np.zeros(2000, dtype=int))  # always "zero": IS 1, AM = KL(uniform || point mass) large
    assert inception_score(collapsed) == pytest.approx(1, abs=1e-6)
    assert modified_inception_score(collapsed) == pytest.approx(1, abs=1e-6)
    assert am_score(perfect, collapsed) > 10
    uniform = np.full((100, 10), 0.1)
    assert am_score(perfect, uniform) == pytest.approx(np.log(10), rel=1e-6)  # entropy term only
    rng = np.random.RandomState(0)
    a = rng.randn(500, 4)
    assert fid(a, a) == pytest.approx(0, abs=1e-6)
    assert fid(a, a + 1.0) == pytest.approx(4.0, rel=1e-3)  # mean shift of 1 in 4 dims


def test_classifier_save_load_and_scoring(tmp_path):
    torch.manual_seed(0)
    clf = DigitClassifier(width=4).eval()
    wav = torch.randn(6, 12000) * 0.1
    probs, feats = classify(clf, wav)
    assert probs.shape == (6, 10) and feats.shape == (6, 16)
    assert torch.allclose(probs.sum(1), torch.ones(6, dtype=torch.float64))
    clf.save(tmp_path / "c")
    again = DigitClassifier.load(tmp_path / "c")
    assert torch.allclose(classify(again, wav)[0], probs)
    ref = tuple(t.numpy() for t in classify(clf, torch.randn(20, 16000) * 0.1))
    r = score_clips(clf, wav, ref, labels=torch.arange(6))
    assert set(r) == {"n", "fid", "is", "mis", "am", "acc"} and r["n"] == 6
    with pytest.raises(ValueError, match="not a digit classifier"):
        DigitClassifier.load(tmp_path)


def test_train_classifier_on_the_bundled_sample():
    model, acc = train_classifier(SAMPLE, epochs=1, batch_size=10, progress=False)
    assert isinstance(model, DigitClassifier) and 0.0 <= acc["test_acc"] <= 1.0


def test_samples_in_digit_folders_are_scored_against_the_digit_asked_for(tmp_path):
    from apps.audio.metrics import requested_digits

    paths = [tmp_path / "seven" / "a.wav", tmp_path / "zero" / "b.wav", tmp_path / "mix" / "c.wav"]
    assert requested_digits(paths[:2]).tolist() == [7, 0]
    assert requested_digits(paths).tolist() == [7, 0, -1]  # one unlabelled clip: no accuracy for the folder
