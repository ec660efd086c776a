"""Owner claims: a command proves it acts for a flow's owner (``FLOWD_ENFORCE_OWNER``).

NATS tells flowd nothing about who published a JetStream message, so the proof travels with
the message: headers ``Flowd-Owner: <owner>`` and ``Flowd-Owner-Signature: v1=<hex>``, an
HMAC-SHA256 over the owner, the command id, the subject as published and the body's SHA-256,
under the *owner key*. An owner key is derived from a master key that only flowd and the
operator's issuing service hold: ``owner_key(master, owner)``. A client is handed the key of
its own owner (``flowctl owner-key``) and can sign for that owner only. Several master keys
may be configured (the first is current) so a key can be rotated without downtime.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from flowd.core import errors

VERSION = "v1"
MIN_KEY_LENGTH = 32


def parse_keys(text: str) -> tuple[bytes, ...]:
    """Master keys from a keys file: one per line (its UTF-8 bytes, e.g. the output of
    ``openssl rand -hex 32``), the current one first; blank lines and ``#`` comments are
    skipped. ValueError if there is none, or one is shorter than ``MIN_KEY_LENGTH``."""
    keys = [line.strip() for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ValueError("the owner keys file holds no key")
    if any(len(k) < MIN_KEY_LENGTH for k in keys):
        raise ValueError(f"an owner master key is shorter than {MIN_KEY_LENGTH} characters")
    return tuple(k.encode() for k in keys)


def owner_key(master: bytes, owner: str) -> bytes:
    """The key an owner signs its commands with."""
    return hmac.new(master, b"flowd-owner-key\n" + owner.encode(), hashlib.sha256).digest()


def _message(owner: str, command_id: str, subject: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return "\n".join(("flowd-owner-v1", owner, command_id, subject, digest)).encode()


def sign(key: bytes, owner: str, command_id: str, subject: str, body: bytes) -> str:
    """The ``Flowd-Owner-Signature`` header value of one command."""
    mac = hmac.new(key, _message(owner, command_id, subject, body), hashlib.sha256)
    return f"{VERSION}={mac.hexdigest()}"


def verified_owner(
    masters: Sequence[bytes],
    owner: str | None,
    signature: str | None,
    *,
    command_id: str,
    subject: str,
    body: bytes,
) -> str:
    """The owner a command proves it acts for, or ``Forbidden`` saying why not."""
    if not owner or not signature:
        raise errors.Forbidden("the command carries no owner claim", reason="missing_claim")
    try:  # (any text may arrive in a header: compare bytes, never str, which must be ASCII)
        given = signature.encode()
        for master in masters:
            expected = sign(owner_key(master, owner), owner, command_id, subject, body)
            if hmac.compare_digest(expected.encode(), given):
                return owner
    except UnicodeError:  # a lone surrogate: no key signs that
        pass
    raise errors.Forbidden(
        f"the owner claim for {owner!r} has a bad signature", reason="bad_signature"
    )


def require_owner(claimed: str, owner_session_key: str) -> None:
    """``Forbidden`` unless the proven owner is the flow's owner."""
    if not hmac.compare_digest(claimed.encode(), owner_session_key.encode()):
        raise errors.Forbidden(
            f"owner {claimed!r} may not act on a flow owned by another session",
            reason="not_owner",
        )
