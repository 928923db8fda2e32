"""What a message may repeat of a value the user wrote: never a credential, never a huge
value whole.

A secret key pasted into the wrong field (a prompt, a URI, an image name) must not reach
``dreambooth validate``'s output, the operator's Events or a job's status. The shapes below
are the ones people paste by mistake; the same regex sources serve the models' rule against
credentials in prompts (:mod:`dreambooth.api.rules`) and its CEL twin (:mod:`dreambooth.api.crd`).
"""

from __future__ import annotations

import re
from typing import Any

#: (what it is, regex source searched for); RE2 and Python alike
SECRET_SHAPES: tuple[tuple[str, str], ...] = (
    ("an AWS access key id", r"(AKIA|ASIA)[0-9A-Z]{16}"),
    ("an AWS secret access key", r"(^|[^A-Za-z0-9/+=])[A-Za-z0-9/+]{40}($|[^A-Za-z0-9/+=])"),
    ("a Hugging Face token", r"hf_[A-Za-z0-9]{30,}"),
    ("a GitHub token", r"gh[pousr]_[A-Za-z0-9]{36,}"),
    ("a private key", r"-----BEGIN [A-Z ]*PRIVATE KEY"),
    ("credentials in a URL", r"[A-Za-z][-A-Za-z0-9+.]*:/+[^/@ ]*:[^/@ ]*@"),
)
#: one regex for all of them, for CEL's ``matches``
SECRET_PATTERN = "|".join(f"({source})" for _, source in SECRET_SHAPES)
_SHAPES = [(what, re.compile(source)) for what, source in SECRET_SHAPES]
SHOWN_MAX = 60


def secret_shape(text: str) -> str | None:
    """What kind of credential ``text`` seems to hold, or None."""
    return next((what for what, regex in _SHAPES if regex.search(text)), None)


def shown(value: Any, limit: int = SHOWN_MAX) -> str:
    """``value`` quoted for a message: a credential-looking one is not shown at all, a long
    one by its start and its length."""
    if isinstance(value, str) and secret_shape(value):
        return f"a value that looks like {secret_shape(value)} (not shown)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
