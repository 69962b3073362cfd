"""``python -m gateway keys create|list|revoke|export``: manage client API keys.

The database is ``--db PATH`` or ``EMBEDQ_KEYS_DB``; a running gateway using the same file
sees every change on its next request.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime

from gateway.keys import KeysError, SqliteKeyStore, parse_duration


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gateway keys", description="manage client API keys")
    parser.add_argument("--db", default=os.environ.get("EMBEDQ_KEYS_DB"), help="key database (default: $EMBEDQ_KEYS_DB)")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a key and print it, once")
    create.add_argument("name")
    create.add_argument("--models", help="comma-separated models the key may use (default: all)")
    create.add_argument("--expires", help="lifetime such as 90d, 12h, 30m (default: never)")
    commands.add_parser("list", help="list keys (never their secrets)")
    revoke = commands.add_parser("revoke", help="revoke a key: it stops working at once")
    revoke.add_argument("name")
    commands.add_parser("export", help="print usable keys (hashes only) as JSON for EMBEDQ_KEYS_FILE")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not args.db:
        print("error: no key database: pass --db PATH or set EMBEDQ_KEYS_DB", file=sys.stderr)
        return 2
    store = SqliteKeyStore(args.db)
    try:
        return _run(store, args)
    except KeysError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()


def _run(store: SqliteKeyStore, args: argparse.Namespace) -> int:
    if args.command == "create":
        models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
        secret, key = store.create(args.name, models, parse_duration(args.expires) if args.expires else None)
        print(secret)
        print(
            f"created key {key.name!r} for {', '.join(key.models) if key.models else 'every model'}, "
            f"expires {_when(key.expires_at) if key.expires_at else 'never'}. "
            "This is the only time the key is shown.",
            file=sys.stderr,
        )
    elif args.command == "list":
        now = time.time()
        print(f"{'NAME':20} {'STATE':8} {'MODELS':24} {'CREATED':21} {'EXPIRES':21} LAST USED")
        for key in store.all():
            state = "revoked" if key.revoked_at else "expired" if not key.usable(now) else "active"
            scope = ",".join(key.models) if key.models else "*"
            print(
                f"{key.name:20} {state:8} {scope:24} {_when(key.created_at):21} {_when(key.expires_at):21} "
                f"{_when(key.last_used_at)}"
            )
    elif args.command == "revoke":
        store.revoke(args.name)
        print(f"revoked key {args.name!r}", file=sys.stderr)
    else:
        print(store.export())
    return 0
