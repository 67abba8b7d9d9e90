"""The model cache's integrity check: a pulled model is hashed once, then trusted by its stamp."""
from __future__ import annotations

import hashlib
import os

from edgelm.models import registry


def test_a_verified_file_is_not_hashed_again_until_it_changes(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    hashed = []
    real = registry.sha256_file
    monkeypatch.setattr(registry, "sha256_file", lambda p: hashed.append(p) or real(p))

    assert registry.verified(f, digest) and len(hashed) == 1
    assert (tmp_path / "m.gguf.verified").exists()
    assert registry.verified(f, digest) and len(hashed) == 1  # the stamp answers
    assert not registry.verified(f, "0" * 64) and len(hashed) == 2  # another expected digest: hashed

    f.write_bytes(b"weights" * 999 + b"WEIGHTS")  # same size, new mtime and content
    os.utime(f, ns=(1, 1))
    assert not registry.verified(f, digest) and len(hashed) == 3
    assert not registry.verified(tmp_path / "missing.gguf", digest)
