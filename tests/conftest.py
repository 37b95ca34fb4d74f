"""Shared fixtures. Data lives in ../shared/datasets beside the repository (never copied in)."""
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared" / "datasets"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: full-size checks (parameter counts, 31B equivalence)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    assert SHARED.is_dir(), f"shared datasets not found at {SHARED}"
    return SHARED


@pytest.fixture
def one_thread():
    """Tiny models on a busy 2-core box: OpenMP hand-offs dominate, one thread is fastest."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def stop_process(proc, timeout: float = 15) -> None:
    """Terminate a server subprocess started by a test; kill it if it does not exit in ``timeout`` s."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
