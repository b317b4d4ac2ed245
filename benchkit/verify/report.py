"""Evaluate a card against a store, print what decided each claim, and write the agree/differ text of
``results/README.md`` from the cards (between ``<!-- verify:NAME -->`` and ``<!-- /verify:NAME -->``).

Status of a claim: PASS (holds), FAIL (does not), KNOWN (does not, and the card names why: a known
difference), XPASS (listed as a known difference but holds now: update the card), ERROR (the claim cannot be
evaluated on these runs: a card or store problem). FAIL and ERROR make ``benchkit verify`` exit non-zero. A card
marked ``pending`` whose experiment is not in the store is reported as such (nothing to check yet), not failed;
one whose runs are partly there is *in progress*: its claims are checked on the runs so far, and a claim whose
runs are not there yet WAITs (not failed, and said so in the README text).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from benchkit.verify.card import Card
from benchkit.verify.claims import CLAIM_KINDS, Check, Claim, ClaimContext, ClaimError, MissingRuns
from benchkit.verify.data import StudyData

PASS, FAIL, KNOWN, XPASS, ERROR, WAIT = "PASS", "FAIL", "KNOWN", "XPASS", "ERROR", "WAIT"
FATAL = (FAIL, ERROR)


@dataclass
class Outcome:
    claim: Claim
    status: str
    checks: list[Check] = field(default_factory=list)
    requirement: str = ""
    error: str | None = None

    @property
    def holds(self) -> bool:
        return self.status in (PASS, XPASS)


@dataclass
class CardResult:
    card: Card
    tracking_uri: str | None
    outcomes: list[Outcome]
    pending: bool = False  # a pending card whose experiment is not in this store
    in_progress: int | None = None  # a pending card with some runs in this store: how many have finished

    @property
    def fatal(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status in FATAL]

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


def evaluate_claim(claim: Claim, ctx: ClaimContext, in_progress: bool = False) -> Outcome:
    kind = CLAIM_KINDS.get(claim.kind)
    requirement = kind.requirement(claim)
    try:
        checks = kind.evaluate(claim, ctx)
    except MissingRuns as e:
        return Outcome(claim, WAIT if in_progress else ERROR, [], requirement, str(e))
    except (ClaimError, KeyError, ValueError) as e:
        return Outcome(claim, ERROR, [], requirement, f"{type(e).__name__}: {e}" if isinstance(e, KeyError) else str(e))
    held = bool(checks) and all(c.ok for c in checks)
    if claim.known_difference:
        status = XPASS if held else KNOWN
    else:
        status = PASS if held else FAIL
    return Outcome(claim, status, checks, requirement)


def verify_card(card: Card, tracking_uri: str | None = None, study: StudyData | None = None) -> CardResult:
    """Every claim of ``card`` on the runs of its experiment in ``tracking_uri`` (default: the card's store)."""
    uri = tracking_uri or card.store_uri()
    study = study or StudyData(card.experiment, uri)
    if card.pending and not study.available():
        return CardResult(card, uri, [], pending=True)
    ctx = ClaimContext(study)
    running = study.finished_count() if card.pending else None
    return CardResult(card, uri, [evaluate_claim(c, ctx, bool(running)) for c in card.claims], in_progress=running)


# --------------------------------------------------------------------------------------------- text
def format_result(result: CardResult, verbose: bool = True) -> str:
    card = result.card
    lines = [f"{card.name}: {card.title}", f"  paper: {card.paper}",
             f"  runs: experiment {card.experiment!r} in {result.tracking_uri}"]
    if result.pending:
        lines.append(f"  PENDING  no finished run of {card.experiment!r} in this store: {card.pending}")
        lines += [f"         to check: {c.id}: {c.says}" for c in card.claims]
        return "\n".join(lines)
    if result.in_progress:
        lines.append(f"  IN PROGRESS  {result.in_progress} finished runs so far; the card is marked pending: "
                     f"{card.pending}")
    for o in result.outcomes:
        lines.append(f"  {o.status:<5}  {o.claim.id}: {o.claim.says}")
        if o.requirement:
            lines.append(f"         needs: {o.requirement}")
        if o.error:
            lines.append(f"         error: {o.error}")
        for c in o.checks:
            if verbose or not c.ok:
                lines.append(f"         {'ok ' if c.ok else 'NO '} {c.point}: {c.text}")
        if o.status == KNOWN:
            lines.append(f"         known difference: {o.claim.known_difference}")
        if o.status == XPASS:
            lines.append("         listed as a known difference but holds on these runs: move it to the agreements "
                         f"(drop known_difference in {card.path})")
    counts = ", ".join(f"{result.count(s)} {s.lower()}" for s in (PASS, KNOWN, XPASS, FAIL, ERROR, WAIT)
                       if result.count(s))
    lines.append(f"  {card.name}: {counts}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- markdown
def _numbers(o: Outcome) -> str:
    """The numbers that decided a claim, short: one per point (or one for a claim over every row)."""
    shorts = [c.short or c.text for c in o.checks]
    if len(shorts) > 1 and len(set(shorts)) == 1:
        return f"{shorts[0]} at every point, {o.checks[0].point} to {o.checks[-1].point}"
    return "; ".join(f"{c.point}: {c.short or c.text}" if c.point not in ("every row", "crossing", "all", "trend")
                     else (c.short or c.text) for c in o.checks)


def markdown(result: CardResult, link_base: str | Path | None = None) -> str:
    """The card's agree/differ paragraph as Markdown (what ``--write`` puts between the README markers)."""
    card = result.card
    if result.count(ERROR):
        bad = next(o for o in result.outcomes if o.status == ERROR)
        raise ClaimError(f"{card.name}: claim {bad.claim.id!r} cannot be evaluated ({bad.error}); fix the card or the "
                         "store before generating the README text")
    link = os.path.relpath(card.path.resolve(), Path(link_base).resolve()) if link_base else str(card.path)
    if result.pending:
        out = [f"**Against the paper** — {card.paper}. Not run yet: {card.pending}. The claims its card "
               f"[`{card.path.name}`]({link}) will check:", ""]
        out += [f"- {c.says}" for c in card.claims]
        out += ["", *_protocol(card)]
        return "\n".join(out).rstrip() + "\n"
    conf = {o.claim.confidence for o in result.outcomes}
    progress = (f"In progress: {result.in_progress} runs have finished so far ({card.pending}); the claims below are "
                "checked on them, and those whose runs are not there yet wait. " if result.in_progress else "")
    head = (f"**Against the paper** — {card.paper}. {progress}Checked by `benchkit verify {card.name}` on these runs, from "
            f"[`{card.path.name}`]({link}): {len(result.outcomes)} claims; two strategies are compared seed by seed, "
            f"with {'/'.join(f'{c:.0%}' for c in sorted(conf))} t-intervals over the seeds (\"within noise\": the seeds "
            "cannot tell the difference from zero).")
    agrees = [o for o in result.outcomes if o.holds]
    waiting = [o for o in result.outcomes if o.status == WAIT]
    differs = [o for o in result.outcomes if not o.holds and o.status != WAIT]
    out = [head, ""]
    if agrees:
        out.append("Agrees:")
        out += [f"- {o.claim.says} — {_numbers(o)}." for o in agrees]
        out.append("")
    if differs:
        out.append("Differs:")
        for o in differs:
            reason = (o.claim.known_difference or "").strip().rstrip(".")
            why = f" Why: {reason}." if reason else " (not a known difference)"
            out.append(f"- {o.claim.says} — measured {_numbers(o)}.{why}")
        out.append("")
    if waiting:
        out.append("Waiting for runs:")
        out += [f"- {o.claim.says} — {o.error}." for o in waiting]
        out.append("")
    out += _protocol(card)
    return "\n".join(out).rstrip() + "\n"


def _protocol(card: Card) -> list[str]:
    if not card.protocol:
        return []
    return ["Protocol here vs the paper:", *(f"- {p.rstrip('.')}." for p in card.protocol)]


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- verify:{name} -->", f"<!-- /verify:{name} -->"


def write_blocks(text: str, blocks: dict[str, str]) -> str:
    """``text`` with the content between each card's markers replaced by its block; every marker must exist."""
    missing = [name for name in blocks if _markers(name)[0] not in text or _markers(name)[1] not in text]
    if missing:
        begin, end = _markers(missing[0])
        raise ClaimError(f"no marker pair for {', '.join(missing)}: put {begin} and {end} where the text goes")
    for name, block in blocks.items():
        begin, end = _markers(name)
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        new = f"{begin}\n{block}{end}"
        text = pattern.sub(lambda _, new=new: new, text, count=1)
    return text


def read_blocks(text: str) -> dict[str, str]:
    """The content of every ``<!-- verify:NAME -->`` block in ``text`` (what was generated last)."""
    return {m["name"]: m["body"] for m in re.finditer(
        r"<!-- verify:(?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /verify:(?P=name) -->", text, re.S)}
