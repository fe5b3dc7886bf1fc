"""Where things are, the same for every app: the repository root, its bundled samples, and each app's run
folder (``runs/<app>``; the exported model in ``runs/<app>/pretrained``). Repo-relative paths in configs
(``datasets/samples/...``) resolve from any working directory."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["REPO_ROOT", "SAMPLES", "repo_path", "run_dir", "pretrained_dir", "default_checkpoints",
           "resolve_checkpoint"]

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLES = REPO_ROOT / "datasets" / "samples"


def repo_path(path: str | os.PathLike) -> Path:
    """``path`` as given, or under the repository root when it is a repo-relative path like the configs'
    ``datasets/samples/...`` and the command runs from another folder."""
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    return p


def run_dir(app: str) -> Path:
    """``runs/<app>``: Lightning checkpoints, logs (``version_N``) and the exported model of an app's training."""
    return Path("runs") / app


def pretrained_dir(app: str) -> Path:
    """``runs/<app>/pretrained``: where ``python -m apps.<app>.train`` exports the trained network."""
    return run_dir(app) / "pretrained"


def default_checkpoints(app: str, shipped: str | os.PathLike | None = None) -> list[Path]:
    """Where an app looks for its model when none is named, in order: ``runs/<app>/pretrained`` under the working
    directory, the same under the repository root, then the checkpoint shipped in the package (if any)."""
    found = [pretrained_dir(app).resolve(), (REPO_ROOT / pretrained_dir(app)).resolve()]
    if shipped is not None:
        found.append(Path(shipped))
    return list(dict.fromkeys(found))


def resolve_checkpoint(app: str, ckpt: str | os.PathLike | None = None, shipped: str | os.PathLike | None = None,
                       how_to_make: str = "") -> Path:
    """The checkpoint a command uses: ``ckpt`` when the user named one (it must exist: a mistyped path is an
    error, never a silent substitute), else the first of ``default_checkpoints(app, shipped)`` holding a
    save_pretrained checkpoint (config.json), else an error listing where it looked."""
    if ckpt:
        if not Path(ckpt).exists():
            raise FileNotFoundError(f"{ckpt}: no such checkpoint folder or file. {how_to_make}".strip())
        return Path(ckpt)
    candidates = default_checkpoints(app, shipped)
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no checkpoint found (looked in: {tried}). {how_to_make}".strip())

