"""The test suite runs offline: the guard in conftest.py refuses connections beyond the
loopback, and tells the hubs and pip (in subprocesses too) to stay offline."""

import os
import socket

import pytest
from tests.conftest import NetworkUsedError


def test_a_connection_beyond_the_loopback_is_refused_with_its_address():
    with pytest.raises(NetworkUsedError, match="192.0.2.1"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)
    with socket.socket() as sock, pytest.raises(NetworkUsedError, match="example.org"):
        sock.connect_ex(("example.org", 80))
    with pytest.raises(NetworkUsedError, match="pypi.org"):
        socket.getaddrinfo("pypi.org", 443)


def test_the_loopback_stays_usable():
    assert socket.getaddrinfo("localhost", 80)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass


def test_hubs_and_pip_are_told_to_stay_offline():
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "PIP_NO_INDEX"):
        assert os.environ[name] == "1"
