"""``python -m gateway keys ...`` and ``python -m gateway usage ...``: manage client API keys and
read what they used, from a shell.

The store is the gateway's: ``--db PATH`` or ``EMBEDQ_KEYS_DB`` (one gateway's SQLite file), or
with ``EMBEDQ_KEYS_REDIS=true`` the Redis of ``EMBEDQ_REDIS_URL`` (``EMBEDQ_REDIS_PASSWORD``,
``EMBEDQ_REDIS_PREFIX``), shared by replicas. A running gateway sees every change within a second.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from gateway.redis_link import RedisLink
from gateway.tenancy.admin import DAY_S, moment
from gateway.tenancy.keys import KeysError, RedisKeyStore, SqliteKeyStore, parse_duration
from gateway.tenancy.limits import PRIORITY_NAMES, Limits, parse_budget
from gateway.tenancy.usage import RedisUsage, SqliteUsage, UsageLedger, UsageStore, as_csv, errors_text

LIMIT_FLAGS = ("rpm", "tpm", "concurrency", "budget", "weight", "max_priority")


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    try:
        return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, ValueError, OSError):  # past year 9999: a key made before lifetimes were bounded
        return "far future"


def _store_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=os.environ.get("EMBEDQ_KEYS_DB"), help="key database (default: $EMBEDQ_KEYS_DB)")


def _limit_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", help="comma-separated models the key may use (default: all)")
    parser.add_argument("--rpm", type=int, help="requests per minute")
    parser.add_argument("--tpm", type=int, help="tokens per minute")
    parser.add_argument("--concurrency", type=int, help="requests at once")
    parser.add_argument("--budget", help="tokens per day or month, e.g. 1000000/day")
    parser.add_argument("--weight", type=float, help="its share of a busy queue against other keys' (default 1)")
    parser.add_argument("--max-priority", choices=PRIORITY_NAMES, help="the highest priority it may ask for (default: default)")


def _keys_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gateway keys", description="manage client API keys")
    _store_flags(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a key and print it, once")
    create.add_argument("name")
    create.add_argument("--expires", help="lifetime such as 90d, 12h, 30m (default: never)")
    _limit_flags(create)
    update = commands.add_parser("update", help="change a key's limits (0 or 'none' lifts one)")
    update.add_argument("name")
    _limit_flags(update)
    commands.add_parser("list", help="list keys (never their secrets)")
    revoke = commands.add_parser("revoke", help="revoke a key: it stops working at once")
    revoke.add_argument("name")
    commands.add_parser("export", help="print usable keys (hashes only) as JSON for EMBEDQ_KEYS_FILE")
    return parser


def _usage_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gateway usage", description="usage per key or model")
    _store_flags(parser)
    parser.add_argument("--from", dest="start", help="ISO date or time, UTC (default: 24 hours ago)")
    parser.add_argument("--to", dest="end", help="ISO date or time, UTC (default: now)")
    parser.add_argument("--by", choices=("key", "model"), default="key")
    parser.add_argument("--granularity", choices=("hour", "day"), default="day")
    parser.add_argument("--key", help="only this key")
    parser.add_argument("--model", help="only this model")
    parser.add_argument("--csv", action="store_true", help="CSV instead of a table")
    return parser


def _redis(env: Mapping[str, str]) -> tuple[str, str | None, str] | None:
    """The Redis of EMBEDQ_KEYS_REDIS=true: url, password, prefix."""
    if env.get("EMBEDQ_KEYS_REDIS", "").lower() not in ("1", "true", "yes"):
        return None
    url = env.get("EMBEDQ_REDIS_URL")
    if not url:
        raise KeysError("EMBEDQ_KEYS_REDIS=true needs EMBEDQ_REDIS_URL")
    return url, env.get("EMBEDQ_REDIS_PASSWORD"), env.get("EMBEDQ_REDIS_PREFIX", "embedq")


def main(argv: list[str], env: Mapping[str, str] = os.environ) -> int:
    """``keys ...`` (argv without "keys")."""
    args = _keys_parser().parse_args(argv)
    try:
        redis = _redis(env)
        if redis is not None:
            store: SqliteKeyStore | RedisKeyStore = RedisKeyStore(*redis)
        elif args.db:
            store = SqliteKeyStore(args.db)
        else:
            print("error: no key store: pass --db PATH, set EMBEDQ_KEYS_DB, or EMBEDQ_KEYS_REDIS=true", file=sys.stderr)
            return 2
        try:
            return _keys(store, args)
        finally:
            store.close()
    except (KeysError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    for name in LIMIT_FLAGS:
        value = getattr(args, name)
        if value is None:
            continue
        if name == "budget":
            changes["budget"], changes["budget_period"] = (None, "month") if value in ("0", "none") else parse_budget(value)
        elif name in ("rpm", "tpm", "concurrency"):
            changes[name] = value or None  # 0 lifts the limit
        else:
            changes[name] = value
    if args.models is not None:
        changes["models"] = [m.strip() for m in args.models.split(",") if m.strip()] or None
    return changes


def _keys(store: SqliteKeyStore | RedisKeyStore, args: argparse.Namespace) -> int:
    if args.command == "create":
        changes = _changes(args)
        models = changes.pop("models", None)
        secret, key = store.create(args.name, models, parse_duration(args.expires) if args.expires else None, Limits(**changes))
        print(secret)
        print(
            f"created key {key.name!r} for {', '.join(key.models) if key.models else 'every model'}, "
            f"expires {_when(key.expires_at) if key.expires_at else 'never'}{_limits_text(key.limits)}. "
            "This is the only time the key is shown.",
            file=sys.stderr,
        )
    elif args.command == "update":
        key = store.update(args.name, **_changes(args))
        print(f"updated key {key.name!r}{_limits_text(key.limits) or ': no limits'}", file=sys.stderr)
    elif args.command == "list":
        now = time.time()
        print(f"{'NAME':20} {'STATE':8} {'MODELS':20} {'LIMITS':36} {'EXPIRES':21} LAST USED")
        for key in store.all():
            state = "revoked" if key.revoked_at else "expired" if not key.usable(now) else "active"
            scope = ",".join(key.models) if key.models else "*"
            limits = _limits_text(key.limits).removeprefix(", ") or "-"
            print(f"{key.name:20} {state:8} {scope:20} {limits:36} {_when(key.expires_at):21} {_when(key.last_used_at)}")
    elif args.command == "revoke":
        store.revoke(args.name)
        print(f"revoked key {args.name!r}", file=sys.stderr)
    else:
        print(store.export())
    return 0


def _limits_text(limits: Limits) -> str:
    parts = [f"{name}={getattr(limits, name)}" for name in ("rpm", "tpm", "concurrency") if getattr(limits, name)]
    if limits.budget:
        parts.append(f"budget={limits.budget}/{limits.budget_period}")
    if limits.weight != 1.0:
        parts.append(f"weight={limits.weight:g}")
    if limits.max_priority != "default":
        parts.append(f"max_priority={limits.max_priority}")
    return ", " + " ".join(parts) if parts else ""


def usage_main(argv: list[str], env: Mapping[str, str] = os.environ) -> int:
    """``usage ...`` (argv without "usage")."""
    args = _usage_parser().parse_args(argv)
    try:
        redis = _redis(env)
        start, end = _period(args)
    except (KeysError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if redis is not None:
        store: UsageStore = RedisUsage(RedisLink(*redis), 0)
    elif args.db:
        store = SqliteUsage(args.db)
    else:
        print("error: no usage store: pass --db PATH, set EMBEDQ_KEYS_DB, or EMBEDQ_KEYS_REDIS=true", file=sys.stderr)
        return 2
    report = UsageLedger(store, 1).report(start, end, by=args.by, granularity=args.granularity, key=args.key, model=args.model)
    rows = asyncio.run(report)
    if args.csv:
        sys.stdout.write(as_csv(rows, args.by))
    else:
        print(f"{'START':21} {args.by.upper():24} {'REQUESTS':>9} {'INPUTS':>9} {'TOKENS':>12} {'429S':>6} ERRORS")
        for row in rows:
            print(
                f"{row['start']:21} {row[args.by]:24} {row['requests']:>9} {row['inputs']:>9} {row['prompt_tokens']:>12} "
                f"{row['rejected']:>6} {errors_text(row['errors']) or '-'}"
            )
    return 0


def _period(args: argparse.Namespace) -> tuple[float, float]:
    end = moment(args.end) if args.end else time.time()
    return (moment(args.start) if args.start else end - DAY_S), end
