"""How big a signed bundle may be: one limit per thing, defined here once.

Every limit follows from one decision, ``MAX_BUNDLE_GRANTS``: a bundle carries
at most 100,000 grants (a host's whole grant set; the kernel holds 262,144
entries per generation). The byte limits are the largest encoding such a
bundle can have, computed from the field limits of the payload (a 253-byte
trust domain repeated in every agent id, 63-byte agent names, IPv6 port-range
grants, 19-digit serials, 14-digit millisecond times) and checked by
``tests/unit/test_limits.py``, which builds that worst-case bundle:

    worst-case grant record            557 bytes (typical: 213 bytes)
    worst-case payload, 100,000 grants 55.7 MB   (typical: 21.3 MB)
    its envelope (base64, signatures)  74.3 MB   (typical: 28.4 MB)

So the issuer can never produce a bundle a daemon refuses for its size: the
issuer refuses more than MAX_BUNDLE_GRANTS grants, and every grant it can
write fits. Bytes are cheap to bound; what a hostile sender really spends is
*objects*: 4 MiB of ``[{},{},…]`` is 1.4 million dicts (100 MiB) to a JSON
parser. So before any JSON is parsed, the envelope's structure is counted in
its raw bytes (``structure_count``): an envelope has a handful of objects,
lists, commas and colons, whatever its size, and one with more is refused
without building anything. The payload, parsed only after its signature
checked out, is held to the same rule scaled to MAX_BUNDLE_GRANTS.
"""

from __future__ import annotations

import functools

MAX_BUNDLE_GRANTS = 100_000
# Hostname grants (ztnet.grants.names) travel in a list of their own, with their own cap.
MAX_BUNDLE_NAMES = 10_000
MAX_ISSUER = 256
MAX_PAYLOAD_TYPE = 256
MAX_SIGNATURES = 8

# Worst-case sizes (see the module docstring and tests/unit/test_limits.py).
MAX_GRANT_RECORD_BYTES = 560  # one encoded grant object and its comma
MAX_PAYLOAD_HEADER_BYTES = 1024  # every payload field but the grants
# Quarantined agents a bundle may name (docs/detection.md), each one small object.
MAX_QUARANTINED = 256
MAX_QUARANTINE_RECORD_BYTES = 360  # {"agent":"spiffe://<253>/agent/<63>","freeze":false},
MAX_NAME_RECORD_BYTES = 776  # one encoded hostname grant (a 253-character name) and its comma
MAX_PAYLOAD_BYTES = (MAX_PAYLOAD_HEADER_BYTES + MAX_BUNDLE_GRANTS * MAX_GRANT_RECORD_BYTES
                     + MAX_QUARANTINED * MAX_QUARANTINE_RECORD_BYTES
                     + MAX_BUNDLE_NAMES * MAX_NAME_RECORD_BYTES)
# The envelope: the payload in base64 (4 bytes per 3), its type, up to
# MAX_SIGNATURES signatures (about 150 bytes each) and the JSON around them.
MAX_ENVELOPE_BYTES = 4 * -(-MAX_PAYLOAD_BYTES // 3) + MAX_PAYLOAD_TYPE + 4096

# Structural characters ({ [ , :) an envelope may hold: 2 per signature object
# and the envelope itself, plus whatever its payloadType spells out.
MAX_ENVELOPE_STRUCTURE = 16 * (MAX_SIGNATURES + 1) + MAX_PAYLOAD_TYPE
# Objects ({) and lists ([) a payload may hold: one object per grant, per hostname grant
# and the payload, three lists (grants, audit agents, hostname grants) and the quarantine
# list; the issuer's printable name may contain either. An audited agent's id (at most ~330
# bytes) takes the room of one grant record: grants and audited agents together are at most
# MAX_BUNDLE_GRANTS.
MAX_PAYLOAD_OBJECTS = MAX_BUNDLE_GRANTS + MAX_QUARANTINED + MAX_BUNDLE_NAMES + 1 + MAX_ISSUER
MAX_PAYLOAD_LISTS = 3 + MAX_ISSUER
# A delta (ztnet.grants.delta) changes at most this many grants (additions and revocations
# together); a larger change is a whole bundle. A revoked id takes far less room than a grant.
MAX_DELTA_CHANGES = 10_000
MAX_DELTA_PAYLOAD_BYTES = MAX_PAYLOAD_HEADER_BYTES + MAX_DELTA_CHANGES * MAX_GRANT_RECORD_BYTES
# What a gRPC channel must carry for one pushed bundle: the envelope and the
# few fields of the message around it.
MAX_BUNDLE_MESSAGE_BYTES = MAX_ENVELOPE_BYTES + 64 * 1024


STRUCTURE = b"{[,:"
_CHUNK = 16 * 1024  # small: refusing a hostile envelope must not allocate a copy of it


@functools.cache
def _all_but(chars: bytes) -> bytes:
    return bytes(byte for byte in range(256) if byte not in chars)


def structure_kept(data: bytes, chars: bytes = STRUCTURE, *, stop_above: int) -> bytes:
    """The bytes of ``data`` that are among ``chars``, in order, or the first
    ``stop_above`` + 1 of them at least once there are more. One C pass per chunk
    (``bytes.translate``, 5x faster than a ``count`` per character over a 28 MB
    envelope); the caller counts the characters it limits in what comes back."""
    drop, kept, total = _all_but(chars), [], 0
    for start in range(0, len(data), _CHUNK):
        chunk = data[start:start + _CHUNK].translate(None, drop)
        kept.append(chunk)
        total += len(chunk)
        if total > stop_above:
            break
    return b"".join(kept)


def structure_count(data: bytes, *, stop_above: int) -> int:
    """How many structural JSON characters ({ [ , :) ``data`` holds, an upper bound on
    the values a parser would build; above ``stop_above`` counting stops early."""
    return len(structure_kept(data, stop_above=stop_above))
