"""Registry of objective terms: a name in `loss.terms[].name` resolves to a term builder.

A term builder takes the term's config (weight, resolved pairs, extra options) and returns a
callable `term(embeddings, present, logit_scale) -> scalar` on local rows; see losses/__init__.
"""

from __future__ import annotations

from collections.abc import Callable

TERMS: dict[str, Callable] = {}


def register_term(name: str) -> Callable[[Callable], Callable]:
    def wrap(fn: Callable) -> Callable:
        if name in TERMS:
            raise ValueError(f"objective term {name!r} is registered twice")
        TERMS[name] = fn
        return fn

    return wrap
