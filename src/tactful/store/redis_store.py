"""The store on Redis (``RedisStore``): the ``Store`` the core depends on.

The hot path touches Redis at most twice per Decide: ``read_for_decision`` (profile, signals,
contact counters, cooldowns, attributes, catalog and model versions, request-id replay: one
pipelined round trip) and ``log_decision`` (decision log, contact counters, request id: one
more). Writes that touch several keys of a user run in MULTI/EXEC or in one Lua script, so
they are all or nothing.

The same code runs on one Redis server or on a Redis Cluster (``wire.connect``): every script
and every MULTI/EXEC touches one hash tag, so one slot (``keys``); only non-transactional
pipelines span slots, and ``wire.round_trip`` picks how the Decide path sends them.
"""

from __future__ import annotations

from tactful.breaker import CircuitBreaker
from tactful.settings import Settings
from tactful.store.catalog import CatalogOperations
from tactful.store.decisions import DecisionOperations
from tactful.store.profiles import ProfileOperations
from tactful.store.wire import Client


class RedisStore(DecisionOperations, ProfileOperations, CatalogOperations):
    """The store on Redis, put together from its kinds of operations (``decisions``,
    ``profiles``, ``catalog``), which all run through ``RedisBase._run``: behind the circuit
    breaker, within their budget, retried while it lasts if they may be sent again, and
    ``Unavailable`` when Redis cannot be reached."""

    @classmethod
    def for_settings(
        cls,
        client: Client,
        settings: Settings,
        *,
        breaker: bool = True,
        write_budget_seconds: float | None = None,
    ) -> RedisStore:
        """The store as the settings describe it; ``breaker=False`` for tools that want to
        see every error (bulk commands), not a circuit that opened, and may wait longer
        (``write_budget_seconds``)."""
        redis_settings = settings.redis
        return cls(
            client,
            signal_half_life_seconds=settings.policy.signal_half_life_hours * 3600,
            decision_ttl_seconds=settings.policy.decision_ttl_seconds,
            request_id_ttl_seconds=settings.policy.request_id_ttl_seconds,
            breaker=CircuitBreaker(
                failure_rate=redis_settings.breaker_failure_rate,
                min_calls=redis_settings.breaker_min_calls,
                window_seconds=redis_settings.breaker_window_seconds,
                open_seconds=redis_settings.breaker_open_seconds,
            )
            if breaker
            else None,
            render_budget_seconds=redis_settings.socket_timeout_ms / 1000,
            render_budget_max_seconds=redis_settings.render_timeout_max_ms / 1000,
            write_budget_seconds=write_budget_seconds or redis_settings.write_timeout_ms / 1000,
        )

    def ping(self) -> bool:
        return self._run("ping", lambda: bool(self.client.ping()), budget=self.write)

    # --- rate limits ----------------------------------------------------------------------

    def take_token(self, *, bucket: str, rate: float, burst: float) -> float:
        """Take a token from ``bucket``: 0.0 if taken, else the seconds to wait for one."""
        # On the render budget (it delays every call), and not retried: a second attempt
        # could take a second token.
        wait = self._run(
            "rate_limit",
            lambda: self._take_token(keys=[bucket], args=[rate, burst]),
            budget=self.render,
            idempotent=False,
        )
        return float(wait)
