"""`ztnet keys init DIR`: the Ed25519 grant-signing key pair."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from ztnet.cli.args import SubParsers, add_command, add_group


def register(sub: SubParsers) -> None:
    keys = add_command(sub, "keys", "Manage the Ed25519 grant-signing key.",
                       "ztnet keys init /etc/ztnet/keys")
    group = add_group(keys, "keys_command")
    init = add_command(group, "init", "Create DIR/signing.key (private, mode 0600) and "
                       "DIR/signing.pub; never overwrites an existing key.",
                       "ztnet keys init /etc/ztnet/keys", handle_init)
    init.add_argument("dir", metavar="DIR", help="directory for the key pair (created 0700)")


def handle_init(args: argparse.Namespace) -> int:
    return keys_init(args.dir)


def keys_init(directory: str | os.PathLike[str], *, out: TextIO | None = None) -> int:
    """Create a signing key pair in ``directory`` and say how hosts use it."""
    from ztnet.grants.keys import generate_keypair, key_id, load_public_key

    key_path, pub_path = generate_keypair(directory)
    kid = key_id(load_public_key(pub_path))
    out = out if out is not None else sys.stdout
    print(f"wrote {key_path} (private, mode 0600) and {pub_path}", file=out)
    print(f"key id {kid}", file=out)
    print(f"hosts verify bundles with: ztnet policy verify BUNDLE --trust {pub_path}", file=out)
    return 0
