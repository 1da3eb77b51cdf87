"""How the bandit explores and learns, and how its models are published."""

from __future__ import annotations

from dataclasses import dataclass

from tactful.settings.fields import setting


@dataclass(frozen=True)
class LearningSettings:
    exploration_gamma: float = setting(
        "TACTFUL_EXPLORATION_GAMMA",
        200.0,
        "Least inverse-gap-weighting gamma: higher explores less (0 = uniform among eligible "
        "offers).",
        min=0.0,
    )
    exploration_gamma_scale: float = setting(
        "TACTFUL_EXPLORATION_GAMMA_SCALE",
        50.0,
        "Gamma grows as scale x sqrt(rewards learned) once that passes the least gamma, so "
        "exploration narrows as evidence grows (0: fixed gamma).",
        min=0.0,
    )
    exploration_share: float = setting(
        "TACTFUL_EXPLORATION_SHARE",
        0.1,
        "Most probability with which a slot explores (picks an offer the model scores below "
        "its best): gamma is raised for that Decide where the gaps between offers are small "
        "or the offers many (1 = no limit). Exploration picks are counted in `tactful report`.",
        min=0.0,
        max=1.0,
    )
    exploration_bonus: float = setting(
        "TACTFUL_EXPLORATION_BONUS",
        0.4,
        "Optimism added to each offer's predicted reward before inverse gap weighting: this "
        "times the model's uncertainty about the offer, sqrt(sum of x_i^2 / p_i) over its "
        "features (p_i: ridge prior in the feature's unit plus the sum of its squared values "
        "learned; the explicit-like and inferred-interest features are left out), so offers "
        "the model knows little about are tried sooner (0: no bonus).",
        min=0.0,
    )
    kappa: float = setting(
        "TACTFUL_EXPLICIT_KAPPA",
        1.0,
        "The learned explicit-like weight is kept >= kappa x the inferred-interest weight.",
        min=1.0,
    )
    l2: float = setting(
        "TACTFUL_RIDGE_L2",
        1.0,
        "Ridge prior strength (how many sightings it takes to move a weight away from the "
        "fixed rule), in a feature's own unit where its values are below 1.",
        min=1e-6,
    )
    memory: float = setting(
        "TACTFUL_LEARNING_MEMORY",
        0.0,
        "How many sightings of a feature the learner remembers: each new one makes the "
        "evidence before it count (1 - 1/memory) times less, so the model keeps adapting "
        "when tastes change, at some cost in steady quality (0 = remember everything).",
        min=0.0,
    )
    drift_threshold: float = setting(
        "TACTFUL_DRIFT_THRESHOLD",
        4.0,
        "How many standard errors (of its own residual noise) the recent mean residual of an "
        "offer or topic must stray from zero before the learner takes its rewards to have "
        "changed, keeps only 3 sightings' worth of what it learned of it and explores more "
        "again; twice as many, for the mean residual of the whole model, before it starts "
        "the model again from the prior (0 = never).",
        min=0.0,
    )
    hashed_bits: int = setting(
        "TACTFUL_FEATURE_HASH_BITS",
        18,
        "2^bits buckets for hashed features (the learner's cost does not grow with them; "
        "a published model stores only the features learned).",
        min=4,
        max=24,
    )
    feature_set: str = setting(
        "TACTFUL_FEATURE_SET",
        "shared+offer",
        "Hashed features: shared+offer (topic x context, plus a bias per offer), shared "
        "(topic x context only) or offer (offer x context, nothing shared between offers). "
        "bench/policy_quality.py --feature-sets compares them.",
        choices=("shared+offer", "shared", "offer"),
    )
    reward_window_seconds: float = setting(
        "TACTFUL_REWARD_WINDOW_SECONDS",
        600.0,
        "An offer with no outcome this long after its decision is learned with reward 0.",
        min=1.0,
    )
    publish_interval_ms: float = setting(
        "TACTFUL_MODEL_PUBLISH_INTERVAL_MS",
        50.0,
        "At most one new model version per this interval.",
        min=0.0,
    )
    checkpoint_interval_seconds: float = setting(
        "TACTFUL_LEARNER_CHECKPOINT_SECONDS",
        1.0,
        "How often the learner saves its state and acknowledges what it applied.",
        min=0.0,
    )
    keep_versions: int = setting(
        "TACTFUL_MODEL_KEEP_VERSIONS", 20, "Model versions kept for rollback.", min=1
    )
    embedded_learner: bool = setting(
        "TACTFUL_EMBEDDED_LEARNER",
        True,
        "Run the learner inside `tactful serve` (a thread; with TACTFUL_WORKERS > 1, one "
        "process beside the workers). False: run `tactful learn`.",
    )
    seed: int = setting(
        "TACTFUL_SEED", -1, "Seed of the exploration RNG (-1: from the OS).", min=-1
    )
