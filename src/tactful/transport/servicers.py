"""gRPC servicers: convert, call the core, convert back, nothing else. The services' names and
their registration on a server are here too, so that one module knows what tactful serves."""

from __future__ import annotations

import grpc

from tactful.catalog_service import CatalogService
from tactful.decider import Decider
from tactful.profile_service import ProfileService
from tactful.transport import converters as conv
from tactful.v1 import (
    catalog_pb2,
    catalog_pb2_grpc,
    decisioning_pb2,
    decisioning_pb2_grpc,
    profiles_pb2,
    profiles_pb2_grpc,
)

SERVICE_NAMES = (
    decisioning_pb2.DESCRIPTOR.services_by_name["Decisioning"].full_name,
    profiles_pb2.DESCRIPTOR.services_by_name["Profiles"].full_name,
    catalog_pb2.DESCRIPTOR.services_by_name["Catalog"].full_name,
)
#: Every method of the three services, as gRPC names them (``/tactful.v1.Catalog/PutOffer``).
METHODS = tuple(
    f"/{service.full_name}/{method.name}"
    for module in (decisioning_pb2, profiles_pb2, catalog_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
)


class DecisioningServicer(decisioning_pb2_grpc.DecisioningServicer):
    def __init__(self, decider: Decider) -> None:
        self._decider = decider

    def Decide(
        self, request: decisioning_pb2.DecideRequest, context: grpc.ServicerContext
    ) -> decisioning_pb2.DecideResponse:
        def wanted() -> bool:
            remaining = context.time_remaining()
            return context.is_active() and (remaining is None or remaining > 0)

        decision = self._decider.decide(conv.decide_request(request), wanted=wanted)
        return conv.decide_response(decision)

    def ReportOutcome(
        self, request: decisioning_pb2.ReportOutcomeRequest, context: grpc.ServicerContext
    ) -> decisioning_pb2.ReportOutcomeResponse:
        recorded = self._decider.record_outcome(conv.outcome_report(request))
        return decisioning_pb2.ReportOutcomeResponse(recorded=recorded)


class ProfilesServicer(profiles_pb2_grpc.ProfilesServicer):
    def __init__(self, profiles: ProfileService) -> None:
        self._profiles = profiles

    def SetPreferences(
        self, request: profiles_pb2.SetPreferencesRequest, context: grpc.ServicerContext
    ) -> profiles_pb2.Profile:
        return conv.profile(self._profiles.set_preferences(conv.preferences_update(request)))

    def SetAttributes(
        self, request: profiles_pb2.SetAttributesRequest, context: grpc.ServicerContext
    ) -> profiles_pb2.Profile:
        return conv.profile(self._profiles.set_attributes(conv.attributes_update(request)))

    def RecordSignals(
        self, request: profiles_pb2.RecordSignalsRequest, context: grpc.ServicerContext
    ) -> profiles_pb2.RecordSignalsResponse:
        stored = self._profiles.record_signals(request.user_id, conv.signals(list(request.signals)))
        return profiles_pb2.RecordSignalsResponse(stored=stored)

    def GetProfile(
        self, request: profiles_pb2.GetProfileRequest, context: grpc.ServicerContext
    ) -> profiles_pb2.Profile:
        return conv.profile(self._profiles.get_profile(request.user_id))

    def DeleteProfile(
        self, request: profiles_pb2.DeleteProfileRequest, context: grpc.ServicerContext
    ) -> profiles_pb2.DeleteProfileResponse:
        self._profiles.delete_profile(request.user_id)
        return profiles_pb2.DeleteProfileResponse()


class CatalogServicer(catalog_pb2_grpc.CatalogServicer):
    def __init__(self, catalog: CatalogService) -> None:
        self._catalog = catalog

    def PutOffer(
        self, request: catalog_pb2.PutOfferRequest, context: grpc.ServicerContext
    ) -> catalog_pb2.Offer:
        return conv.offer_to_proto(self._catalog.put_offer(conv.offer_from_proto(request.offer)))

    def GetOffer(
        self, request: catalog_pb2.GetOfferRequest, context: grpc.ServicerContext
    ) -> catalog_pb2.Offer:
        return conv.offer_to_proto(self._catalog.get_offer(request.offer_id))

    def ListOffers(
        self, request: catalog_pb2.ListOffersRequest, context: grpc.ServicerContext
    ) -> catalog_pb2.ListOffersResponse:
        offers, token = self._catalog.list_offers(request.page_size, request.page_token)
        return catalog_pb2.ListOffersResponse(
            offers=[conv.offer_to_proto(o) for o in offers], next_page_token=token
        )

    def DeleteOffer(
        self, request: catalog_pb2.DeleteOfferRequest, context: grpc.ServicerContext
    ) -> catalog_pb2.DeleteOfferResponse:
        self._catalog.delete_offer(request.offer_id)
        return catalog_pb2.DeleteOfferResponse()

    def PutSegment(
        self, request: catalog_pb2.PutSegmentRequest, context: grpc.ServicerContext
    ) -> catalog_pb2.Segment:
        segment = self._catalog.put_segment(conv.segment_from_proto(request.segment))
        return conv.segment_to_proto(segment)

    def GetSegment(
        self, request: catalog_pb2.GetSegmentRequest, context: grpc.ServicerContext
    ) -> catalog_pb2.Segment:
        return conv.segment_to_proto(self._catalog.get_segment(request.segment_id))

    def ListSegments(
        self, request: catalog_pb2.ListSegmentsRequest, context: grpc.ServicerContext
    ) -> catalog_pb2.ListSegmentsResponse:
        segments, token = self._catalog.list_segments(request.page_size, request.page_token)
        return catalog_pb2.ListSegmentsResponse(
            segments=[conv.segment_to_proto(s) for s in segments], next_page_token=token
        )

    def DeleteSegment(
        self, request: catalog_pb2.DeleteSegmentRequest, context: grpc.ServicerContext
    ) -> catalog_pb2.DeleteSegmentResponse:
        self._catalog.delete_segment(request.segment_id)
        return catalog_pb2.DeleteSegmentResponse()


def add_servicers(
    server: grpc.Server, decider: Decider, profiles: ProfileService, catalog: CatalogService
) -> None:
    """The three services, on ``server``."""
    decisioning_pb2_grpc.add_DecisioningServicer_to_server(DecisioningServicer(decider), server)
    profiles_pb2_grpc.add_ProfilesServicer_to_server(ProfilesServicer(profiles), server)
    catalog_pb2_grpc.add_CatalogServicer_to_server(CatalogServicer(catalog), server)
