"""MLflow Model Registry URIs, built and parsed in one place.

Three forms name a model: ``models:/<name>/<version>`` (one immutable version), ``models:/<name>@<alias>``
(whatever version the alias points at now) and MLflow 3's logged-model form ``models:/m-<id>``
(a logged model, registered or not). Anything else the project accepts in a model field is a local
directory of a logged model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

SCHEME = "models:/"
_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))?/?$")


@dataclass(frozen=True)
class ModelURI:
    """A parsed ``models:/`` URI: ``name`` with at most one of ``version`` and ``alias``."""

    name: str
    version: Optional[str] = None
    alias: Optional[str] = None

    def __str__(self) -> str:
        return model_uri(self.name, version=self.version, alias=self.alias)


def is_model_uri(value: str) -> bool:
    """True for any ``models:/...`` string (a registry or logged-model URI), False for paths."""
    return value.startswith(SCHEME)


def model_uri(name: str, *, version: Optional[object] = None, alias: Optional[str] = None) -> str:
    """``models:/<name>/<version>``, ``models:/<name>@<alias>``, or ``models:/<name>`` (neither)."""
    if version is not None and alias is not None:
        raise ValueError(f"a model URI names a version or an alias, not both (got {version!r} and {alias!r})")
    if not name or "/" in name or "@" in name:
        raise ValueError(f"not a registered model name: {name!r}")
    if version is not None:
        return f"{SCHEME}{name}/{version}"
    if alias is not None:
        return f"{SCHEME}{name}@{alias}"
    return f"{SCHEME}{name}"


def parse_model_uri(uri: str) -> ModelURI:
    """``models:/<name>[/<version>|@<alias>]`` -> :class:`ModelURI`; anything else is a ValueError
    that names the expected forms."""
    m = _REF.match(uri)
    if not m:
        raise ValueError(f"not a registry URI: {uri!r} (expected models:/<name>@<alias> or models:/<name>/<version>)")
    return ModelURI(m.group("name"), version=m.group("version"), alias=m.group("alias"))
