"""Manifest files read as ``kubectl`` reads them, with bounds an attacker cannot push past.

kubectl turns YAML into JSON with go-yaml (v2 rules) before the API server sees it, so a
``DreamBoothJob`` file means here what it means there:

* **Plain scalars** resolve as go-yaml v2 resolves them: ``2e-6`` and ``.5`` are numbers
  (PyYAML's YAML 1.1 reads ``2e-6`` as a string), ``yes``/``no``/``on``/``off`` are booleans
  (the validation message then says to quote them), ``0x1F``/``0o17``/``017`` are integers,
  ``1_000`` is 1000, ``~``/``null`` and an empty value are null. A number too big for 64
  bits is refused. Floats with an integral value travel as integers, as Go's JSON writes
  them (``steps: 4e2`` is 400). Quoted scalars are strings; ``!!str``/``!!int``/``!!float``/
  ``!!bool``/``!!null`` tags are honoured, others refused.
* **Mappings**: duplicate keys are refused (kubectl's strict decoding refuses them; PyYAML
  lets the last one win); ``<<`` merge keys work; keys become strings as kubectl makes them.
* **Bounds** checked before anything is expanded: file size, nesting depth, the number of
  nodes with every alias expanded (a 1 KB "billion laughs" file stops at once), scalar
  length.
* **Bytes**: UTF-8 (a byte-order mark is fine); anything else is an error that says so.
* **Documents**: every document of a file is returned with its position; ``kind: List``
  items are unfolded. The callers report documents that are not DreamBoothJobs.

Every failure is a :class:`ManifestError` naming the file and, where it helps, the line.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from dreambooth.api.redact import secret_shape, shown

#: kubectl sends each document as one request; the API server takes at most 3 MiB
MAX_FILE_BYTES = 3 * 1024 * 1024
MAX_DEPTH = 64
#: nodes after expanding every alias (a DreamBoothJob has about a hundred)
MAX_NODES = 100_000
MAX_SCALAR_CHARS = 64 * 1024
INT64 = (-(2**63), 2**63 - 1)

PLAIN = "tag:dreambooth.io,2026:plain"
_T = "tag:yaml.org,2002:"
_NULL = {"", "~", "null", "Null", "NULL"}
_TRUE = {"y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"}
_FALSE = {"n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"}
_INF = {".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"}
_NAN = {".nan", ".NaN", ".NAN"}
_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_INT = re.compile(r"^[-+]?(0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|0[0-7]*|[1-9][0-9]*)$")
_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


class ManifestError(ValueError):
    """A file that cannot be read as a Kubernetes manifest; the message says why and where."""


@dataclass(frozen=True)
class Document:
    """One object of a manifest file: ``where`` names it for messages."""

    where: str  # e.g. "job.yaml, document 2"
    data: Any

    @property
    def kind(self) -> str | None:
        return self.data.get("kind") if isinstance(self.data, dict) else None

    @property
    def name(self) -> str:
        meta = self.data.get("metadata") if isinstance(self.data, dict) else None
        name = str(meta.get("name", "?")) if isinstance(meta, dict) else "?"
        return name if len(name) <= 63 and not secret_shape(name) else shown(name)


class _Resolver(yaml.resolver.BaseResolver):
    """Leaves every untagged plain scalar to :func:`_plain` (go-yaml v2's rules)."""

    def resolve(self, kind, value, implicit):
        if kind is ScalarNode and implicit[0]:
            return PLAIN
        return super().resolve(kind, value, implicit)


class _Loader(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, yaml.composer.Composer, _Resolver):
    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        _Resolver.__init__(self)


def _decode(raw: bytes, name: str) -> str:
    for bom, encoding in _BOMS.items():
        if raw.startswith(bom):
            raise ManifestError(f"{name} is {encoding}-encoded: save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ManifestError(
            f"{name}, line {line}: not UTF-8 (byte 0x{raw[err.start]:02x}): save the file as UTF-8"
        ) from None


def _line(node: Node) -> str:
    return f"line {node.start_mark.line + 1}"


class _Builder:
    """Python values from composed nodes, within the bounds, counting expanded nodes."""

    def __init__(self, name: str) -> None:
        self.name, self.nodes = name, 0

    def fail(self, node: Node, message: str) -> ManifestError:
        return ManifestError(f"{self.name}, {_line(node)}: {message}")

    def build(self, node: Node, depth: int = 0) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self.fail(
                node,
                f"more than {MAX_NODES} values once its aliases are expanded "
                "(an alias bomb?): a DreamBoothJob needs a few hundred",
            )
        if depth > MAX_DEPTH:
            raise self.fail(node, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, ScalarNode):
            return self.scalar(node)
        if node.tag not in (_T + "seq", _T + "map"):
            raise self.fail(node, f"the YAML tag {node.tag} is not allowed in a Kubernetes manifest")
        if isinstance(node, SequenceNode):
            return [self.build(item, depth + 1) for item in node.value]
        if isinstance(node, MappingNode):
            return self.mapping(node, depth)
        raise self.fail(node, f"unsupported YAML node {type(node).__name__}")

    def mapping(self, node: MappingNode, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        merged: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode) and key_node.tag in (PLAIN, _T + "merge") and key_node.value == "<<":
                for source in self._merge_sources(value_node, depth):
                    for k, v in source.items():
                        merged.setdefault(k, v)
                continue
            if not isinstance(key_node, ScalarNode):
                raise self.fail(key_node, "a mapping key must be a plain value, not a list or mapping")
            key = _key_text(self.scalar(key_node))
            if key in out:
                raise self.fail(
                    key_node,
                    f"duplicate key {key!r} (kubectl refuses it; with YAML "
                    "alone the last one would silently win): keep one",
                )
            out[key] = self.build(value_node, depth + 1)
        return {**{k: v for k, v in merged.items() if k not in out}, **out}

    def _merge_sources(self, node: Node, depth: int) -> list[dict[str, Any]]:
        value = self.build(node, depth + 1)
        sources = value if isinstance(value, list) else [value]
        if not all(isinstance(s, dict) for s in sources):
            raise self.fail(node, "a << merge key needs a mapping or a list of mappings")
        return sources

    def scalar(self, node: ScalarNode) -> Any:
        text, tag = node.value, node.tag
        if len(text) > MAX_SCALAR_CHARS:
            raise self.fail(node, f"a value of {len(text)} characters (at most {MAX_SCALAR_CHARS})")
        if tag == PLAIN:
            return self._number(node, _plain(text))
        if tag == _T + "str":
            return text
        if tag in (_T + "int", _T + "float", _T + "bool", _T + "null"):
            value = _plain(text)
            kind = {_T + "int": int, _T + "float": (int, float), _T + "bool": bool, _T + "null": type(None)}[tag]
            if isinstance(value, bool) != (tag == _T + "bool") or not isinstance(value, kind):
                raise self.fail(node, f"{text!r} is not a valid !!{tag.rsplit(':', 1)[1]}")
            return self._number(node, float(value) if tag == _T + "float" else value)
        raise self.fail(node, f"the YAML tag {tag} is not allowed in a Kubernetes manifest")

    def _number(self, node: ScalarNode, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and not INT64[0] <= value <= INT64[1]:
            raise self.fail(node, f"the number {node.value[:40]} does not fit in 64 bits")
        if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 1e21:
            return int(value)  # Go's JSON writes 4e2 as 400: the API server sees an integer
        return value


def _plain(text: str) -> Any:
    """A plain scalar as go-yaml v2 reads it (what kubectl sends)."""
    if text in _NULL:
        return None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    if text in _INF:
        return math.inf
    if text in {"-.inf", "-.Inf", "-.INF"}:
        return -math.inf
    if text in _NAN:
        return math.nan
    if not text or text[0] not in "0123456789+-.":
        return text
    digits = text.replace("_", "")
    if len(digits) <= 70 and _INT.match(digits):
        sign = -1 if digits[0] == "-" else 1
        body = digits.lstrip("+-")
        prefix = body[:2].lower()
        base = {"0x": 16, "0o": 8, "0b": 2}.get(prefix)
        if base:
            return sign * int(body[2:], base)
        return sign * int(body, 8 if len(body) > 1 and body[0] == "0" else 10)
    if len(digits) <= 400 and _FLOAT.match(digits):
        value = float(digits)
        return value if math.isfinite(value) else text  # Go keeps 1e400 as a string
    return text


def _key_text(value: Any) -> str:
    """Keys as kubectl's YAML-to-JSON conversion writes them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def loads(text: str, name: str = "<input>") -> list[Document]:
    """Every document of ``text``; ``kind: List`` items unfolded."""
    docs: list[Document] = []
    try:
        _check_nesting(text, name)  # before composing: the composer recurses
        nodes = list(yaml.compose_all(text, Loader=_Loader))
        for index, node in enumerate(nodes, start=1):
            if node is not None:  # one document in the file: named by the file alone
                where = name if len(nodes) == 1 else f"{name}, document {index}"
                docs.extend(_documents(where, _Builder(name).build(node)))
    except yaml.reader.ReaderError as err:
        code = err.character if isinstance(err.character, int) else ord(err.character)
        raise ManifestError(
            f"{name}: character {err.position + 1} is U+{code:04X}, a control character YAML does not allow: remove it"
        ) from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f", line {mark.line + 1}" if mark else ""
        raise ManifestError(f"{name}{where}: not valid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ManifestError(f"{name}: not valid YAML: {err}") from None
    return docs


def _check_nesting(text: str, name: str) -> None:
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise ManifestError(f"{name}, line {event.start_mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _documents(where: str, data: Any) -> list[Document]:
    if data is None:
        return []
    if isinstance(data, dict) and data.get("kind") == "List" and isinstance(data.get("items"), list):
        return [Document(f"{where}, item {i + 1}", item) for i, item in enumerate(data["items"])]
    if isinstance(data, list):
        raise ManifestError(
            f"{where}: a YAML list at the top; kubectl expects one object per document "
            "(separate them with ---) or a kind: List with items"
        )
    if not isinstance(data, dict):
        raise ManifestError(
            f"{where}: {type(data).__name__} {str(data)[:40]!r} is not an object with "
            "apiVersion, kind, metadata and spec"
        )
    return [Document(where, data)]


def read(path: Path) -> list[Document]:
    """Every document of the file at ``path`` (see the module's docstring)."""
    name = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ManifestError(
                f"{name} is {size // 1024} KiB; a manifest the API server takes is at "
                f"most {MAX_FILE_BYTES // (1024 * 1024)} MiB"
            )
        raw = path.read_bytes()
    except OSError as err:
        raise ManifestError(f"cannot read {name}: {err.strerror or err}") from None
    docs = loads(_decode(raw, name), name)
    if not docs:
        raise ManifestError(f"{name} holds no YAML document")
    return docs
