"""How fast ``tactful import`` loads profiles into a local redis-server, next to the API path
measured in the same run.

Generates ``--profiles`` typical lines into a temporary file (3 attributes, 2 topic stances,
1 channel opt-out, a daily limit, consent and 1 signal each), starts the bundled
redis-server (``EmbeddedRedis``: Unix socket, append-only file, as ``make serve`` runs it),
and imports the file as ``tactful import`` does (streamed, validated, pipelined in batches of
``--batch`` users). The baseline writes the same profiles for ``--baseline`` users the way
the API does, one user at a time through ``ProfileService`` (validation, then
SetPreferences, SetAttributes and RecordSignals: three round trips), without gRPC.

    .venv/bin/python bench/import_rate.py [--profiles 100000] [--batch 500] [--baseline 3000]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from tactful import bulk, runtime
from tactful.domain import (
    AttributeSource,
    AttributesUpdate,
    ChannelPreference,
    Consent,
    ObservedSignal,
    PreferencesUpdate,
    Stance,
    TopicPreference,
)
from tactful.embedded_redis import EmbeddedRedis
from tactful.profile_service import ProfileService
from tactful.settings import Settings
from tactful.store.redis_store import RedisStore

TOPICS = ["running", "yoga", "golf", "cooking", "travel", "finance", "music", "cycling"]
COUNTRIES = ["FR", "DE", "GB", "ES", "IT", "NL"]


def line(i: int, rng: random.Random, observed: str) -> dict[str, object]:
    liked, disliked, signal = rng.sample(TOPICS, 3)
    return {
        "user_id": f"user-{i}",
        "attributes": {
            "country": rng.choice(COUNTRIES),
            "language": "fr-FR",
            "tier": rng.choice(["gold", "silver", "bronze"]),
        },
        "topic_preferences": [
            {"topic": liked, "stance": "LIKE"},
            {"topic": disliked, "stance": "DISLIKE"},
        ],
        "channel_preferences": [{"channel": "sms", "opted_in": False}],
        "max_messages_per_day": 3,
        "consent": {"inferred_personalization": True},
        "signals": [
            {"topic": signal, "weight": round(rng.uniform(0.1, 5), 3), "observed_at": observed}
        ],
    }


def redis_seconds(store: RedisStore) -> float:
    """CPU seconds redis-server has used (user + system)."""
    info = store.client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def api_path(service: ProfileService, data: dict[str, object]) -> None:
    """One line written the way clients of the API write it: three calls."""
    user_id = str(data["user_id"])
    topics = data["topic_preferences"]
    assert isinstance(topics, list)
    service.set_preferences(
        PreferencesUpdate(
            user_id=user_id,
            topic_preferences=tuple(
                TopicPreference(t["topic"], Stance[t["stance"]]) for t in topics
            ),
            channel_preferences=(ChannelPreference("sms", False),),
            max_messages_per_day=3,
            consent=Consent(True),
        )
    )
    attributes = data["attributes"]
    assert isinstance(attributes, dict)
    service.set_attributes(
        AttributesUpdate(user_id, tuple(attributes.items()), AttributeSource.IMPORTED)
    )
    signals = data["signals"]
    assert isinstance(signals, list)
    service.record_signals(
        user_id, [ObservedSignal(s["topic"], s["weight"], time.time() - 60) for s in signals]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=bulk.DEFAULT_BATCH)
    parser.add_argument("--baseline", type=int, default=3000)
    args = parser.parse_args()
    settings = Settings.from_env({"TACTFUL_PSEUDONYM_KEY": "bench"})
    rng = random.Random(1)
    observed = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 3600))
    with tempfile.TemporaryDirectory(prefix="tactful-import-") as tmp:
        path = Path(tmp) / "profiles.jsonl"
        with path.open("w") as out:
            for i in range(args.profiles):
                out.write(json.dumps(line(i, rng, observed)) + "\n")
        size = path.stat().st_size
        print(
            f"{args.profiles:,} profiles, {size / 1e6:.1f} MB ({size / args.profiles:.0f} B/line)"
        )
        with EmbeddedRedis(Path(tmp) / "redis") as redis_server:
            store = runtime.bulk_store(settings, redis_server.url)  # as `tactful import`
            redis_cpu, cpu = redis_seconds(store), time.process_time()
            with path.open("rb") as lines:
                summary = bulk.import_lines(
                    store, lines, bad_line=bulk.report_to(sys.stderr), batch=args.batch
                )
            cpu, redis_cpu = time.process_time() - cpu, redis_seconds(store) - redis_cpu
            assert summary.imported == args.profiles, summary
            assert summary.signals_not_kept == 0, summary
            print(
                f"tactful import (batches of {args.batch}): {summary.imported:,} profiles in "
                f"{summary.seconds:.2f} s = {summary.rate:,.0f} profiles/s"
            )
            # CPU per profile tells what a busy machine's wall clock does not: the importer
            # (one Python process, GIL-bound) and redis-server each need a core of their own.
            per_profile = [seconds / summary.imported * 1e6 for seconds in (cpu, redis_cpu)]
            print(
                f"  CPU per profile: importer {per_profile[0]:.1f} us, redis-server "
                f"{per_profile[1]:.1f} us -> at most {1e6 / max(per_profile):,.0f} profiles/s "
                f"with a core each; load average now {os.getloadavg()[0]:.1f} on "
                f"{os.cpu_count()} CPUs"
            )
            store.client.flushall()
            service = ProfileService(store, settings)
            with path.open("rb") as lines:
                baseline = [json.loads(raw) for raw in itertools.islice(lines, args.baseline)]
            started = time.perf_counter()
            for data in baseline:
                api_path(service, data)
            seconds = time.perf_counter() - started
            print(
                f"API path (ProfileService, 3 round trips per user, no gRPC): {len(baseline):,} "
                f"profiles in {seconds:.2f} s = {len(baseline) / seconds:,.0f} profiles/s"
            )
            store.client.close()


if __name__ == "__main__":
    main()
