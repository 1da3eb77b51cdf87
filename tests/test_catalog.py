"""Catalog: put, get, paging, delete, on a real redis-server."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tactful.v1 import catalog_pb2 as c

from conftest import offer


def test_put_then_get_round_trips_every_field(catalog):
    full = offer(
        "spring-sale",
        ("running", "outdoor"),
        title="Spring sale",
        channels=["web", "push"],
        priority=0.75,
        sensitive=True,
        start_time=Timestamp(seconds=1_800_000_000, nanos=500_000_000),
        end_time=Timestamp(seconds=1_900_000_000),
        max_per_user_per_day=2,
    )
    assert catalog.PutOffer(c.PutOfferRequest(offer=full)) == full
    assert catalog.GetOffer(c.GetOfferRequest(offer_id="spring-sale")) == full
    replaced = offer("spring-sale", ("running",), priority=0.1)
    catalog.PutOffer(c.PutOfferRequest(offer=replaced))
    assert catalog.GetOffer(c.GetOfferRequest(offer_id="spring-sale")) == replaced


def test_list_offers_pages_through_everything_once(catalog):
    for i in range(25):
        catalog.PutOffer(c.PutOfferRequest(offer=offer(f"offer-{i:02d}")))
    seen, token, pages = [], "", 0
    while True:
        page = catalog.ListOffers(c.ListOffersRequest(page_size=10, page_token=token))
        seen += [o.offer_id for o in page.offers]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == [f"offer-{i:02d}" for i in range(25)]
    default = catalog.ListOffers(c.ListOffersRequest())
    assert len(default.offers) == 25 and default.next_page_token == ""


def test_delete_offer(catalog):
    catalog.PutOffer(c.PutOfferRequest(offer=offer("gone")))
    catalog.DeleteOffer(c.DeleteOfferRequest(offer_id="gone"))
    with pytest.raises(grpc.RpcError) as err:
        catalog.GetOffer(c.GetOfferRequest(offer_id="gone"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        catalog.DeleteOffer(c.DeleteOfferRequest(offer_id="gone"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
