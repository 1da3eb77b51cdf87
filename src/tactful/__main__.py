"""Command line: ``tactful serve`` runs the server; ``tactful settings`` prints the settings."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from prometheus_client import start_http_server

from tactful.settings import Settings, SettingsError, settings_table

log = logging.getLogger("tactful")


def serve(settings: Settings) -> int:
    # Imported here so `tactful settings` works without generated stubs.
    from tactful import demo
    from tactful.core import CatalogCache, CatalogService
    from tactful.embedded_redis import EmbeddedRedis
    from tactful.store import RedisStore, connect
    from tactful.transport.server import build_server, serve_until_signalled

    embedded: EmbeddedRedis | None = None
    url = settings.redis.url
    if not url:
        embedded = EmbeddedRedis(
            settings.redis.data_dir,
            binary=settings.redis.server_binary,
            appendfsync=settings.redis.appendfsync,
        ).start()
        url = embedded.url
    try:
        store = RedisStore(
            connect(
                url,
                socket_timeout=settings.redis.socket_timeout_ms / 1000,
                connect_timeout=settings.redis.connect_timeout_ms / 1000,
                max_connections=settings.redis.max_connections,
            ),
            signal_half_life_seconds=settings.policy.signal_half_life_hours * 3600,
            decision_ttl_seconds=settings.policy.decision_ttl_seconds,
            request_id_ttl_seconds=settings.policy.request_id_ttl_seconds,
        )
        if settings.server.load_demo_catalog:
            catalog = CatalogService(store, CatalogCache(store))
            if catalog.is_empty():
                for offer in demo.DEMO_OFFERS:
                    catalog.put_offer(offer)
                log.info(
                    "store had no offers: loaded the demo catalog (%d offers)",
                    len(demo.DEMO_OFFERS),
                )
        if settings.server.metrics_port:
            start_http_server(settings.server.metrics_port, addr=settings.server.host)
        running = build_server(settings, store)
        log.info(
            "tactful serving gRPC on %s:%d, metrics on :%d, store %s",
            settings.server.host,
            running.port,
            settings.server.metrics_port,
            "embedded redis-server in " + settings.redis.data_dir if embedded else "external Redis",
        )
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("received %s", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        serve_until_signalled(running, settings, stop)
    finally:
        if embedded is not None:
            embedded.stop()
    log.info("tactful stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tactful", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the gRPC server (settings from TACTFUL_* variables)")
    sub.add_parser("settings", help="print the settings table (Markdown)")
    args = parser.parse_args(argv)
    if args.command == "settings":
        print(settings_table())
        return 0
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"tactful: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
