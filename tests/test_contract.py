"""The API contract: enum numbers shared by the domain and the protos, and the names
clients are written against."""

from __future__ import annotations

import enum

import pytest

from tactful import domain
from tactful.v1 import catalog_pb2, decisioning_pb2, profiles_pb2


@pytest.mark.parametrize(
    ("domain", "proto", "prefix"),
    [
        (domain.ReasonCode, decisioning_pb2.ReasonCode, "REASON_CODE_"),
        (domain.HoldReason, decisioning_pb2.HoldReason, "HOLD_REASON_"),
        (domain.Arm, decisioning_pb2.Arm, "ARM_"),
        (domain.OutcomeEvent, decisioning_pb2.OutcomeEvent, "OUTCOME_EVENT_"),
        (domain.Stance, profiles_pb2.Stance, "STANCE_"),
        (domain.AttributeSource, profiles_pb2.AttributeSource, "ATTRIBUTE_SOURCE_"),
    ],
)
def test_domain_enums_mirror_the_protos(domain: type[enum.IntEnum], proto, prefix: str):
    wire = {name.removeprefix(prefix): number for name, number in proto.items()}
    wire.pop("UNSPECIFIED")
    ours = {member.name: member.value for member in domain if member.value != 0}
    assert ours == wire


def test_service_and_method_names():
    methods = {
        service.full_name: sorted(m.name for m in service.methods)
        for module in (decisioning_pb2, profiles_pb2, catalog_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
    }
    assert methods == {
        "tactful.v1.Decisioning": ["Decide", "ReportOutcome"],
        "tactful.v1.Profiles": [
            "DeleteProfile",
            "GetProfile",
            "RecordSignals",
            "SetAttributes",
            "SetPreferences",
        ],
        "tactful.v1.Catalog": [
            "DeleteOffer",
            "DeleteSegment",
            "GetOffer",
            "GetSegment",
            "ListOffers",
            "ListSegments",
            "PutOffer",
            "PutSegment",
        ],
    }


def test_field_numbers_are_stable():
    """Fields may be added; the ones clients use keep their names and numbers."""
    fields = {f.name: f.number for f in decisioning_pb2.DecideRequest.DESCRIPTOR.fields}
    assert (
        fields.items()
        >= {
            "user_id": 1,
            "channel": 2,
            "placement": 3,
            "numeric_context": 4,
            "categorical_context": 5,
            "candidate_offer_ids": 6,
            "slots": 7,
            "dry_run": 8,
            "request_id": 9,
        }.items()
    )
    response = {f.name: f.number for f in decisioning_pb2.DecideResponse.DESCRIPTOR.fields}
    assert (
        response.items()
        >= {
            "decision_id": 1,
            "choices": 2,
            "hold_reason": 3,
            "model_version": 4,
            "arm": 5,
        }.items()
    )
    profile = {f.name: f.number for f in profiles_pb2.Profile.DESCRIPTOR.fields}
    assert (
        profile.items()
        >= {
            "user_id": 1,
            "topic_preferences": 2,
            "channel_preferences": 3,
            "max_messages_per_day": 4,
            "quiet_hours": 5,
            "consent": 6,
            "signals": 7,
            "contact_counters": 8,
            "cooldowns": 9,
            "attributes": 10,
        }.items()
    )
    attributes = {f.name: f.number for f in profiles_pb2.SetAttributesRequest.DESCRIPTOR.fields}
    assert attributes == {"user_id": 1, "attributes": 2, "source": 3}
    offer = {f.name: f.number for f in catalog_pb2.Offer.DESCRIPTOR.fields}
    assert offer == {
        "offer_id": 1,
        "title": 2,
        "topics": 3,
        "channels": 4,
        "priority": 5,
        "sensitive": 6,
        "start_time": 7,
        "end_time": 8,
        "max_per_user_per_day": 9,
        "segments": 10,
        "excluded_segments": 11,
    }
    segment = {f.name: f.number for f in catalog_pb2.Segment.DESCRIPTOR.fields}
    assert segment == {"segment_id": 1, "rule": 2, "sensitive": 3, "description": 4}
    assert {f.name: f.number for f in catalog_pb2.PutSegmentRequest.DESCRIPTOR.fields} == {
        "segment": 1
    }
    for request in (catalog_pb2.GetSegmentRequest, catalog_pb2.DeleteSegmentRequest):
        assert {f.name: f.number for f in request.DESCRIPTOR.fields} == {"segment_id": 1}
    listing = {f.name: f.number for f in catalog_pb2.ListSegmentsRequest.DESCRIPTOR.fields}
    assert listing == {"page_size": 1, "page_token": 2}
    listed = {f.name: f.number for f in catalog_pb2.ListSegmentsResponse.DESCRIPTOR.fields}
    assert listed == {"segments": 1, "next_page_token": 2}
    assert decisioning_pb2.REASON_CODE_SEGMENT == 7
