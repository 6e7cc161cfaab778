"""Shared fixtures: a hermetic network guard, tiny corpora, planted memories, probe sources.

Plain functions (running `selftrain`, fitting the debug config, writing inputs) are in
``helpers.py``; ``REPO`` and ``CONFIGS`` are importable from here too.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

pytest.register_assert_rewrite("helpers")

from helpers import (  # noqa: E402
    CODE,
    CONFIGS,
    LICENSE,
    REPO,
    make_corpus,
    memorize,
    random_ids,
    write_probes,
)

__all__ = ["CONFIGS", "REPO"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    # Under pytest-xdist each worker (and every process it starts, which inherits the variable)
    # gets its share of the cores for torch's intra-op threads: with the default, one thread
    # per core in every worker, the workers' OpenMP threads spin against each other: the whole
    # suite on 2 cores in 2 workers took 15.9 min (30.7 CPU-minutes) that way, 7.3 min (13.2)
    # with a thread each.
    _THREADS = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    os.environ.setdefault("OMP_NUM_THREADS", _THREADS)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with slow tests first, and in each file its slow tests first: under ``make test``'s
    two xdist workers the long tests (sweeps, kills, DDP) start early, side by side, and the
    fast ones fill in around them instead of leaving one worker on a long test at the end. A
    file's tests stay together, so a module fixture is still built once."""
    def slow(item: pytest.Item) -> bool:
        return item.get_closest_marker("slow") is not None

    has_slow = {item.path for item in items if slow(item)}
    file_order = {item.path: index for index, item in reversed(list(enumerate(items)))}
    items.sort(key=lambda item: (item.path not in has_slow, file_order[item.path], not slow(item)))


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


@pytest.fixture(scope="session")
def qwen_corpus(tmp_path_factory) -> Path:
    """48 BOS samples of tiny:qwen2 in 2 subsets (shared, read-only)."""
    return make_corpus(tmp_path_factory.mktemp("corpus") / "qwen", num_subsets=2)


@pytest.fixture(scope="session")
def llama_corpus(tmp_path_factory) -> Path:
    """48 BOS samples of tiny:llama (another tokenizer than tiny:qwen2's)."""
    return make_corpus(tmp_path_factory.mktemp("corpus") / "llama", model="tiny:llama")


@pytest.fixture(scope="session")
def planted():
    """4 random 64-token rows and tiny:qwen2 trained until it reproduces them (read-only)."""
    sequences = random_ids(4, seed=1)
    return sequences, memorize(sequences)


@pytest.fixture(scope="module")
def planted_probes(tmp_path_factory, planted):
    """A probe set of 4 memorized rows, 1 memorized prefix with a wrong last token, 4 random
    rows (domains planted, random), and the model that memorized them."""
    import torch

    rows, model = planted
    altered = rows[0].clone()
    altered[-1] = (altered[-1] + 1) % 256
    table = torch.cat([rows, altered[None], random_ids(4, seed=7)])
    path = write_probes(tmp_path_factory.mktemp("probes") / "probes.parquet", table,
                        ["planted"] * 5 + ["random"] * 4)
    return path, model


@pytest.fixture
def probe_sources(tmp_path) -> list[str]:
    """Two `selftrain probeset` inputs: a license text and a Python file (LICENSE, CODE)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "LICENSE").write_text(LICENSE)
    (tmp_path / "src" / "bisect_like.py").write_text(CODE)
    return [f"license={tmp_path}/src/LICENSE", f"code={tmp_path}/src/*.py"]
