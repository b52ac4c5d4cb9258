"""Credentials in URLs: refused with a how-to, the URL named redacted."""

from __future__ import annotations

import pytest

from eqlv2.search.credentials import (
    MASK,
    CredentialsInUrlError,
    check_url_has_no_credentials,
    redact_url,
)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("http://user:s3cret@127.0.0.1:5000", "http://127.0.0.1:5000"),
        (
            "https://alice@mlflow.example.org/#/experiments/1",
            "https://mlflow.example.org/#/experiments/1",
        ),
        ("http://user:p%40ss%2Fw0rd@[::1]:5000/api?x=1", "http://[::1]:5000/api?x=1"),
        ("http://user:p@ss@host:5000/", "http://host:5000/"),
        ("http://user:pa/ss@host:5000/x", "http://host:5000/x"),
        ("http://user:pa?ss@host:5000", "http://host:5000"),
        (
            "postgresql://eqlv2:s3cret@db.internal:5432/optuna",
            "postgresql://db.internal:5432/optuna",
        ),
        (
            "postgresql+psycopg://eqlv2:p%3Ass@[fe80::1%25eth0]:5432/optuna?sslmode=require&password=hunter22",
            f"postgresql+psycopg://[fe80::1%25eth0]:5432/optuna?sslmode=require&password={MASK}",
        ),
        ("postgresql://eqlv2@localhost/optuna", "postgresql://localhost/optuna"),
        (
            "mysql+pymysql://root:toor@127.0.0.1:3306/optuna",
            "mysql+pymysql://127.0.0.1:3306/optuna",
        ),
        ("sqlite:////home/u@x/results/mlflow.db", "sqlite:////home/u@x/results/mlflow.db"),
        ("sqlite:///optuna.db", "sqlite:///optuna.db"),
        ("file:///srv/mlruns", "file:///srv/mlruns"),
        ("http://127.0.0.1:5000/path@x", "http://127.0.0.1:5000/path@x"),
        ("http://[::1]:5000/p@x", "http://[::1]:5000/p@x"),
        ("/abs/path/optuna.db", "/abs/path/optuna.db"),
    ],
)
def test_redact_url(url, redacted):
    assert redact_url(url) == redacted


@pytest.mark.parametrize(
    ("url", "flag", "found", "how"),
    [
        (
            "http://user:s3cret@127.0.0.1:5000",
            "--mlflow-uri",
            "a password",
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
        ),
        (
            "https://alice@mlflow.example.org",
            "--mlflow-uri",
            "a user name",
            "MLFLOW_TRACKING_USERNAME",
        ),
        (
            "postgresql://eqlv2:s%2Fcr%40t@[::1]:5432/optuna",
            "--optuna-storage",
            "a password",
            "PGPASSWORD",
        ),
        (
            "postgresql+psycopg://eqlv2@db/optuna?password=hunter22",
            "--optuna-storage",
            "the secret query parameter(s) ['password']",
            "~/.pgpass",
        ),
        (
            "mysql://root:toor@127.0.0.1/optuna",
            "--optuna-storage",
            "a password",
            "read_default_file",
        ),
        ("http://user:pa/ss@host:5000", "--mlflow-uri", "a password", "MLFLOW_TRACKING_PASSWORD"),
    ],
)
def test_url_with_credentials_is_refused_without_showing_them(url, flag, found, how):
    with pytest.raises(CredentialsInUrlError) as caught:
        check_url_has_no_credentials(url, flag)
    message = str(caught.value)
    assert message.startswith(f"{flag} {redact_url(url)} carries {found}")
    assert how in message
    for secret in ("s3cret", "s%2Fcr%40t", "hunter22", "toor", "pa/ss", "alice"):
        assert secret not in message


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:5000",
        "http://[::1]:5000/?x=1",
        "postgresql://eqlv2@db.internal:5432/optuna?sslmode=require",
        "sqlite:////tmp/a@b/mlflow.db",
        "file:///srv/mlruns",
        "/abs/optuna.db",
    ],
)
def test_url_without_password_is_accepted(url):
    check_url_has_no_credentials(url, "--x")
