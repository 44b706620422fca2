"""What a row's output must match (a JSON Schema, a regex or a Lark grammar), as plain text and a hash.

Light on purpose (no llguidance, no torch): settings and manifests use it; `engine.constraints`
compiles it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

GrammarKind = Literal["json_schema", "regex", "grammar"]
GRAMMAR_KINDS: tuple[str, ...] = ("json_schema", "regex", "grammar")


@dataclass(frozen=True)
class GrammarSpec:
    """What a row's output must match: `kind` is json_schema | regex | grammar, `text` its source."""

    kind: GrammarKind
    text: str

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise ValueError(
                f"unknown grammar kind {self.kind!r}; expected one of {', '.join(GRAMMAR_KINDS)}"
            )
        if not isinstance(self.text, str):
            raise ValueError(f"{self.kind} must be text, got {type(self.text).__name__}")

    @property
    def digest(self) -> str:
        """A stable hash (hex sha256) of kind and text; JSON schemas are hashed in compact form, so
        whitespace does not matter (key order does: it is the order the fields are generated in)."""
        text = self.text
        if self.kind == "json_schema":
            try:
                text = json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
            except ValueError:
                pass  # compiling reports it
        return hashlib.sha256(f"{self.kind}\0{text}".encode()).hexdigest()

    @property
    def flag(self) -> str:
        """The command-line flag that gives this kind."""
        return self.kind.replace("_", "-")

    def describe(self) -> str:
        """A short label for error messages: the kind and the start of the text."""
        head = " ".join(self.text.split())
        return f"{self.kind} {head[:40]!r}{'...' if len(head) > 40 else ''}"
