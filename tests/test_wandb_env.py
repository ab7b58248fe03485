"""One W&B key and server check for `train` and `sweep`, also for a self-hosted server."""

import socket

import pytest

from iresflow import wandb_env


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    return netrc


def test_key_in_netrc_counts_for_the_configured_host_only(clean_env, monkeypatch):
    clean_env.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert wandb_env.api_key_available()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.mylab.example:8443")
    assert wandb_env.server() == ("wandb.mylab.example", 8443)
    assert not wandb_env.api_key_available()  # a key for the public server is no key for this one
    clean_env.write_text("machine wandb.mylab.example\n  login user\n  password " + "k" * 40 + "\n")
    assert wandb_env.api_key_available()


def test_auto_mode_is_online_only_with_a_key_and_a_listening_server(clean_env, monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
        assert wandb_env.resolve_mode("auto") == "offline"  # no key
        monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
        assert wandb_env.resolve_mode("auto") == "online"
        monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on discard
        assert wandb_env.resolve_mode("auto") == "offline"
        monkeypatch.setenv("WANDB_MODE", "disabled")
        assert wandb_env.resolve_mode("auto") == "disabled"
        assert wandb_env.resolve_mode("offline") == "offline"
        with pytest.raises(ValueError, match="logger.mode"):
            wandb_env.resolve_mode("onlin")
    finally:
        listener.close()
