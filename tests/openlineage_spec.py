"""OpenLineage events checked against the official JSON schemas (vendored in
tests/schemas/openlineage, so the check runs offline) and the spec's text rules
that a schema cannot say: custom facet keys carry a project prefix, and every
facet's ``_schemaURL`` names a schema that exists."""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

from tests.conftest import ROOT

SCHEMAS = ROOT / "tests" / "schemas" / "openlineage"
RUN_EVENT = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"
CUSTOM_KEY = re.compile(r"^[a-z][a-zA-Z0-9]*_[a-z][a-zA-Z0-9]*$")  # {prefix}_{name}


@cache
def _schemas() -> dict[str, dict]:
    """$id -> schema: the spec's, and this project's own facet schema (by its file in
    the package, which its _schemaURL must name)."""
    from pipeline import lineage

    files = [*SCHEMAS.glob("*.json"), ROOT / lineage.EMBEDDING_FACET_FILE]
    return {s["$id"]: s for s in (json.loads(p.read_text()) for p in files)}


@cache
def _registry():
    from referencing import Registry, Resource

    return Registry().with_resources(
        (uri, Resource.from_contents(schema)) for uri, schema in _schemas().items())


def _validate(instance: Any, ref: str) -> None:
    from jsonschema import Draft202012Validator, FormatChecker

    Draft202012Validator({"$ref": ref}, registry=_registry(),
                         format_checker=FormatChecker()).validate(instance)


def standard_facet_keys() -> set[str]:
    """The keys the spec's facet schemas define (``schema``, ``outputStatistics``, ...)."""
    return {key for uri, schema in _schemas().items() if "openlineage.io" in uri
            for key in schema.get("properties", {})}


def _facet_maps(event: dict) -> list[tuple[str, dict]]:
    """(the facet kind the spec allows there, the facets) for every place facets sit."""
    maps = [("RunFacet", event["run"].get("facets", {})),
            ("JobFacet", event["job"].get("facets", {}))]
    for dataset in event.get("inputs", []):
        maps += [("DatasetFacet", dataset.get("facets", {})),
                 ("InputDatasetFacet", dataset.get("inputFacets", {}))]
    for dataset in event.get("outputs", []):
        maps += [("DatasetFacet", dataset.get("facets", {})),
                 ("OutputDatasetFacet", dataset.get("outputFacets", {}))]
    return maps


def facet_kind(url: str) -> str:
    """RunFacet, DatasetFacet, OutputDatasetFacet, ...: what the facet's schema extends."""
    base, _, pointer = url.partition("#")
    node: Any = _schemas()[base]
    for part in pointer.strip("/").split("/"):
        node = node[part]
    parent = node["allOf"][0]["$ref"]
    return parent.rsplit("/", 1)[-1]


def validate_event(event: dict) -> None:
    """The event against RunEvent, then each facet against the schema its _schemaURL
    names, under the key that schema gives it."""
    _validate(event, RUN_EVENT)
    standard = standard_facet_keys()
    for kind, facets in _facet_maps(event):
        for key, facet in facets.items():
            url = facet["_schemaURL"]
            base = url.split("#", 1)[0]
            assert base in _schemas(), f"facet {key}: _schemaURL {url} names no known schema"
            assert key in standard or CUSTOM_KEY.match(key), (
                f"custom facet key {key!r} has no project prefix ({{prefix}}_{{name}})")
            assert facet_kind(url) == kind, (
                f"facet {key} is a {facet_kind(url)}, but sits where a {kind} goes")
            _validate(facet, url)
            # the facet file's top level says under which key its facet goes
            _validate({key: facet}, base)
            assert key in _schemas()[base].get("properties", {}), (key, base)
