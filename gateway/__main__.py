"""``python -m gateway [--host H] [--port P]``; every other setting from EMBEDQ_* variables.

``python -m gateway keys ...`` manages client API keys, ``python -m gateway usage ...`` reports
what they used (see tenancy/cli.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from gateway import memory
from gateway.app import create_app
from gateway.batches.store import DataDirBusy, DirStore
from gateway.server import DrainingServer, server_config
from gateway.settings import SettingsError, load_settings
from gateway.tenancy import cli as tenancy_cli


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:
        return tenancy_cli.main(argv[1:])
    if argv[:1] == ["usage"]:
        return tenancy_cli.usage_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m gateway", description="embedq gateway")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1, or EMBEDQ_HOST)")
    parser.add_argument("--port", type=int, help="port to bind (default 8080, or EMBEDQ_PORT)")
    args = parser.parse_args(argv)
    memory.use_system_allocator()  # returns at once when it already runs on it
    try:
        settings = load_settings(os.environ, host=args.host, port=args.port)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.queue == "memory":  # on Redis, files and batches live there: no directory to share
        try:
            DirStore.lock(Path(settings.data_dir)).close()
        except DataDirBusy as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    app = create_app(settings)
    DrainingServer(server_config(app, settings), app, drain_timeout_s=settings.request_timeout_s).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
