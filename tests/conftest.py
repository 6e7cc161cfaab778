"""Shared fixtures: a hermetic network guard, tiny corpora written under tmp_path, paths."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_LOOPBACK = ("127.", "::1", "localhost", "0.0.0.0")


def _is_local(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = str(address[0])
    return host.startswith(_LOOPBACK) or host == socket.gethostname()


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail any test that opens a socket to anything but this machine (DDP uses loopback)."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def guarded(method):
        def connect(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address):
                raise RuntimeError(f"test tried to reach the network: {address!r}")
            return method(sock, address)
        return connect

    monkeypatch.setattr(socket.socket, "connect", guarded(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(real_connect_ex))
    monkeypatch.setattr(socket, "create_connection", _refuse_remote(socket.create_connection))


def _refuse_remote(create_connection):
    def wrapper(address, *args, **kwargs):
        if not _is_local(address):
            raise RuntimeError(f"test tried to reach the network: {address!r}")
        return create_connection(address, *args, **kwargs)
    return wrapper


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A fresh run directory for one fit."""
    return tmp_path / "run"


def make_corpus(out: Path, model: str = "tiny:qwen2", num_samples: int = 48,
                max_new_tokens: int = 24, **kwargs) -> Path:
    """Sample a real corpus dir with `selftrain generate` from a tiny model."""
    from selftrain.sampling.generate import generate

    kwargs.setdefault("batch_size", 16)
    (path,) = generate(model=model, out=str(out), num_samples=num_samples,
                       max_new_tokens=max_new_tokens, **kwargs)
    return path


@pytest.fixture(scope="session")
def qwen_corpus(tmp_path_factory) -> Path:
    """48 BOS samples of tiny:qwen2 in 2 subsets (shared, read-only)."""
    return make_corpus(tmp_path_factory.mktemp("corpus") / "qwen", num_subsets=2)


@pytest.fixture(scope="session")
def llama_corpus(tmp_path_factory) -> Path:
    """48 BOS samples of tiny:llama (another tokenizer than tiny:qwen2's)."""
    return make_corpus(tmp_path_factory.mktemp("corpus") / "llama", model="tiny:llama")


def write_text_corpus(path: Path, rows: int = 64) -> Path:
    """A learnable jsonl corpus: short, repetitive English sentences."""
    import json

    words = ["the cat sat on the mat.", "a dog ran in the park.", "birds sing at dawn."]
    lines = [json.dumps({"text": " ".join(words[(i + j) % 3] for j in range(3))})
             for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path
