"""Reproduction cards: ``experiments/<study>.card.yaml`` beside each sweep, holding the paper, how the runs
here differ from its protocol, and the claims as checks (:mod:`benchkit.verify.claims`).

A card, in full::

    experiment: strategies              # the MLflow experiment its claims read
    title: Pruning strategies, LeNet-300-100
    paper: Blalock et al. 2020, "What is the State of Neural Network Pruning?" (MLSys)
    sweep: strategies.yaml              # the sweep that makes the runs (beside the card)
    store: ../results/studies/mlflow.db # where the committed runs are (used without --tracking-uri)
    pending: why the runs are not in the store yet   # only for a study set up but not run
    protocol:                           # how these runs differ from the paper's protocol
      - Fashion-MNIST instead of MNIST
    defaults: {metric: test_acc1, scale: 100, unit: "%"}   # for every claim below
    claims:
      - id: global-beats-uniform-magnitude
        says: At equal compression, global allocation beats uniform for magnitude from 8x on
        kind: ordering
        a: {criterion: magnitude, allocation: global}
        b: {criterion: magnitude, allocation: uniform}
        at: {">=": 8}
        significant: true
      - id: ...
        known_difference: why the runs here differ from the paper on this claim

A claim that fails but names its ``known_difference`` is reported KNOWN and does not fail the card.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchkit.config import ConfigError, load_yaml
from benchkit.verify.claims import CLAIM_KINDS, Claim

CARD_SUFFIX = ".card.yaml"


class CardError(ConfigError):
    """A card that cannot be read: the message names the file, the claim and the fix."""


@dataclass
class Card:
    name: str  # the file name without .card.yaml (the README block it writes)
    path: Path
    experiment: str
    title: str
    paper: str
    claims: list[Claim]
    sweep: str | None = None
    store: str | None = None
    protocol: list[str] = field(default_factory=list)
    pending: str | None = None  # the study is set up but not run: its absence from a store is reported, not failed

    def store_uri(self) -> str | None:
        """The card's own store as a tracking URI (``sqlite:///`` for a .db file), relative to the card."""
        if not self.store:
            return None
        if "://" in self.store:
            return self.store
        path = (self.path.parent / self.store).resolve()
        return f"sqlite:///{path}" if path.suffix == ".db" else str(path)


CARD_KEYS = ("experiment", "title", "paper", "sweep", "store", "pending", "protocol", "defaults", "claims")
CLAIM_FIELDS = {f.name: f for f in dataclasses.fields(Claim) if f.name not in ("settings",)}


def load_card(path: str | Path) -> Card:
    """Read and check a card: every claim's kind is known, every key belongs to its claim or kind, ids are unique."""
    path = Path(path)
    data, lines = load_yaml(path)
    unknown = [k for k in data if k not in CARD_KEYS]
    if unknown:
        raise CardError(f"{path}: unknown key {unknown[0]!r}{_line(lines, unknown[0])}; a card has "
                        f"{', '.join(CARD_KEYS)}")
    for key in ("experiment", "title", "paper", "claims"):
        if not data.get(key):
            raise CardError(f"{path}: {key!r} is missing; a card names its experiment, title, paper and claims")
    if not isinstance(data["claims"], list):
        raise CardError(f"{path}: claims must be a list of claims")
    defaults = data.get("defaults") or {}
    bad = [k for k in defaults if k not in CLAIM_FIELDS or k in ("id", "says", "kind", "known_difference")]
    if bad:
        raise CardError(f"{path}: defaults cannot set {bad[0]!r}; they may set "
                        f"{', '.join(k for k in CLAIM_FIELDS if k not in ('id', 'says', 'kind', 'known_difference'))}")
    claims, seen = [], set()
    for i, raw in enumerate(data["claims"]):
        claim = build_claim(raw, defaults, f"{path}: claims[{i}]", lines.get(f"claims.{i}"))
        if claim.id in seen:
            raise CardError(f"{path}: two claims have the id {claim.id!r}; ids name claims uniquely")
        seen.add(claim.id)
        claims.append(claim)
    protocol = data.get("protocol") or []
    if isinstance(protocol, str):
        protocol = [protocol]
    return Card(name=path.name.removesuffix(CARD_SUFFIX), path=path, experiment=str(data["experiment"]),
                title=str(data["title"]), paper=str(data["paper"]), claims=claims, sweep=data.get("sweep"),
                store=data.get("store"), protocol=[str(p) for p in protocol],
                pending=str(data["pending"]) if data.get("pending") else None)


