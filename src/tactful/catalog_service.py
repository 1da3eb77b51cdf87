"""The catalog's API: offers and segments (rules parsed and checked here), listed in pages
from the in-process catalog."""

from __future__ import annotations

import base64
import binascii
import re
import time
from dataclasses import replace

from tactful import segments as segment_rules
from tactful import validation
from tactful.caches import CatalogCache
from tactful.domain import Offer, Segment
from tactful.errors import FieldViolation, NotFound
from tactful.settings import SegmentSettings
from tactful.store import Store


class CatalogService:
    DEFAULT_PAGE_SIZE = 100

    def __init__(
        self, store: Store, catalog: CatalogCache, segments: SegmentSettings | None = None
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._segments = segments or SegmentSettings()
        self._limits = segment_rules.RuleLimits(
            max_length=self._segments.max_rule_length,
            max_depth=self._segments.max_rule_depth,
            max_nodes=self._segments.max_rule_nodes,
        )

    def put_offer(self, offer: Offer) -> Offer:
        validation.require(validation.check_offer(offer))
        self._store.put_offer(offer=offer)
        return offer

    def get_offer(self, offer_id: str) -> Offer:
        validation.require(validation.check_offer_id(offer_id))
        offer = self._store.get_offer(offer_id=offer_id)
        if offer is None:
            raise NotFound(f"offer {offer_id!r} not found")
        return offer

    def delete_offer(self, offer_id: str) -> None:
        validation.require(validation.check_offer_id(offer_id))
        if not self._store.delete_offer(offer_id=offer_id):
            raise NotFound(f"offer {offer_id!r} not found")

    def list_offers(self, page_size: int, page_token: str) -> tuple[list[Offer], str]:
        after = _page_start(page_size, page_token, validation.OFFER_ID_RE, "ListOffers")
        read_at = time.monotonic()
        offers = self._catalog.offers(self._store.catalog_version(), read_at=read_at)
        ordered = sorted((o for o in offers.values() if o.offer_id > after), key=_offer_key)
        page = ordered[: page_size or self.DEFAULT_PAGE_SIZE]
        more = len(ordered) > len(page)
        return page, _page_token(page[-1].offer_id) if more else ""

    def put_segment(self, segment: Segment) -> Segment:
        """Parse and check the rule (limits from settings; a sensitive segment may read only
        what the customer stated), store it in canonical form and return it as stored."""
        violations = validation.check_segment(segment)
        canonical = segment.rule
        if segment.rule.strip():
            try:
                rule = segment_rules.parse(segment.rule, self._limits)
                if segment.sensitive:
                    segment_rules.check_sensitive(rule)
                canonical = segment_rules.unparse(rule)
            except segment_rules.RuleError as exc:
                violations.append(
                    FieldViolation("segment.rule", f"{exc.message} at position {exc.position}")
                )
        validation.require(violations)
        stored = replace(segment, rule=canonical)
        self._store.put_segment(segment=stored, limit=self._segments.max_segments)
        return stored

    def get_segment(self, segment_id: str) -> Segment:
        validation.require(validation.check_segment_id(segment_id))
        segment = self._store.get_segment(segment_id=segment_id)
        if segment is None:
            raise NotFound(f"segment {segment_id!r} not found")
        return segment

    def delete_segment(self, segment_id: str) -> None:
        """Refused (FailedPrecondition, naming them) while offers name the segment."""
        validation.require(validation.check_segment_id(segment_id))
        if not self._store.delete_segment(segment_id=segment_id):
            raise NotFound(f"segment {segment_id!r} not found")

    def list_segments(self, page_size: int, page_token: str) -> tuple[list[Segment], str]:
        after = _page_start(page_size, page_token, validation.SEGMENT_ID_RE, "ListSegments")
        read_at = time.monotonic()
        book = self._catalog.snapshot(self._store.catalog_version(), read_at=read_at).segments
        ordered = [c.segment for segment_id, c in book.by_id.items() if segment_id > after]
        page = ordered[: page_size or self.DEFAULT_PAGE_SIZE]
        more = len(ordered) > len(page)
        return page, _page_token(page[-1].segment_id) if more else ""

    def is_empty(self) -> bool:
        return not self._catalog.refresh()


def _offer_key(offer: Offer) -> str:
    return offer.offer_id


def _page_start(page_size: int, page_token: str, ids: re.Pattern[str], rpc: str) -> str:
    """The id a page starts after (AIP-158 paging: the token is the last id, encoded)."""
    violations = validation.check_page(page_size)
    after = ""
    if page_token:
        try:
            after = base64.b64decode(page_token, altchars=b"-_", validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            after = ""
        if not ids.fullmatch(after):
            violations.append(FieldViolation("page_token", f"is not a token {rpc} gave"))
    validation.require(violations)
    return after


def _page_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode()
