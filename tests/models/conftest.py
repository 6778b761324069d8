"""Fixtures shared by the model tests."""

import socket

import pytest


@pytest.fixture
def refuse_sockets(monkeypatch):
    """Any attempt to open a connection in this process fails the test; returns the refusing function
    (for the fixtures that refuse more)."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return refuse
