"""The decision-log export (``dsjson_lines``).

The same single-slot decisions, one Vowpal Wabbit DSJson line each for ``--cb_adf
--dsjson``: the context in ``c``, one ``_multi`` entry per candidate, ``_label_cost`` =
-reward, ``_label_probability`` = the propensity, ``a`` / ``p`` the 1-based action ids
(logged first) and their probabilities (only the logged one is known; the rest are 0
placeholders, which VW's CB learning does not use).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tactful.report.log import Record
from tactful.report.ope import single_slot


def _token(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def dsjson_lines(records: Iterable[Record]) -> Iterator[str]:
    """One DSJson line per single-slot personalised decision (see the module doc)."""
    data, _ = single_slot(records)
    for d in data:
        assert d.record is not None
        payload = d.record.payload
        shared: dict[str, Any] = {
            "ctx": {
                "channel": _token(str(payload.get("channel", ""))),
                "placement": _token(str(payload.get("placement", ""))),
                **{
                    _token(str(k)): _token(str(v))
                    for k, v in dict(payload.get("categorical_context", {})).items()
                },
            },
        }
        numeric = {
            _token(str(k)): float(v) for k, v in dict(payload.get("numeric_context", {})).items()
        }
        if numeric:
            shared["num"] = numeric
        actions = [
            {
                "offer": {"id": _token(offer_id)},
                "ev": {"priority": d.priorities[i], "liked": float(d.liked[i])},
            }
            for i, offer_id in enumerate(d.candidates)
        ]
        order = [d.action, *(i for i in range(len(d.candidates)) if i != d.action)]
        line = {
            "_label_cost": -d.reward,
            "_label_probability": d.propensity,
            "_label_Action": d.action + 1,
            "_labelIndex": d.action,
            "Timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(d.record.ts)),
            "Version": "1",
            "EventId": str(payload.get("decision_id", "")),
            "a": [i + 1 for i in order],
            "c": {**shared, "_multi": actions},
            "p": [d.propensity, *([0.0] * (len(order) - 1))],
            "VWState": {"m": str(payload.get("model_version", ""))},
        }
        yield json.dumps(line, separators=(",", ":"))


def export(records: Sequence[Record], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w") as f:
        for line in dsjson_lines(records):
            f.write(line + "\n")
            n += 1
    return n
