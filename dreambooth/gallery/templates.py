"""The page templates: HTML files in ``templates/``, filled with :class:`string.Template`.

``render(name, html={...}, **text)``: every ``text`` value is escaped; ``html`` values are
fragments this package built (and escaped) itself. A placeholder left unfilled is an error.
"""

from __future__ import annotations

from functools import cache
from html import escape
from importlib import resources
from string import Template


@cache
def template(name: str) -> Template:
    return Template(resources.files("dreambooth.gallery").joinpath("templates", name).read_text())


def render(template_name: str, /, html: dict[str, str] | None = None, **text: object) -> str:
    values = {k: escape(str(v)) for k, v in text.items()}
    values.update(html or {})
    return template(template_name).substitute(values)


def esc(value: object) -> str:
    return escape(str(value))
