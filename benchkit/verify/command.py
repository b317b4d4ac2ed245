"""``benchkit verify`` (its options are in :mod:`benchkit.cli`): evaluate reproduction cards against a store, write their README text, or run the
ShrinkBench checklist on any sweep. Exit status 1 when a claim fails (or a checklist rule is not met)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from benchkit.verify.card import CardError, find_cards, load_card, resolve_card
from benchkit.verify.report import ERROR, format_result, markdown, verify_card, write_blocks

EXIT_OK, EXIT_FAILED = 0, 1


def _uri(args: argparse.Namespace, fallback: str | None) -> str:
    from benchkit.tracking import resolve_tracking_uri, sqlite_path

    uri = resolve_tracking_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or fallback)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        raise CardError(f"no MLflow store at {db}: pass --tracking-uri (or set $MLFLOW_TRACKING_URI) to the store that "
                        "holds the study's runs")
    return uri


def run(args: argparse.Namespace) -> int:
    if args.write and not args.markdown:
        raise CardError("--write replaces the README blocks with the --markdown text: add --markdown")
    if args.checklist:
        return _checklist(args)
    if args.all == bool(args.studies):
        raise CardError("name the studies to verify (e.g. `benchkit verify strategies`) or pass --all, not both")
    paths = find_cards(args.cards) if args.all else [resolve_card(s, args.cards) for s in args.studies]
    if not paths:
        raise CardError(f"no *.card.yaml in {args.cards}")
    cards = [load_card(p) for p in paths]  # every card is read (and checked) before any store is
    results = [verify_card(card, _uri(args, card.store_uri())) for card in cards]
    failed = [r for r in results if r.fatal]
    if args.markdown:
        if failed and args.write:
            r = failed[0]
            o = r.fatal[0]
            raise CardError(f"{r.card.name}: claim {o.claim.id!r} is {o.status}; fix it (or give its known_difference) "
                            f"before writing {args.write}:\n{format_result(r, verbose=False)}")
        base = Path(args.write).parent if args.write else Path.cwd()
        blocks = {r.card.name: markdown(r, base) for r in results if not r.count(ERROR)}
        if args.write:
            target = Path(args.write)
            target.write_text(write_blocks(target.read_text(), blocks))
            print(f"wrote {len(blocks)} block(s) into {target}: {', '.join(blocks)}")
        else:
            print("\n".join(f"<!-- verify:{name} -->\n{text}<!-- /verify:{name} -->\n" for name, text in blocks.items()))
    else:
        print("\n\n".join(format_result(r, verbose=not args.quiet) for r in results))
    if len(results) > 1:
        print(f"\n{len(results)} cards: " + ", ".join(f"{r.card.name} {'ok' if not r.fatal else 'FAILED'}"
                                                   for r in results))
    return EXIT_FAILED if failed else EXIT_OK


def _checklist(args: argparse.Namespace) -> int:
    from benchkit import analysis as ba
    from benchkit.verify.checklist import checklist, format_checklist

    if not args.studies:
        raise CardError("--checklist needs the experiment(s) to check, e.g. `benchkit verify --checklist strategies`")
    uri = _uri(args, None)
    code = EXIT_OK
    for name in args.studies:
        try:
            runs = ba.load_runs(name, tracking_uri=uri)
        except ValueError as e:
            raise CardError(str(e)) from None
        if runs.empty:
            raise CardError(f"experiment {name!r} in {uri} has no FINISHED run")
        results = checklist(runs, args.metric)
        print(format_checklist(name, results))
        if not all(r.ok for r in results):
            code = EXIT_FAILED
    return code
