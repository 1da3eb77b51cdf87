"""Fuzzing, through real stubs on a real redis-server: for every unary RPC of the tactful
services, hypothesis-generated requests built from the message descriptors (every field type,
extreme numbers, unknown enum values, long and odd text) and raw bytes (random, or a valid
request cut short or spliced) get OK, INVALID_ARGUMENT or NOT_FOUND (or FAILED_PRECONDITION
where the catalog's state refuses a segment write), never UNKNOWN or INTERNAL,
and the server still answers afterwards.

Requests are sent in batches of concurrent calls, one batch per hypothesis example, so the
default 10,000 requests per RPC (``FUZZ_EXAMPLES_PER_RPC``) take a few minutes, not ten. The
server runs in a process of its own and answers one batch while the next is generated, and a
helper process generates and sends half of each method's requests (with a seed of its own, so
its examples are not the same as this process's)."""

from __future__ import annotations

import math
import multiprocessing
import os
import string
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc
import hypothesis
import pytest
from google.protobuf import descriptor, message, message_factory
from google.protobuf.descriptor import FieldDescriptor as F
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc.error_details_pb2 import BadRequest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_process import server_process

from tactful import validation
from tactful.settings import ServerSettings
from tactful.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    decisioning_pb2,
    decisioning_pb2_grpc,
    profiles_pb2,
    profiles_pb2_grpc,
)

from conftest import make_settings, offer, redis_url

# --- Any protobuf message, from its descriptor ----------------------------------------------

INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1),
    F.TYPE_SINT32: (-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1),
    F.TYPE_SINT64: (-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1),
    F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1),
    F.TYPE_FIXED64: (0, 2**64 - 1),
}
# The numbers limits are made of, each side of them, and the ends of every integer type.
EDGE_INTS = sorted(
    {n + d for n in (0, 1, 10, 23, 24, 64, 100, 128, 256, 1000, 10**6) for d in (-1, 0, 1)}
    | {-(2**31), 2**31 - 1, 2**31, 2**32 - 1, -(2**63), 2**63 - 1, 2**63, 2**64 - 1}
)
EDGE_FLOATS = [
    0.0, -0.0, 1.0, -1.0, 0.5, 1e3, 1e3 + 1e-9, -1e3, 1e6, 1e6 * (1 + 1e-15), 1e7,
    1e300, -1e300, 1.7976931348623157e308, -1.7976931348623157e308, 5e-324, -5e-324,
    math.nan, -math.nan, math.inf, -math.inf,
]  # fmt: skip
# Timestamps: now, either side of a window of minutes or days, and the ends of the valid range.
EDGE_SECONDS = [
    0,
    -1,
    validation.MIN_TIMESTAMP - 1,
    validation.MIN_TIMESTAMP,
    validation.MAX_TIMESTAMP,
    validation.MAX_TIMESTAMP + 1,
    2**63 - 1,
    -(2**63),
]
EDGE_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\t\n",
    "é",
    "😀",
    "\u202e",
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    "{",
    "}",
    "{u:x}",
    "*",
    "!",
    ":",
    "..",
    "../../etc/passwd",
    "%s%n",
    "null",
    "-1",
    "NaN",
    "_w==",
    "AAAA",
    *("x" * n for n in (31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257)),
    *("é" * n for n in (64, 65, 128, 129)),
    "😀" * 65,
]

MAX_DEPTH = 4  # Struct and Value nest each other without end


def _ints(field_type: int) -> st.SearchStrategy[int]:
    lo, hi = INT_RANGES[field_type]
    return st.one_of(
        st.integers(max(lo, -3), 30),
        st.sampled_from([n for n in EDGE_INTS if lo <= n <= hi]),
        st.integers(lo, hi),
    )


def _floats(width: int) -> st.SearchStrategy[float]:
    edges = EDGE_FLOATS if width == 64 else [0.0, -0.0, 3.4028234663852886e38, math.nan, math.inf]
    return st.one_of(
        st.sampled_from(edges),
        st.floats(0, 10, width=width),
        st.floats(width=width),
    )


LONG = [129, 257, 1_000, 5_000, 70_000]


