"""Credentials stay in the environment: a URL carrying them is refused, and named redacted.

Applied by the driver to every URL flag before anything is printed, stored or pickled. A password
or secret query parameter (``?password=...``) in a URL is refused, with a message saying how to
pass it instead (refusing says what to do at once; stripping it would leave a search that cannot
log in). A user name alone is accepted for a database URL (password in ``~/.pgpass``) but not for
an MLflow server URL (its client reads ``MLFLOW_TRACKING_USERNAME``). The refusal shows the URL
without its user-info and with secret query values masked.

The user-info is everything between ``scheme://`` and the last ``@`` before the first ``/``, ``?``
or ``#`` (the rule of ``urllib.parse`` and SQLAlchemy). A password with a raw ``/``, ``?`` or ``#``
(``http://user:pa/ss@host``: a port that is not a number) is treated as credentials too and cut
up to the last ``@``, so nothing of it is shown.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

MASK = "***"
#: Query parameters whose values are secrets (libpq's ``password``, tokens, keys).
SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "pass", "secret", "token", "access_token", "api_key", "apikey", "sslpassword"})
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")


class CredentialsInUrlError(ValueError):
    """A URL given on the command line carries a password; the message says how to pass it."""


def _split(url: str) -> tuple[str, str | None, str] | None:
    """``url`` cut at its user-info (see the module docstring): ``(scheme, user-info or None,
    rest)``; None without ``scheme://``."""
    match = _SCHEME.match(url)
    if match is None:
        return None
    scheme, after = match.group("scheme"), url[match.end() :]
    authority = re.split(r"[/?#]", after, maxsplit=1)[0]
    if "@" in authority or ("@" in after and _looks_like_broken_userinfo(authority)):
        userinfo = (authority if "@" in authority else after).rpartition("@")[0]
        return scheme, userinfo, after[len(userinfo) + 1 :]
    return scheme, None, after


def _looks_like_broken_userinfo(authority: str) -> bool:
    """``user:pa`` of ``user:pa/ss@host``: a colon followed by a port that is not a number."""
    host = re.sub(r"^\[[^\]]*\]", "", authority)  # an IPv6 literal's colons are not a port
    return ":" in host and not host.rpartition(":")[2].isdigit()


def _masked_query(rest: str) -> tuple[str, list[str]]:
    """``rest`` with the values of secret query parameters replaced by :data:`MASK`, and their names."""
    if "?" not in rest:
        return rest, []
    path, _, query = rest.partition("?")
    query, hash_mark, fragment = query.partition("#")
    fields, secrets = [], []
    for field in query.split("&"):
        key, equals, _ = field.partition("=")
        if unquote_plus(key).lower() in SECRET_QUERY_KEYS:
            secrets.append(unquote_plus(key))
            field = f"{key}={MASK}" if equals else field
        fields.append(field)
    return f"{path}?{'&'.join(fields)}{hash_mark}{fragment}", secrets


def redact_url(url: str) -> str:
    """``url`` without user-info and with secret query values masked
    (``http://user:s3cret@127.0.0.1:5000`` → ``http://127.0.0.1:5000``)."""
    parts = _split(url)
    return url if parts is None else f"{parts[0]}://{_masked_query(parts[2])[0]}"


def _how_to_pass(scheme: str) -> str:
    base = scheme.split("+", 1)[0].lower()
    if base in ("http", "https"):
        return "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment instead; MLflow reads them"
    if base in ("postgresql", "postgres"):
        return (
            "set PGPASSWORD in the environment or put a line host:port:database:user:password in ~/.pgpass "
            "(chmod 600) instead; the user name may stay in the URL"
        )
    if base in ("mysql", "mariadb"):
        return "put the password in a MySQL option file and pass ?read_default_file=PATH instead"
    return "pass the password through the environment or a credentials file of the service instead"


def check_url_has_no_credentials(url: str, flag: str) -> None:
    """Raises CredentialsInUrlError, naming ``flag`` and the redacted URL, if ``url`` carries a
    password, a secret query parameter, or (``http(s)``) a user name (see the module docstring)."""
    parts = _split(url)
    if parts is None:
        return
    scheme, userinfo, rest = parts
    found = []
    if userinfo is not None and (":" in userinfo or scheme.lower() in ("http", "https")):
        found.append("a password" if ":" in userinfo else "a user name")
    secret_keys = _masked_query(rest)[1]
    if secret_keys:
        found.append(f"the secret query parameter(s) {secret_keys}")
    if found:
        raise CredentialsInUrlError(
            f"{flag} {redact_url(url)} carries {' and '.join(found)} in the URL, where it would be printed, "
            f"logged and stored: remove it from the URL and {_how_to_pass(scheme)}"
        )
