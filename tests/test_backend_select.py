"""Choosing a backend: ``edgelm.load(backend=...)`` and ``--backend`` (runs with or without mlx)."""
from __future__ import annotations

import pytest

from edgelm.apps.cli import build_parser
from edgelm.runtime import mlx_backend
from edgelm.runtime.mlx_backend import BackendUnavailableError, resolve_backend


def test_auto_picks_mlx_only_on_apple_silicon_with_mlx(monkeypatch):
    monkeypatch.setattr(mlx_backend, "mlx_available", lambda: True)
    monkeypatch.setattr(mlx_backend, "is_apple_silicon", lambda: True)
    assert resolve_backend("auto") == "mlx"
    monkeypatch.setattr(mlx_backend, "is_apple_silicon", lambda: False)
    assert resolve_backend("auto") == "numba"  # Linux/x86 with mlx[cpu] installed: still numba
    monkeypatch.setattr(mlx_backend, "is_apple_silicon", lambda: True)
    monkeypatch.setattr(mlx_backend, "mlx_available", lambda: False)
    assert resolve_backend("auto") == "numba"
    assert resolve_backend("numba") == "numba"


def test_mlx_without_mlx_says_how_to_install(monkeypatch):
    monkeypatch.setattr(mlx_backend, "mlx_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'edgelm\[mlx\]'") as info:
        resolve_backend("mlx")
    assert isinstance(info.value, RuntimeError)
    import edgelm

    with pytest.raises(BackendUnavailableError):
        edgelm.load("no-such-model-is-looked-up", backend="mlx")  # refused before resolving the model


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        resolve_backend("cuda")


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["perplexity", "-f", "x"], ["bench"], ["serve"]])
def test_every_model_command_takes_backend(command):
    args = build_parser().parse_args([command[0], "--backend", "mlx", *command[1:]])
    assert args.backend == "mlx"
    assert build_parser().parse_args(command).backend == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args([command[0], "--backend", "cuda", *command[1:]])
