"""Model verbs: the MLflow registry."""

from __future__ import annotations

import argparse

from drseg.cli.verb import Verbs, add_verb
from drseg.config import Settings
from drseg.errors import UserError


def _registry(args: argparse.Namespace, settings: Settings) -> None:
    from drseg import registry
    from drseg.tracking import tracking_uri

    uri = tracking_uri(settings.tracking, settings.home)
    name = settings.registry.model_name
    if args.action == "promote":
        if args.version is None:
            raise UserError("registry promote needs the VERSION to promote, e.g. 3")
        registry.promote(uri, name, args.version, reason=args.reason)
        print(f"{name}: version {args.version} is @champion")
    elif args.action == "rollback":
        version = registry.rollback(uri, name, reason=args.reason)
        print(f"{name}: rolled back, version {version} is @champion")
    else:
        print(registry.show(uri, name))


def add_verbs(verbs: Verbs) -> None:
    registry = add_verb(
        verbs, "registry", _registry, "MLflow registry: versions, aliases and their history"
    )
    registry.add_argument(
        "action", choices=["show", "promote", "rollback"], nargs="?", default="show"
    )
    registry.add_argument("version", nargs="?", help="version to promote to @champion")
    registry.add_argument("--reason", help="recorded with the alias move")