def _long(alphabet: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Very long text without drawing every character: a short piece, repeated."""
    return st.builds(lambda piece, n: ((piece or "x") * n)[:n], alphabet, st.sampled_from(LONG))


TEXT = st.text(st.characters(codec="utf-8"), max_size=12)  # no lone surrogates: not UTF-8
ID_TEXT = st.text(string.ascii_letters + string.digits + "._:-", min_size=1, max_size=12)


def _strings(hint: Sequence[str], pool: Sequence[str]) -> st.SearchStrategy[str]:
    """Mostly values that pass validation (so deeper code runs), then the edges of it."""
    likely = [st.sampled_from(hint)] * 3 if hint else []
    return st.one_of(
        *likely,
        st.sampled_from(pool),
        st.sampled_from(EDGE_STRINGS),
        ID_TEXT,
        TEXT,
        _long(TEXT),
    )


BYTES = st.one_of(
    st.binary(max_size=16),
    st.builds(lambda b, n: ((b or b"\x00") * n)[:n], st.binary(max_size=4), st.sampled_from(LONG)),
)


def _timestamp(cls: type[message.Message], *, wild: bool) -> st.SearchStrategy[message.Message]:
    now = int(time.time())
    recent = st.integers(now - 86_400 * 30, now + 86_400 * 30)
    if not wild:
        return st.builds(cls, seconds=recent, nanos=st.integers(0, 999_999_999))
    seconds = st.one_of(
        recent,
        st.sampled_from([now, now + 299, now + 301, *EDGE_SECONDS]),
        st.integers(-(2**63), 2**63 - 1),
    )
    nanos = st.one_of(
        st.just(0), st.integers(0, 999_999_999), st.sampled_from([-1, 10**9, -(2**31), 2**31 - 1])
    )
    return st.builds(cls, seconds=seconds, nanos=nanos)


class Messages:
    """Strategies for every message type, built from descriptors: any field type, maps,
    repeated fields, oneofs, nested messages, Timestamps, unknown enum numbers.

    A message is drawn wild (anything the wire format allows), tame (every field a value
    that would pass the usual checks: ``hints`` maps a field name to such values, ids that
    exist, names that validate) or tame with one field wild, so that validation is passed
    often enough for the code behind it to run, and each check is met alone."""

    def __init__(self, hints: Mapping[str, Sequence[str]]) -> None:
        self.hints = hints
        self.pool = sorted({value for values in hints.values() for value in values})
        self._built: dict[tuple[str, int, bool], st.SearchStrategy[Any]] = {}

    def of(self, desc: descriptor.Descriptor) -> st.SearchStrategy[Any]:
        wild, tame = self._of(desc, 0, wild=True), self._of(desc, 0, wild=False)
        fields = [(f, self._field(f, 0, wild=True)) for f in desc.fields]
        if not fields:
            return tame

        @st.composite
        def spliced(draw: Callable[..., Any]) -> message.Message:
            msg = draw(tame)
            field, values = draw(st.sampled_from(fields))
            msg.ClearField(field.name)
            if values is not None:
                _set(msg, field, draw(values))
            return msg

        return st.one_of(wild, tame, spliced(), spliced())

    def _of(self, desc: descriptor.Descriptor, depth: int, *, wild: bool) -> Any:
        key = (desc.full_name, depth, wild)
        if key not in self._built:
            self._built[key] = self._message(desc, depth, wild=wild)
        return self._built[key]

    def _message(self, desc: descriptor.Descriptor, depth: int, *, wild: bool) -> Any:
        cls = message_factory.GetMessageClass(desc)
        if desc.full_name in (Timestamp.DESCRIPTOR.full_name, Duration.DESCRIPTOR.full_name):
            return _timestamp(cls, wild=wild)
        fields = [(f, self._field(f, depth, wild=wild)) for f in desc.fields]
        oneofs = list(desc.oneofs)
        # Whether a field is set: a fair coin when wild, mostly when tame.
        present = st.booleans() if wild else st.integers(0, 4).map(bool)

        @st.composite
        def build(draw: Callable[..., Any]) -> message.Message:
            msg = cls()
            # One member of each oneof (a proto3 `optional` is a oneof of one), or none.
            chosen = {o.full_name: draw(st.sampled_from([None, *o.fields])) for o in oneofs}
            for field, values in fields:
                oneof = field.containing_oneof
                if oneof is not None and chosen[oneof.full_name] is not field:
                    continue
                if values is None or (oneof is None and not draw(present)):
                    continue
                _set(msg, field, draw(values))
            return msg

        return build()

    def _field(self, field: F, depth: int, *, wild: bool) -> st.SearchStrategy[Any] | None:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field, value_field = field.message_type.fields
            keys = self._single(key_field, depth, wild=wild)
            values = self._single(value_field, depth, wild=wild)
            if keys is None or values is None:
                return None
            entries = st.tuples(keys, values)
            if not wild:
                return st.lists(entries, max_size=3)
            return _repeated(entries, bulk=key_field.type == F.TYPE_STRING)
        single = self._single(field, depth, wild=wild)
        if single is None or not field.is_repeated:
            return single
        if not wild:
            return st.lists(single, max_size=3, unique=field.message_type is None)
        return _repeated(single, bulk=False)

    def _single(self, field: F, depth: int, *, wild: bool) -> st.SearchStrategy[Any] | None:
        kind = field.type
        if kind in (F.TYPE_MESSAGE, F.TYPE_GROUP):
            if depth >= MAX_DEPTH:
                return None
            return self._of(field.message_type, depth + 1, wild=wild)
        if kind == F.TYPE_BOOL:
            return st.booleans()
        hint = self.hints.get(field.name, ())
        if not wild:  # small, finite, non-negative, known: what most checks want
            if kind == F.TYPE_STRING:
                return st.sampled_from(hint) if hint else ID_TEXT
            if kind == F.TYPE_BYTES:
                return st.binary(max_size=8)
            if kind in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
                return st.floats(0, 10)
            if kind == F.TYPE_ENUM:
                numbers = [v.number for v in field.enum_type.values]
                return st.sampled_from([n for n in numbers if n] or numbers)
            return st.integers(0, 10)
        if kind == F.TYPE_STRING:
            return _strings(hint, self.pool)
        if kind == F.TYPE_BYTES:
            return BYTES
        if kind == F.TYPE_DOUBLE:
            return _floats(64)
        if kind == F.TYPE_FLOAT:
            return _floats(32)
        if kind == F.TYPE_ENUM:
            known = st.sampled_from([v.number for v in field.enum_type.values])
            if field.enum_type.is_closed:
                return known
            return st.one_of(known, known, st.integers(-(2**31), 2**31 - 1))
        return _ints(kind)


def _repeated(element: st.SearchStrategy[Any], *, bulk: bool) -> st.SearchStrategy[list[Any]]:
    """Mostly a few elements; sometimes hundreds (by repeating a few, numbered when they are
    map entries with text keys), to cross the limits on counts."""
    few = st.lists(element, max_size=4)
    if not bulk:
        many = st.builds(
            lambda xs, n: [_short(x) for x in (xs * n)[:n]] if xs else [],
            few,
            st.sampled_from([64, 65, 257, 1001]),
        )
    else:
        many = st.builds(
            lambda xs, n: [(f"{_short(k)}{i}", _short(v)) for i in range(n) for k, v in xs[:1]],
            few,
            st.sampled_from([63, 64, 65, 300]),
        )
    return st.one_of(few, few, few, many)


def _short(value: Any) -> Any:
    """Hundreds of very long strings would only test the message size limit: cut them."""
    if isinstance(value, message.Message) and value.ByteSize() > 300:
        return type(value)()
    return value[:300] if isinstance(value, str | bytes) else value


def _set(msg: message.Message, field: F, value: Any) -> None:
    target = getattr(msg, field.name) if field.is_repeated else None
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        for key, item in value:
            if isinstance(item, message.Message):
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif field.is_repeated:
        target.extend(value)
    elif isinstance(value, message.Message):
        getattr(msg, field.name).CopyFrom(value)
    else:
        setattr(msg, field.name, value)


# --- Raw bytes -------------------------------------------------------------------------------


def _mutate(data: bytes, how: str, at: int, junk: bytes, other: bytes) -> bytes:
    at = at % (len(data) + 1)
    return {
        "random": junk,
        "cut": data[:at],
        "insert": data[:at] + junk + data[at:],
        "overwrite": data[:at] + junk + data[at + len(junk) :],
        "append": data + junk,
        "twice": data + other,  # two messages back to back merge into one: valid
        "varint": data + b"\xff" * 11,  # a varint that never ends
        "huge-length": data + b"\x0a\xff\xff\xff\xff\x0f",  # field 1, 4 GiB long
    }[how]


RAW_OPS = st.tuples(
    st.sampled_from(
        ["random", "cut", "insert", "overwrite", "append", "twice", "varint", "huge-length"]
    ),
    st.integers(0, 2**16),
    st.binary(max_size=24),
)

# --- The services under test ------------------------------------------------------------------

SERVICES = [
    service
    for module in (decisioning_pb2, profiles_pb2, catalog_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
]
UNARY = [
    pytest.param(method, id=f"{service.name}.{method.name}")
    for service in SERVICES
    for method in service.methods
    if not method.client_streaming and not method.server_streaming
]

# Structured requests per RPC (issue 7 asks for 10,000); a quarter as many raw payloads go with
# them. All ten RPCs take about three minutes of CPU on a 2-core machine, half of it in the
# calls, a third in generating the requests (both in this one Python process).
# Not TACTFUL_*: tactful refuses unknown TACTFUL_ variables, and test servers read the environment.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES_PER_RPC", "10000"))
BATCH = 16  # structured requests sent at once, per hypothesis example
RAW_BATCH = 4  # raw payloads sent with them, each a mutation of one of the requests
TIMEOUT = 30
# The server's limit on a received message (TACTFUL_GRPC_MAX_RECEIVE_MESSAGE_BYTES): past it
# gRPC answers RESOURCE_EXHAUSTED before tactful sees the request.
MAX_RECEIVE_BYTES = ServerSettings().max_receive_message_bytes
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
# Well-formed requests the catalog's state refuses: deleting a segment offers name, or a new
# segment past TACTFUL_MAX_SEGMENTS.
STATEFUL = {
    "DeleteSegment": {grpc.StatusCode.FAILED_PRECONDITION},
    "PutSegment": {grpc.StatusCode.FAILED_PRECONDITION},
}

USERS = ["alice", "bob", "carol", "dave"]
CHANNELS = ["web", "app", "email", "push", "sms"]
TOPICS = ["general", "running", "finance", "travel", "sensitive-health"]
SEGMENTS = {
    "fr": 'attr.country == "FR"',
    "runners": 'stated.persona == "runner" or likes("running")',
    "big-cart": "ctx.cart between 10 and 1000",
    "kids": 'stated.age_band == "under_18"',
}
RULES = [
    *SEGMENTS.values(),
    'inferred("finance") > 0.5 and not dislikes("finance")',
    'has(ctx.device) and (channel in ["web", "app"] or ctx["utm-source"] == "x")',
    "attr.country == ",
    'likes("a") or likes("b") and likes("c")',
]
OFFERS = [
    offer("o1", ("running",), priority=1.0, segments=["runners", "fr"]),
    offer("o2", ("finance",), priority=0.8, channels=["web", "email", "push"]),
    offer("o3", ("travel", "general"), max_per_user_per_day=1, excluded_segments=["kids"]),
    offer("o4", ("sensitive-health",), sensitive=True),
    offer("o5", ("general",), channels=["sms", "push"], priority=2.0),
    offer("later", ("general",), start_time=Timestamp(seconds=int(time.time()) + 86_400)),
]


@pytest.fixture
def served(redisdb: Any, redis_proc: Any) -> Iterator[tuple[int, grpc.Channel]]:
    """The fuzzed server runs in a process of its own: generating the requests keeps this
    one busy, and an in-process server would wait for the GIL (half the test's time)."""
    with (
        server_process(redis_url(redis_proc), make_settings()) as port,
        grpc.insecure_channel(f"127.0.0.1:{port}") as ch,
    ):
        yield port, ch


def _seed(channel: grpc.Channel) -> dict[str, list[str]]:
    """A small catalog, a few profiles and decisions; returns the ids worth fuzzing with."""
    catalog = catalog_pb2_grpc.CatalogStub(channel)
    profiles = profiles_pb2_grpc.ProfilesStub(channel)
    decisioning = decisioning_pb2_grpc.DecisioningStub(channel)
    for segment_id, rule in SEGMENTS.items():
        segment = catalog_pb2.Segment(segment_id=segment_id, rule=rule)
        catalog.PutSegment(catalog_pb2.PutSegmentRequest(segment=segment), timeout=TIMEOUT)
    for o in OFFERS:
        catalog.PutOffer(catalog_pb2.PutOfferRequest(offer=o), timeout=TIMEOUT)
    profiles.SetPreferences(
        profiles_pb2.SetPreferencesRequest(
            user_id="alice",
            topic_preferences=[profiles_pb2.TopicPreference(topic="running", stance=1)],
            consent=profiles_pb2.Consent(inferred_personalization=True),
        ),
        timeout=TIMEOUT,
    )
    profiles.SetPreferences(
        profiles_pb2.SetPreferencesRequest(
            user_id="bob",
            channel_preferences=[profiles_pb2.ChannelPreference(channel="email", opted_in=False)],
            quiet_hours=profiles_pb2.QuietHours(start_hour=0, end_hour=23, time_zone="UTC"),
            max_messages_per_day=2,
        ),
        timeout=TIMEOUT,
    )
    profiles.RecordSignals(
        profiles_pb2.RecordSignalsRequest(
            user_id="alice", signals=[profiles_pb2.Signal(topic="finance", weight=2.0)]
        ),
        timeout=TIMEOUT,
    )
    decisions = [
        decisioning.Decide(
            decisioning_pb2.DecideRequest(user_id=user, channel=ch, slots=3), timeout=TIMEOUT
        )
        for user in ("alice", "carol")
        for ch in ("web", "push")
    ]
    tokens = [
        catalog.ListOffers(catalog_pb2.ListOffersRequest(page_size=n), timeout=TIMEOUT)
        for n in (1, 2)
    ]
    ids = [o.offer_id for o in OFFERS]
    return {
        "user_id": USERS,
        "channel": CHANNELS,
        "channels": CHANNELS,
        "topic": TOPICS,
        "topics": TOPICS,
        "offer_id": ids,
        "candidate_offer_ids": ids,
        "decision_id": [d.decision_id for d in decisions],
        "outcome_id": ["out-1", "out-2"],
        "request_id": ["req-1", "req-2"],
        "page_token": [t.next_page_token for t in tokens],
        "time_zone": ["UTC", "Europe/Paris", "America/St_Johns", "Etc/GMT+12", "Mars/Olympus"],
        "placement": ["home_hero", "footer"],
        "title": ["A title", "Offer"],
        "key": ["cart", "session", "device", "country"],  # map keys of the context
        "value": ["mobile", "desktop", "fr"],
        "segment_id": [*SEGMENTS, "unused"],
        "segments": list(SEGMENTS),
        "excluded_segments": list(SEGMENTS),
        "rule": RULES,
        "description": ["", "people in France"],
    }


def _code(future: Any) -> grpc.StatusCode:
    try:
        future.result()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def _check(
    method: descriptor.MethodDescriptor, sent: list[tuple[bytes, Any]], seen: dict[str, int]
) -> None:
    """Every answer allowed; OK ones parse as the method's response type, INVALID_ARGUMENT
    ones carry google.rpc.BadRequest details."""
    output = message_factory.GetMessageClass(method.output_type)
    bad = []
    for payload, future in sent:
        code = _code(future)
        seen[code.name] = seen.get(code.name, 0) + 1
        allowed = ALLOWED | STATEFUL.get(method.name, set())
        if len(payload) > MAX_RECEIVE_BYTES:
            allowed = allowed | {grpc.StatusCode.RESOURCE_EXHAUSTED}
        if code not in allowed:
            bad.append((code, future.details(), payload[:300]))
        elif code == grpc.StatusCode.OK and isinstance(future.result(), bytes):
            output.FromString(future.result())
        elif code == grpc.StatusCode.INVALID_ARGUMENT:
            status = rpc_status.from_call(future)
            if status is None or not status.details[0].Is(BadRequest.DESCRIPTOR):
                bad.append((code, "INVALID_ARGUMENT without BadRequest details", payload[:300]))
    assert not bad, f"{len(bad)} of {len(sent)} answers not allowed, e.g. {bad[:3]}"


def _alive(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", *(s.full_name for s in SERVICES)):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert status.status == health_pb2.HealthCheckResponse.SERVING, service
    decisioning = decisioning_pb2_grpc.DecisioningStub(channel)
    response = decisioning.Decide(
        decisioning_pb2.DecideRequest(user_id="after-fuzz", channel="web"), timeout=TIMEOUT
    )
    assert response.decision_id


def _method(full_name: str) -> descriptor.MethodDescriptor:
    service, name = full_name.rsplit(".", 1)
    return next(s for s in SERVICES if s.full_name == service).methods_by_name[name]


def _fuzz(
    port: int, full_name: str, ids: dict[str, list[str]], examples: int, seed: int | None
) -> tuple[dict[str, int], dict[str, int]]:
    """Send ``examples`` generated requests (and a quarter as many raw payloads) to one
    method; every answer checked. Returns the counts sent and the codes seen. ``seed``: draw
    other examples than an unseeded run does (the helper process's share)."""
    method = _method(full_name)
    path = f"/{method.containing_service.full_name}/{method.name}"
    request_type = message_factory.GetMessageClass(method.input_type)
    seen: dict[str, int] = {}
    counts = {"structured": 0, "raw": 0}
    pending: list[list[tuple[bytes, Any]]] = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        structured = channel.unary_unary(
            path,
            request_serializer=request_type.SerializeToString,
            response_deserializer=message_factory.GetMessageClass(method.output_type).FromString,
        )
        raw = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        requests = Messages(ids).of(method.input_type)

        @settings(
            max_examples=max(1, -(-examples // BATCH)),
            deadline=None,
            suppress_health_check=[
                HealthCheck.too_slow,
                HealthCheck.data_too_large,
                HealthCheck.large_base_example,
            ],
        )
        @given(
            st.lists(requests, min_size=BATCH, max_size=BATCH),
            st.lists(RAW_OPS, min_size=RAW_BATCH, max_size=RAW_BATCH),
        )
        def fuzz(batch: list[message.Message], ops: list[tuple[str, int, bytes]]) -> None:
            payloads = [m.SerializeToString() for m in batch]
            sent = [
                (p, structured.future(m, timeout=TIMEOUT))
                for p, m in zip(payloads, batch, strict=True)
            ]
            mutated = [
                _mutate(payloads[i], how, at, junk, payloads[i - 1])
                for i, (how, at, junk) in enumerate(ops)
            ]
            sent += [(p, raw.future(p, timeout=TIMEOUT)) for p in mutated]
            counts["structured"] += len(batch)
            counts["raw"] += len(mutated)
            # Check the previous batch while the server works on this one: generating and
            # serving overlap. A failure then names its own payload, though hypothesis may
            # blame the next example.
            if pending:
                _check(method, pending.pop(), seen)
            pending.append(sent)

        if seed is not None:
            fuzz = hypothesis.seed(seed)(fuzz)
        fuzz()
        if pending:
            _check(method, pending.pop(), seen)
    return counts, seen


@pytest.fixture(scope="module")
def helper() -> Iterator[Any]:
    """A second process that generates and sends half of each method's requests:
    generating them is what bounds the test, and the machine has two cores."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        yield pool


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", UNARY)
def test_fuzzed_requests_get_only_expected_codes(served, helper, method):
    port, channel = served
    path = f"/{method.containing_service.full_name}/{method.name}"
    ids = _seed(channel)
    theirs = EXAMPLES // 2 if EXAMPLES >= 2 * BATCH else 0
    started = time.perf_counter()
    other = helper.apply_async(_fuzz, (port, method.full_name, ids, theirs, 1)) if theirs else None
    counts, seen = _fuzz(port, method.full_name, ids, EXAMPLES - theirs, None)
    if other is not None:
        their_counts, their_seen = other.get(timeout=600)
        for name, n in their_counts.items():
            counts[name] += n
        for code, n in their_seen.items():
            seen[code] = seen.get(code, 0) + n
    elapsed = time.perf_counter() - started
    print(f"{path}: {counts} in {elapsed:.1f}s, codes {seen}")
    assert counts["structured"] >= EXAMPLES and counts["raw"] >= EXAMPLES * RAW_BATCH // BATCH
    if EXAMPLES >= 1000:  # the fuzzing's own power: requests do get past validation
        assert seen.get("OK", 0) + seen.get("NOT_FOUND", 0) >= EXAMPLES // 1000, seen
    _alive(channel)
