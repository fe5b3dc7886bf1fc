"""Audio for apps/audio from sources reachable offline (Debian packages, the gradio wheel).

    python datasets/recipes/audio.py digits [--root DIR] [--per-voice 1]  # espeak-ng spoken digits, SC09 layout
    python datasets/recipes/audio.py codec2 [--out DIR]    # 16 English speech clips, 4.7 min (Debian codec2-examples)
    python datasets/recipes/audio.py czech  [--out DIR]    # 1,882 Czech speech clips, 1.8 h (fillets-ng-data-cs)
    python datasets/recipes/audio.py gradio [--out DIR]    # the gradio wheel's example clips (music, speech)

``digits`` is what ``python -m apps.audio.train`` runs on first use (it needs the espeak-ng program:
``apt-get install espeak-ng``): 3,120 one-second clips of "zero" .. "nine" by 312 voices, split by voice
variant (see apps/audio/recipes.py). The other recipes write a folder of audio files (original formats and
rates; apps.audio.data resamples on reading) for unconditional training and evaluation:

    python -m apps.audio.train --config apps/audio/configs/long_context.yaml --data.paths '[OUT_DIR]'
    python -m apps.audio.evaluate --ckpt runs/audio/pretrained --data OUT_DIR

Debian packages are downloaded with ``apt-get download`` (the .deb only, no install, no root needed) and
unpacked with ``dpkg-deb``. The real SC09 / Speech Commands (Warden 2018, CC-BY-4.0) is read directly when you
have it: ``--data.source sc09 --data.root speech_commands_v0.02`` (download it yourself with internet access:
http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz).
Licences: codec2 examples LGPL-2.1 (Debian copyright file), Fish Fillets NG data GPL-2+, espeak-ng GPL-3+
(the generated audio carries no restriction).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from apps.audio.data import AUDIO_EXTENSIONS, default_data_root  # noqa: E402


def debian_files(package: str, work: Path) -> Path:
    """Download one .deb (not its dependencies) and unpack it; returns the unpacked root."""
    for tool in ("apt-get", "dpkg-deb"):
        if not shutil.which(tool):
            sys.exit(f"{package}: {tool} not found; this recipe needs a Debian/Ubuntu machine")
    r = subprocess.run(["apt-get", "download", package], cwd=work, capture_output=True, text=True)
    debs = list(work.glob(f"{package}_*.deb"))
    if not debs:
        sys.exit(f"apt-get download {package} failed (run `apt-get update` first?):\n{r.stderr.strip()}")
    root = work / "root"
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
    return root


def copy_audio(files: list[Path], out: Path, rel_to: Path | None = None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        dst = out / (f.relative_to(rel_to) if rel_to else f.name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst)
    return len(files)


def codec2(out: Path) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = debian_files("codec2-examples", Path(d))
        files = sorted((root / "usr/share/codec2").rglob("*.wav"))
        print(f"{copy_audio(files, out)} codec2 speech clips -> {out}")


def czech(out: Path) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = debian_files("fillets-ng-data-cs", Path(d))
        base = root / "usr/share/games/fillets-ng/sound"
        files = sorted(base.rglob("*.ogg"))
        print(f"{copy_audio(files, out, base)} Czech speech clips -> {out}")


def gradio_examples(out: Path) -> None:
    import gradio

    src = Path(gradio.__file__).parent / "media_assets" / "audio"
    files = sorted(f for f in src.iterdir() if f.suffix.lower() in AUDIO_EXTENSIONS)
    print(f"{copy_audio(files, out)} gradio example clips -> {out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("digits")
    d.add_argument("--root", default=str(default_data_root() / "digits"))
    d.add_argument("--per-voice", type=int, default=1)
    for name in ("codec2", "czech", "gradio"):
        sub.add_parser(name).add_argument("--out", default=str(default_data_root() / name))
    a = p.parse_args(argv)
    if a.what == "digits":
        from apps.audio.recipes import ensure_digits

        try:
            root = ensure_digits(a.root, per_voice=a.per_voice)
        except RuntimeError as e:
            sys.exit(str(e))
        print(f"spoken digits in {root}")
    elif a.what == "codec2":
        codec2(Path(a.out))
    elif a.what == "czech":
        czech(Path(a.out))
    else:
        gradio_examples(Path(a.out))


if __name__ == "__main__":
    main()
