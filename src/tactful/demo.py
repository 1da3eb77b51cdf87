"""A small demo catalog, loaded by `make serve` when the store holds no offers."""

from __future__ import annotations

from tactful.domain import Offer

DEMO_OFFERS = (
    Offer("running-shoes", "New trail running shoes", ("running",), ("web", "app", "email"), 0.6),
    Offer(
        "marathon-plan",
        "Free 16-week marathon plan",
        ("running", "training"),
        ("web", "app", "email", "push"),
        0.4,
    ),
    Offer("yoga-mat", "Eco yoga mat, 20% off", ("yoga",), ("web", "app"), 0.5),
    Offer("bike-service", "Spring bike service", ("cycling",), ("web", "app", "sms"), 0.3),
    Offer("recipes", "High-protein recipes", ("nutrition",), ("web", "app", "email"), 0.35),
    Offer("city-break", "City breaks for two", ("travel",), ("web", "email"), 0.45),
    Offer(
        "loyalty",
        "Join the loyalty club",
        ("membership",),
        ("web", "app", "email", "push", "sms"),
        0.7,
    ),
    Offer(
        "savings-account",
        "A savings account with 3% interest",
        ("finance",),
        ("web", "email"),
        0.8,
        sensitive=True,
    ),
)
