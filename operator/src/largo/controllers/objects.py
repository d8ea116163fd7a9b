"""Helpers both reconcilers use on the objects they read and write (no I/O)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import kopf


def newer(hint: Mapping[str, Any], indexed: Mapping[str, Any]) -> Mapping[str, Any]:
    """The newer of two versions of an object. resourceVersions are opaque to clients, but the API server
    hands out increasing integers; where they are not, the hint (the object a write returned) wins. A
    hint of another generation is not used: its spec is not the one the index parsed."""
    if (hint.get("metadata") or {}).get("generation") != (indexed.get("metadata") or {}).get("generation"):
        return indexed
    try:
        ours = int((hint.get("metadata") or {}).get("resourceVersion") or 0)
        theirs = int((indexed.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return hint
    return hint if ours >= theirs else indexed


def status_patch(current: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch from the operator's ``current`` status fields to ``status``: absent ones are removed."""
    return {**{key: None for key in current if key not in status}, **status}


def owned(manifest: dict[str, Any], owner: Mapping[str, Any]) -> dict[str, Any]:
    """Sets ``owner`` as the child's controller, so deleting the owner deletes the child. Only the
    reference: ``kopf.adopt`` also copies the owner's labels onto the child, and a job labelled ``app:
    web`` put its pods behind the user's own Service selecting ``app: web`` (children carry the template's
    labels and largo's, as a Deployment's pods carry its template's, not its own)."""
    kopf.append_owner_reference(manifest, owner=kopf.Body(cast(Any, dict(owner))))
    return manifest
