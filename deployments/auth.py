"""API keys: who may call the endpoint, and which prefix-cache tenant each caller belongs to.

Keys come from three places, merged (see :class:`deployments.app.IngressConfig`): the YAML's
``ingress.api_keys``, the file ``ingress.api_keys_file`` (one key per line, optionally followed
by whitespace and a tenant name; ``#`` starts a comment) and the environment variable
``OPTGPTQ_API_KEYS`` (comma-separated keys) of the process that builds the application. Only
SHA-256 digests of the keys travel to the ingress replicas (Serve stores deployment arguments in
its controller), and a presented key is compared with every digest in constant time
(:func:`hmac.compare_digest`, no early exit), so neither the stored keys nor the timing tell
anything about a key.

HTTP callers send ``Authorization: Bearer <key>`` (what OpenAI clients send), gRPC callers the
same in the call's ``authorization`` metadata. A key's tenant is the name given with it, else
the key's own digest: requests of one tenant share cached prefixes, other tenants' never do
(:func:`optgptq.serving.protocol.effective_salt`). Without keys the endpoint is open, which
:class:`~deployments.app.IngressConfig` allows only on a loopback address.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from optgptq.serving.protocol import APIError

ENV_VAR = "OPTGPTQ_API_KEYS"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys_file(path: str) -> list[tuple[str, str | None]]:
    """``(key, tenant or None)`` per line of an API keys file; ValueError naming the line."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read the API keys file {path!r}: {exc.strerror}") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if len(fields) > 2:
            raise ValueError(f"{path}:{number}: expected 'KEY [TENANT]'")
        if fields:
            keys.append((fields[0], fields[1] if len(fields) == 2 else None))
    return keys


def collect_keys(inline: list[str], path: str | None) -> dict[str, str]:
    """Digest -> tenant for every configured key (YAML, file, environment)."""
    pairs: list[tuple[str, str | None]] = [(k, None) for k in inline]
    if path:
        pairs += parse_keys_file(path)
    pairs += [(k.strip(), None) for k in os.environ.get(ENV_VAR, "").split(",") if k.strip()]
    keys = {}
    for key, tenant in pairs:
        if len(key) < 16:
            raise ValueError("an API key must have at least 16 characters")
        keys[digest(key)] = tenant or f"key-{digest(key)[:16]}"
    return keys


class APIKeys:
    """The check an ingress applies to each request; ``keys`` maps digests to tenants (empty:
    no authentication, every caller is tenant None)."""

    def __init__(self, keys: dict[str, str]) -> None:
        self._keys = [(d.encode(), t) for d, t in keys.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def tenant(self, authorization: str | None) -> str | None:
        """The caller's tenant from its ``Authorization`` value; APIError 401 unless it holds a
        valid key (None when authentication is off)."""
        if not self._keys:
            return None
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        presented = digest(key.strip()).encode()
        found = None
        for stored, tenant in self._keys:  # every digest compared: time does not depend on which
            if hmac.compare_digest(presented, stored):
                found = tenant
        if found is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        return found
