"""``antidistill keygen --tier pro [--name acme] [--account acme]``: a new API key, printed once, and the line for the
tiers file, which holds only the key's SHA-256 (a leaked tiers file gives no one a key)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from antidistill.server.tiers import new_key


def main(argv: Sequence[str]) -> int:
    ap = argparse.ArgumentParser(prog="antidistill keygen", description="print a new API key and its tiers-file entry")
    ap.add_argument("--tier", required=True)
    ap.add_argument("--name")
    ap.add_argument("--account", help="the account whose limits and escalation the key shares (tiers file: accounts)")
    args = ap.parse_args(argv)
    key, digest = new_key()
    entry = {"sha256": digest, "tier": args.tier}
    entry |= {field: value for field in ("name", "account") if (value := getattr(args, field))}
    print(f"key (give to the client, shown once): {key}")
    print(f"tiers file entry under keys:           - {json.dumps(entry)}")
    return 0
