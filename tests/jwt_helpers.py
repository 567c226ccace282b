"""NATS decentralized auth for tests: nkeys, JWTs and .creds files, generated on the spot.

An operator signs account JWTs, an account signs user JWTs (the nats-io/jwt v2 claim format: a
JOSE header ``{"typ": "JWT", "alg": "ed25519-nkey"}``, the claims with a ``nats`` section naming the
claim type, base64url without padding, an ed25519 signature by the issuer's nkey). The server trusts
the operator and gets the account JWTs from its config (``resolver: MEMORY`` + ``resolver_preload``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Identity:
    """An nkey pair: ``seed`` (secret, bytes as in a .nk file) and ``public`` (the id)."""

    seed: bytes
    public: str

    @classmethod
    def new(cls, prefix: int) -> Identity:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        return cls(seed, nkeys.from_seed(bytearray(seed)).public_key.decode())

    def sign(self, data: bytes) -> bytes:
        return nkeys.from_seed(bytearray(self.seed)).sign(data)


def encode_jwt(issuer: Identity, subject: str, name: str, nats: dict[str, Any], expires: float | None = None) -> str:
    """A JWT of ``nats`` claims about ``subject``, signed by ``issuer``."""
    claims: dict[str, Any] = {"iat": int(time.time()), "iss": issuer.public, "name": name, "sub": subject}
    if expires is not None:
        claims["exp"] = int(expires)
    # The id is a hash of the claims (without it), as nats-io/jwt computes it.
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    claims["nats"] = {**nats, "version": 2}
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(claims).encode())
    signature = _b64(issuer.sign(f"{header}.{payload}".encode()))
    return f"{header}.{payload}.{signature}"


_UNLIMITED_ACCOUNT = {
    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
    "conn": -1, "leaf": -1,
}
_JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


class Operator:
    """An operator with a system account and any number of (JetStream) accounts and users."""

    def __init__(self) -> None:
        self.identity = Identity.new(nkeys.PREFIX_BYTE_OPERATOR)
        self.system = Identity.new(nkeys.PREFIX_BYTE_ACCOUNT)
        self.accounts: dict[str, str] = {}  # public key -> account JWT
        self.account("SYS", self.system, jetstream=False)

    def account(self, name: str, identity: Identity | None = None, jetstream: bool = True) -> Identity:
        identity = identity or Identity.new(nkeys.PREFIX_BYTE_ACCOUNT)
        limits = dict(_UNLIMITED_ACCOUNT, **(_JETSTREAM if jetstream else {}))
        self.accounts[identity.public] = encode_jwt(
            self.identity, identity.public, name, {"type": "account", "limits": limits}
        )
        return identity

    def user_jwt(
        self,
        account: Identity,
        name: str,
        user: Identity,
        pub: dict[str, list[str]] | None = None,
        sub: dict[str, list[str]] | None = None,
        expires: float | None = None,
    ) -> str:
        """A user JWT signed by ``account``; ``pub`` / ``sub`` are {"allow": [...], "deny": [...]}."""
        claims: dict[str, Any] = {"type": "user", "subs": -1, "data": -1, "payload": -1}
        if pub:
            claims["pub"] = pub
        if sub:
            claims["sub"] = sub
        return encode_jwt(account, user.public, name, claims, expires)

    def server_config(self) -> str:
        """The trust section of a nats-server config for this operator (memory resolver)."""
        operator_jwt = encode_jwt(
            self.identity, self.identity.public, "natskv-test",
            {"type": "operator", "system_account": self.system.public},
        )
        preload = "\n".join(f"  {public}: {jwt}" for public, jwt in self.accounts.items())
        return (
            f"operator: {operator_jwt}\n"
            f"system_account: {self.system.public}\n"
            "resolver: MEMORY\n"
            f"resolver_preload: {{\n{preload}\n}}\n"
        )


def write_creds(path: Path, user_jwt: str, user: Identity) -> Path:
    """A .creds file as `nsc` writes it: the user JWT, then the user's nkey seed."""
    path.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.seed.decode()}\n"
        "------END USER NKEY SEED------\n"
    )
    path.chmod(0o600)
    return path
