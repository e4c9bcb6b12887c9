"""The record type every loader yields and every stage consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from PIL import Image

from mmdiff.errors import DataError

ImageRef = Union[Image.Image, str, Path, None]


@dataclass
class Record:
    """One (image, question) example with its answers, caption and task tags.

    `image` is a PIL image (generated data), a path loaded lazily (on-disk datasets), or None
    (text-only). `caption` stands in for the image when the base LM is run (docs/method.md#activations-and-token-types).
    `tasks` are tags such as "spatial", "ocr", "safety", "vqa", "yesno", "colour".
    """

    id: str
    question: str
    answers: list[str] = field(default_factory=list)
    image: ImageRef = None
    caption: str | None = None
    tasks: tuple[str, ...] = ()
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def load_image(self) -> Image.Image:
        """The record's image as RGB; a clear error when it has none or the file is unreadable."""
        if self.image is None:
            raise DataError(f"record {self.id!r} ({self.source or 'unknown source'}) has no image")
        if isinstance(self.image, Image.Image):
            return self.image.convert("RGB")
        path = Path(self.image)
        if not path.is_file():
            raise DataError(
                f"record {self.id!r}: image file {path} does not exist; check the dataset's image root"
            )
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except OSError as exc:
            raise DataError(f"record {self.id!r}: cannot read image {path}: {exc}") from exc

    def require_caption(self) -> str:
        if not self.caption:
            raise DataError(
                f"record {self.id!r} ({self.source}) has no caption, and the base-LM run needs one "
                "in place of the image: give the dataset a caption source or run the caption pre-pass"
            )
        return self.caption