def build_claim(raw: Any, defaults: dict[str, Any] | None = None, where: str = "claim", line: int | None = None) -> Claim:
    """A :class:`Claim` from its card mapping (``defaults`` under it), its kind's settings split off and checked."""
    if not isinstance(raw, dict):
        raise CardError(f"{where}: a claim is a mapping with id, says, kind and its settings, got {raw!r}")
    label = f"{where} ({raw.get('id', '?')}{f', line {line}' if line else ''})"
    for key in ("id", "says", "kind"):
        if not raw.get(key):
            raise CardError(f"{label}: {key!r} is missing")
    try:
        kind = CLAIM_KINDS.get(raw["kind"])
    except KeyError as e:
        raise CardError(f"{label}: {e}") from None
    own = {f.name for f in dataclasses.fields(kind.settings)}
    common, settings = {}, {}
    for key, value in raw.items():
        if key in own:
            settings[key] = value
        elif key in CLAIM_FIELDS:
            common[key] = value
        else:
            allowed = sorted(own | set(CLAIM_FIELDS))
            close = difflib.get_close_matches(str(key), allowed, n=1)
            raise CardError(f"{label}: unknown key {key!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                            f"a {kind.name} claim takes {', '.join(sorted(own))} and {', '.join(CLAIM_FIELDS)}")
    merged = {**(defaults or {}), **common}
    if "where" in (defaults or {}) and "where" in common:
        merged["where"] = {**defaults["where"], **common["where"]}
    if "known_difference" in merged and not str(merged["known_difference"] or "").strip():
        raise CardError(f"{label}: known_difference needs its reason (why the runs here differ from the paper)")
    _check_types(Claim, merged, label)
    _check_types(kind.settings, settings, label)
    claim = Claim(**merged, settings=kind.settings(**settings))
    claim.kind = kind.name
    problem = kind.check(claim.settings)
    if problem:
        raise CardError(f"{label}: a {kind.name} claim {problem}")
    if not 0 < claim.confidence < 1:
        raise CardError(f"{label}: confidence must be in (0, 1), e.g. 0.95; got {claim.confidence}")
    if claim.reduce not in (None, "mean"):
        raise CardError(f"{label}: reduce is 'mean' or absent, got {claim.reduce!r}")
    return claim


def _check_types(cls: type, values: dict[str, Any], label: str) -> None:
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if not _fits(value, hints.get(key, Any)):
            raise CardError(f"{label}: {key} must be {_type_name(hints[key])}, got {value!r}")


def _fits(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_fits(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is bool:
        return isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict)
    return True


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _line(lines: dict[str, int], key: str) -> str:
    return f" (line {lines[key]})" if key in lines else ""


# --------------------------------------------------------------------------------------------- finding cards
def find_cards(directory: str | Path) -> list[Path]:
    """Every ``*.card.yaml`` in ``directory``, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CardError(f"no card folder {directory}; cards live beside the sweeps (experiments/), or pass --cards DIR")
    return sorted(directory.glob(f"*{CARD_SUFFIX}"))


def resolve_card(name: str, directory: str | Path) -> Path:
    """A card by path, by study name (``strategies_lenet5``) or by experiment name (``strategies-lenet5``)."""
    as_path = Path(name)
    if as_path.suffix in (".yaml", ".yml") and as_path.exists():
        return as_path
    cards = find_cards(directory)
    for path in cards:
        if path.name.removesuffix(CARD_SUFFIX) in (name, name.replace("-", "_")):
            return path
    for path in cards:
        if load_yaml(path)[0].get("experiment") == name:
            return path
    names = [p.name.removesuffix(CARD_SUFFIX) for p in cards]
    close = difflib.get_close_matches(name, names, n=1)
    raise CardError(f"no card for {name!r} in {directory}{f'; did you mean {close[0]!r}?' if close else ''}; cards: "
                    f"{', '.join(names) or '(none)'}")
