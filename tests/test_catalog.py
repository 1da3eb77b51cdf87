"""Catalog: put, get, paging, delete, on a real redis-server and
on a Redis Cluster; the in-process catalog cache."""

from __future__ import annotations

import time

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tactful.caches import CatalogCache
from tactful.domain import Offer, Segment
from tactful.v1 import catalog_pb2 as c

from conftest import offer

pytestmark = pytest.mark.both_stores


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


class VersionedCatalog:
    """Just the part of a Store the catalog cache reads, counting its reloads."""

    def __init__(self) -> None:
        self.version, self.offers, self.loads = 1, [Offer("a", "A", ("t",), ("web",))], 0

    def load_catalog(self) -> tuple[int, list[Offer], list[Segment]]:
        self.loads += 1
        return self.version, list(self.offers), []


def test_a_read_older_than_the_last_reload_does_not_reload_the_catalog():
    """A burst of requests in flight while the catalog changed must not each reload it."""
    store = VersionedCatalog()
    cache = CatalogCache(store)
    assert set(cache.offers(1, read_at=time.monotonic())) == {"a"}
    in_flight = time.monotonic()  # these requests read version 1...
    store.version, store.offers = 2, [*store.offers, Offer("b", "B", ("t",), ("web",))]
    assert set(cache.offers(2, read_at=time.monotonic())) == {"a", "b"}  # ...then one read 2
    for _ in range(3):
        assert set(cache.offers(1, read_at=in_flight)) == {"a", "b"}
    assert store.loads == 2


def test_the_catalog_version_going_back_after_a_flush_reloads():
    store = VersionedCatalog()
    store.version = 250
    cache = CatalogCache(store)
    cache.offers(250, read_at=time.monotonic())
    store.version, store.offers = 1, [Offer("new", "N", ("t",), ("web",))]  # FLUSHALL, a put
    assert set(cache.offers(1, read_at=time.monotonic())) == {"new"}
    assert store.loads == 2
