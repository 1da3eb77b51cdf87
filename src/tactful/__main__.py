"""Command line: ``tactful serve`` (the server, with its learner unless told otherwise),
``tactful learn`` (a learner on its own), ``tactful model list|rollback|unpin``,
``tactful report`` / ``tactful export`` (the decision log as an ROI report / VW DSJson),
``tactful import`` / ``tactful export --profiles`` (profiles as JSON lines, see ``bulk``),
``tactful new-key`` / ``tactful hash-key`` (API keys and their TACTFUL_API_KEYS entries),
``tactful settings`` (the settings table) and ``tactful healthcheck`` (the container's probe)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import getpass
import logging
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from tactful import runtime
from tactful.settings import Settings, SettingsError, key_digest, parse_roles, settings_table

log = logging.getLogger("tactful")


def serve(settings: Settings) -> int:
    # Imported here so `tactful settings` works without generated stubs.
    from tactful import demo
    from tactful.caches import CatalogCache
    from tactful.catalog_service import CatalogService
    from tactful.embedded_redis import EmbeddedRedis
    from tactful.transport.auth import check_serving

    check_serving(settings.security)  # before anything starts: no keys, unreadable TLS files
    # From here on a Ctrl-C or SIGTERM stops the server in order (as soon as it is up, when it
    # comes during start-up), never as a KeyboardInterrupt halfway through.
    stop = threading.Event()
    runtime.stop_on_signals(stop)
    embedded: EmbeddedRedis | None = None
    url = settings.redis.url
    if not url:
        embedded = EmbeddedRedis(
            settings.redis.data_dir,
            binary=settings.redis.server_binary,
            appendfsync=settings.redis.appendfsync,
        ).start()
        url = embedded.url
    store_name = (
        "embedded redis-server in " + settings.redis.data_dir if embedded else "external Redis"
    )
    try:
        store = runtime.redis_store(settings, url)
        if settings.server.load_demo_catalog:
            catalog = CatalogService(store, CatalogCache(store))
            if catalog.is_empty():
                for offer in demo.DEMO_OFFERS:
                    catalog.put_offer(offer)
                log.info(
                    "store had no offers: loaded the demo catalog (%d offers)",
                    len(demo.DEMO_OFFERS),
                )
        if settings.server.workers > 1:
            from tactful.workers import supervise

            store.client.close()  # the workers and the learner have their own
            status = supervise(settings, url, store_name, stop)
        else:
            status = _serve_one_process(settings, url, store, store_name, stop)
    finally:
        if embedded is not None:  # last: every process that used it has stopped
            embedded.stop()
    log.info("tactful stopped")
    return status


def _serve_one_process(
    settings: Settings, url: str, store: Any, store_name: str, stop: threading.Event
) -> int:
    """TACTFUL_WORKERS=1: the gRPC server, /metrics and the learner thread in this process."""
    from prometheus_client import start_http_server

    from tactful.transport.server import build_server

    if settings.server.metrics_port:
        start_http_server(settings.server.metrics_port, addr=settings.server.host)
    running = build_server(settings, store)
    log.info(
        "tactful serving gRPC on %s:%d, metrics on :%d, store %s",
        settings.server.host,
        running.port,
        settings.server.metrics_port,
        store_name,
    )
    learner = (
        runtime.start_learner(settings, url, stop) if settings.learning.embedded_learner else None
    )
    runtime.serve_until_stopped(running, settings, stop)
    if learner is not None:  # it saves its state before serve() stops the redis-server
        learner.join(timeout=10)
    return 0


def healthcheck(settings: Settings, timeout: float) -> int:
    """`tactful healthcheck`, the container's HEALTHCHECK: 0 when the server these TACTFUL_*
    settings describe reports SERVING on this host, else 1 with the reason on stderr.

    It asks the plaintext TACTFUL_HEALTH_PORT when set, else the gRPC port, over TLS when
    TACTFUL_TLS_CERT_FILE is set: trusting that very certificate (the probe checks it talks to
    this server, not who signed it), under a name the certificate carries (it need not name
    127.0.0.1). With mutual TLS the probe has no client certificate to show: it needs
    TACTFUL_HEALTH_PORT. Imports only gRPC and its health stubs: it runs every few seconds."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server, security = settings.server, settings.security
    host = _local_address(server.host)
    port = server.health_port or server.grpc_port
    target = f"{host}:{port}"
    if server.health_port or not security.tls_cert_file:
        channel = grpc.insecure_channel(target)
    elif security.tls_client_ca_file:
        print(
            "tactful healthcheck: with mutual TLS (TACTFUL_TLS_CLIENT_CA_FILE) a probe has no "
            "client certificate: set TACTFUL_HEALTH_PORT, the plaintext health port",
            file=sys.stderr,
        )
        return 1
    else:
        try:
            with open(security.tls_cert_file, "rb") as file:
                certificate = file.read()
        except OSError as exc:
            print(f"tactful healthcheck: TACTFUL_TLS_CERT_FILE: {exc}", file=sys.stderr)
            return 1
        name = _certificate_name(security.tls_cert_file, host)
        options = [("grpc.ssl_target_name_override", name)] if name else []
        credentials = grpc.ssl_channel_credentials(root_certificates=certificate)
        channel = grpc.secure_channel(target, credentials, options=options)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError as error:
            print(f"tactful healthcheck: {target}: {error.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"tactful healthcheck: {target}: {status}", file=sys.stderr)
        return 1
    print(f"tactful healthcheck: {target}: {status}")
    return 0


def _local_address(host: str) -> str:
    """Where a probe on this host reaches a server bound to ``host`` (TACTFUL_GRPC_HOST)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _certificate_name(path: str, address: str) -> str | None:
    """A name the server certificate in ``path`` carries, for a probe that connects to
    ``address``: None when it names that address, or when it cannot be read (the handshake
    then fails with gRPC's reason). A wildcard name gets a label of its own."""
    import _ssl

    # The standard library's decoder of a PEM certificate file (the first certificate in
    # it: the server's own); private, but in every CPython since 2.7.
    decode = getattr(_ssl, "_test_decode_cert", None)
    try:
        info: dict[str, Any] = decode(path) if decode is not None else {}
    except (OSError, ValueError):
        return None
    alt_names = info.get("subjectAltName", ())
    addresses = [value for kind, value in alt_names if kind == "IP Address"]
    dns_names = [value for kind, value in alt_names if kind == "DNS"]
    if address in addresses:
        return None
    if dns_names:
        return str(dns_names[0]).replace("*", "healthcheck", 1)
    if addresses:
        return str(addresses[0])
    common_names = [v for rdn in info.get("subject", ()) for k, v in rdn if k == "commonName"]
    return str(common_names[0]) if common_names else None


def learn(settings: Settings) -> int:
    """A learner on its own (with TACTFUL_EMBEDDED_LEARNER=false on the servers). Its
    metrics (lag, backlog, rewards applied) are on TACTFUL_METRICS_PORT, as a server's are."""
    if not settings.redis.url:
        print("tactful learn: set TACTFUL_REDIS_URL to the servers' Redis", file=sys.stderr)
        return 2
    from prometheus_client import start_http_server

    stop = threading.Event()
    runtime.stop_on_signals(stop)
    learner = runtime.start_learner(settings, settings.redis.url, stop)  # its metrics first
    if settings.server.metrics_port:
        start_http_server(settings.server.metrics_port, addr=settings.server.host)
    runtime.wait_for_stop(stop)  # not learner.join(): a signal must reach the main thread
    learner.join(timeout=10)
    return 0


@contextlib.contextmanager
def _offline_redis(settings: Settings) -> Iterator[str]:
    """The Redis URL of an offline command: TACTFUL_REDIS_URL, else the embedded store of
    `make serve` (its socket if it is running, else started for the command's duration)."""
    from tactful.embedded_redis import EmbeddedRedis

    embedded = None
    url = settings.redis.url
    if not url:
        socket_path = EmbeddedRedis(settings.redis.data_dir).socket
        if socket_path.exists():
            url = f"unix://{socket_path}"
        else:
            embedded = EmbeddedRedis(settings.redis.data_dir).start()
            url = embedded.url
    try:
        yield url
    finally:
        if embedded is not None:
            embedded.stop()


def model_command(settings: Settings, args: argparse.Namespace) -> int:
    from tactful.store.model_store import ModelStore

    with _offline_redis(settings) as url:
        models = ModelStore(runtime.learner_client(settings, url))
        if args.action == "list":
            current, versions = models.versions()
            for version, published in versions:
                mark = "*" if version == current else " "
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(published))
                print(f"{mark} {version:>8}  {when} UTC")
            print(f"serving: {current or 'prior'}")
        elif args.action == "rollback":
            try:
                models.rollback(args.version)
            except KeyError:
                print(f"tactful model: no snapshot of version {args.version}", file=sys.stderr)
                return 1
            print(f"serving version {args.version}; new versions held until `tactful model unpin`")
        else:
            models.unpin()
            print("unpinned: the learner publishes new versions again")
    return 0


def _timestamp(text: str) -> float:
    """An ISO 8601 time (UTC unless it says otherwise) as epoch seconds."""
    when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def report_command(settings: Settings, args: argparse.Namespace) -> int:
    """`tactful report` and `tactful export`: read the decision log of a time range."""
    from pathlib import Path

    from tactful import report

    since = _timestamp(args.since) if args.since else 0.0
    until = _timestamp(args.until) if args.until else time.time() + 1
    with _offline_redis(settings) as url:
        records = report.read_log(runtime.learner_client(settings, url), since, until)
    if args.command == "report":
        path = report.write(records, since, until, Path(args.out), max(0, args.segments))
        print(f"{len(records)} decisions: {path}")
    else:
        n = report.export(records, Path(args.out))
        print(f"{n} single-slot personalised decisions of {len(records)}: {args.out}")
    return 0


def import_command(settings: Settings, args: argparse.Namespace) -> int:
    """`tactful import FILE`: 0 when every line was imported, 1 when some were bad (each
    reported on stderr with its line number; the others were imported), 2 when the file or
    the store could not be used."""
    from tactful import bulk

    if args.batch < 1:
        print("tactful import: --batch must be at least 1", file=sys.stderr)
        return 2
    source: Any = contextlib.nullcontext(sys.stdin.buffer)
    try:
        if args.file != "-":
            source = open(args.file, "rb")  # noqa: SIM115 (closed by the with below)
    except OSError as exc:
        print(f"tactful import: {exc}", file=sys.stderr)
        return 2
    progress = bulk.Progress(sys.stderr, enabled=bulk.show_progress(args.quiet), what="lines")
    try:
        with source as lines, _offline_redis(settings) as url:
            summary = bulk.import_lines(
                runtime.bulk_store(settings, url),
                lines,
                bad_line=bulk.report_to(sys.stderr, progress),
                batch=args.batch,
                progress=progress,
            )
    except bulk.STORE_ERRORS as exc:
        progress.clear()
        print(f"tactful import: store unavailable: {exc}", file=sys.stderr)
        return 2
    progress.clear()
    parts = [
        f"{summary.imported:,} profiles imported of {summary.lines:,} lines "
        f"in {summary.seconds:.1f} s ({summary.rate:,.0f} profiles/s)"
    ]
    if summary.bad:
        parts.append(f"{summary.bad:,} bad lines skipped")
    if summary.signals_not_kept:
        parts.append(f"signals of {summary.signals_not_kept:,} users not kept (no consent)")
    print("tactful import: " + "; ".join(parts), file=sys.stderr)
    return 1 if summary.bad else 0


def export_profiles_command(settings: Settings, args: argparse.Namespace) -> int:
    """`tactful export --profiles FILE`: every profile in the import's format."""
    from tactful import bulk

    if args.since or args.until:
        print("tactful export: --since/--until select decisions, not profiles", file=sys.stderr)
        return 2
    target: Any = contextlib.nullcontext(sys.stdout)
    try:
        if args.profiles != "-":
            target = open(args.profiles, "w", encoding="utf-8")  # noqa: SIM115 (the with below)
    except OSError as exc:
        print(f"tactful export: {exc}", file=sys.stderr)
        return 2
    progress = bulk.Progress(sys.stderr, enabled=bulk.show_progress(False), what="profiles")
    try:
        with target as out, _offline_redis(settings) as url:
            summary = bulk.export_profiles(
                runtime.bulk_store(settings, url), out, progress=progress
            )
    except bulk.STORE_ERRORS as exc:
        progress.clear()
        print(f"tactful export: store unavailable: {exc}", file=sys.stderr)
        return 2
    message = f"tactful export: {summary.written:,} profiles: {args.profiles}"
    if summary.without_user_id:
        message += (
            f"; {summary.without_user_id:,} profiles last written before user ids were kept "
            "were left out (any write through the API or an import makes them exportable)"
        )
    print(message, file=sys.stderr)
    return 0


#: Shorter keys are refused by `tactful hash-key`: a fast hash of a guessable key is no secret.
MIN_KEY_LENGTH = 24


def key_command(args: argparse.Namespace) -> int:
    """`tactful new-key` prints a new random key and its settings entry; `tactful hash-key`
    the entry of a key given (read from the terminal or stdin when not an argument, so it
    stays out of shell history)."""
    try:
        roles = parse_roles(args.roles)
    except ValueError as exc:
        print(f"tactful {args.command}: --roles: {exc}", file=sys.stderr)
        return 2
    if args.command == "new-key":
        key = "tk_" + secrets.token_urlsafe(32)
        print(f"key (give it to the client; it is stored nowhere): {key}")
    else:
        key = args.key
        if key is None:
            key = getpass.getpass("key: ") if sys.stdin.isatty() else sys.stdin.readline()
        key = key.strip()
        if len(key) < MIN_KEY_LENGTH:
            print(
                f"tactful hash-key: a key needs at least {MIN_KEY_LENGTH} random characters; "
                "`tactful new-key` makes one",
                file=sys.stderr,
            )
            return 2
    print(f"TACTFUL_API_KEYS entry: {key_digest(key)}={'+'.join(roles)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "settings":
        print(settings_table())
        return 0
    if args.command in ("new-key", "hash-key"):
        return key_command(args)
    if args.command == "healthcheck":
        try:
            return healthcheck(Settings.from_env(), args.timeout)
        except SettingsError as exc:  # 1, not 2: a container engine reserves 2
            print(f"tactful healthcheck: {exc}", file=sys.stderr)
            return 1
    try:
        settings = Settings.from_env()
        logging.basicConfig(
            level=settings.server.log_level.upper(),
            format=runtime.PROCESS_LOG_FORMAT
            if args.command == "serve" and settings.server.workers > 1
            else runtime.LOG_FORMAT,
        )
        return _run(settings, args)
    except SettingsError as exc:
        print(f"tactful: {exc}", file=sys.stderr)
        return 2


def _run(settings: Settings, args: argparse.Namespace) -> int:
    """The commands that read the settings and log: every one but settings, the keys and
    healthcheck."""
    if args.command == "learn":
        return learn(settings)
    if args.command == "model":
        return model_command(settings, args)
    if args.command == "import":
        return import_command(settings, args)
    if args.command == "export" and args.profiles:
        return export_profiles_command(settings, args)
    if args.command in ("report", "export"):
        return report_command(settings, args)
    return serve(settings)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tactful", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the gRPC server (settings from TACTFUL_* variables)")
    sub.add_parser("learn", help="run a learner on its own against TACTFUL_REDIS_URL")
    model = sub.add_parser("model", help="list model versions, roll back, unpin")
    model_sub = model.add_subparsers(dest="action", required=True)
    model_sub.add_parser("list", help="model versions kept for rollback")
    rollback = model_sub.add_parser("rollback", help="serve an earlier version and pin it")
    rollback.add_argument("version", type=int)
    model_sub.add_parser("unpin", help="let the learner publish new versions again")
    sub.add_parser("settings", help="print the settings table (Markdown)")
    check = sub.add_parser(
        "healthcheck",
        help="exit 0 if the server on this host reports SERVING, else 1 (the container's "
        "HEALTHCHECK; TLS and TACTFUL_HEALTH_PORT as the server's settings say)",
    )
    check.add_argument(
        "--timeout", type=float, default=2.0, help="seconds to wait for the answer (default 2)"
    )
    new_key = sub.add_parser("new-key", help="make a random API key and its settings entry")
    hash_key = sub.add_parser("hash-key", help="the TACTFUL_API_KEYS entry of an existing key")
    hash_key.add_argument("key", nargs="?", help="the key (default: read from stdin)")
    for command in (new_key, hash_key):
        command.add_argument(
            "--roles", required=True, help="decide, profile and/or admin, e.g. decide+profile"
        )
    _add_log_commands(sub)
    importer = sub.add_parser(
        "import", help="load profiles from JSON lines (attributes, preferences, consent, signals)"
    )
    importer.add_argument("file", metavar="FILE", help="one profile per line ('-': stdin)")
    importer.add_argument("--quiet", action="store_true", help="no progress line")
    importer.add_argument(
        "--batch", type=int, default=500, help="users per pipelined round trip (default 500)"
    )
    return parser


def _add_log_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`tactful report` and `tactful export`: both read the decision log of a time range
    (export writes profiles instead with --profiles)."""
    for name, help_text, out in (
        (
            "report",
            "ROI report of the decision log (Markdown and HTML, PNG plots with matplotlib)",
            "DIR",
        ),
        (
            "export",
            "the decision log as Vowpal Wabbit DSJson (--cb_adf --dsjson), "
            "or with --profiles every profile as JSON lines (the import's format)",
            "FILE",
        ),
    ):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--since", help="ISO 8601 time, UTC unless given (default: all)")
        command.add_argument("--until", help="ISO 8601 time, exclusive (default: now)")
        target = command.add_mutually_exclusive_group(required=True) if name == "export" else None
        (target or command).add_argument("--out", required=target is None, metavar=out)
        if target is not None:
            target.add_argument(
                "--profiles", metavar="FILE", help="write profiles, not decisions ('-': stdout)"
            )
        if name == "report":
            command.add_argument(
                "--segments",
                type=int,
                default=20,
                metavar="N",
                help="segments with a row of their own, largest first; the rest share one "
                "(default: 20)",
            )


if __name__ == "__main__":
    sys.exit(main())
