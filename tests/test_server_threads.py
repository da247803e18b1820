"""The server's math runs under a BLAS pool of $FEDLORA_SERVER_THREADS threads (default 1), restored afterwards."""

import pytest
from threadpoolctl import threadpool_info

from fedlora.server.rounds import SERVER_THREADS_ENV, server_math_threads


def blas_threads() -> set[int]:
    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


def test_server_math_uses_one_blas_thread_by_default_and_restores_the_pool(monkeypatch):
    monkeypatch.delenv(SERVER_THREADS_ENV, raising=False)
    before = blas_threads()
    assert before, "numpy's BLAS is visible to threadpoolctl"
    with server_math_threads():
        assert blas_threads() == {1}
    assert blas_threads() == before


def test_server_threads_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(SERVER_THREADS_ENV, "2")
    with server_math_threads():
        assert blas_threads() == {2}
    monkeypatch.setenv(SERVER_THREADS_ENV, "zero")
    with pytest.raises(ValueError, match="FEDLORA_SERVER_THREADS='zero' is not a positive integer"):
        server_math_threads()
