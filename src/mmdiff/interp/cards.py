"""Compact feature cards: what the report's feature browser shows of each feature's top examples.

The interp stage writes interp/cards.json beside the dashboards (`write_cards`). The HTML dashboards
inline every example's full-size heatmap (about 1 MB a feature); a card keeps what a reader needs to
judge the feature and fits inside the report:

    {"cards": [{"id": "L3/F5", "layer": 3, "feature": 5,
                "image_share": 0.94,                      # activation mass on image tokens
                "promoted": [["left", 1.2], ...],          # top W_U d_f tokens and logits
                "examples": [{"record": "r7", "source": "spatial", "max": 2.31,
                              "question": "...",          # the record's question, when known
                              "tokens": [["the", 0.0, "t"], ["<image x576>", 2.31, "i"], ...],
                              "heatmap": "iVBOR..."},     # base64 PNG thumbnail, top examples only
                             ...]}, ...]}

Token kinds: "t" text, "i" a run of image tokens collapsed to one piece (its maximum activation;
the heatmap shows where), "s" special. Activations are rounded to 3 significant digits; examples are
ordered by their maximum activation; at most `MAX_EXAMPLES` per card, heatmaps on the first
`MAX_HEATMAPS` only, downscaled to `THUMB_SIDE` pixels and palette-quantised.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmdiff.models.base import TokenType

CARDS_FILE = "cards.json"
MAX_EXAMPLES = 6
MAX_HEATMAPS = 2
THUMB_SIDE = 150


def _round(x: float) -> float:
    x = float(x)
    return 0.0 if x == 0 or not math.isfinite(x) else float(f"{x:.3g}")


def thumbnail(png: bytes, side: int = THUMB_SIDE) -> str:
    """A PNG shrunk to `side` pixels on its longer side, 64 colours, as base64 (no data: prefix)."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side))
        small = im.quantize(colors=64)
    buf = io.BytesIO()
    small.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def example_tokens(tokens: Sequence[str], acts: Sequence[float], types: Sequence[int]) -> list[list[Any]]:
    """[[text, activation, kind], ...]: image-token runs collapse to one piece with their maximum."""
    out: list[list[Any]] = []
    i = 0
    while i < len(tokens):
        if types[i] == TokenType.IMAGE:
            j = i
            while j < len(types) and types[j] == TokenType.IMAGE:
                j += 1
            out.append([f"<image x{j - i}>", _round(max(acts[i:j])), "i"])
            i = j
            continue
        out.append([str(tokens[i]), _round(acts[i]), "s" if types[i] == TokenType.SPECIAL else "t"])
        i += 1
    return out


def card_record(card: Any) -> dict[str, Any]:
    """The JSON card of one `interp.dashboard.FeatureCard`."""
    ev = card.evidence
    out: dict[str, Any] = {"id": card.feature_id, "layer": int(card.layer), "feature": int(card.feature)}
    if ev is None:
        return {**out, "examples": []}
    examples = []
    for i, ex in enumerate(sorted(ev.examples, key=lambda e: (-e.max_activation, e.record_id))[:MAX_EXAMPLES]):
        record = card.records.get(ex.record_id)
        item: dict[str, Any] = {
            "record": ex.record_id,
            "source": ex.source,
            "max": _round(ex.max_activation),
            "tokens": example_tokens(ex.tokens, ex.activations, ex.types()),
        }
        question = getattr(record, "question", None)
        if question:
            item["question"] = str(question)
        if ex.heatmap_png and i < MAX_HEATMAPS:
            item["heatmap"] = thumbnail(ex.heatmap_png)
        examples.append(item)
    out.update(
        image_share=_round(ev.image_token_share()),
        promoted=[[str(t), _round(v)] for t, v in ev.promoted_tokens[:8]],
        examples=examples,
    )
    return out


def write_cards(cards: Sequence[Any], path: str | Path) -> Path:
    """interp/cards.json: one compact card per feature (module docstring), written atomically."""
    from mmdiff.atomic import write_json

    path = Path(path)
    write_json(path, {"cards": [card_record(c) for c in cards]})
    return path


def read_cards(path: str | Path) -> dict[str, dict[str, Any]]:
    """The cards of interp/cards.json by feature id; {} when the file is missing."""
    import json

    path = Path(path)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {str(c["id"]): c for c in data.get("cards", [])}
