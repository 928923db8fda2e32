"""What a cross-field rule reports, and the shape of a rule."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dreambooth.api.spec import DreamBoothJobSpec


@dataclass(frozen=True)
class Violation:
    path: str
    message: str


#: Every rule gets (spec as written, effective spec). ``spec`` tells what the user set.
Rule = Callable[[DreamBoothJobSpec, DreamBoothJobSpec], Iterator[Violation]]
