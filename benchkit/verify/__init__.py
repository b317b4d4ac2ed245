"""Reproduction cards, executable: every published claim a study compares with becomes a check over its runs.

    benchkit verify strategies                       # one card against its store, claim by claim
    benchkit verify --all --markdown --write results/README.md   # the agree/differ text, from the cards
    benchkit verify --checklist strategies           # ShrinkBench's reporting checklist on any sweep

>>> from benchkit import verify as bv
>>> result = bv.verify_card(bv.load_card("experiments/strategies.card.yaml"))
>>> print(bv.format_result(result))
>>> bv.compare(runs, {"allocation": "global"}, {"allocation": "uniform"}, by="compression", scale=100)
"""

from benchkit.verify.card import Card, CardError, build_claim, find_cards, load_card, resolve_card
from benchkit.verify.checklist import BUDGETS, RULES, RuleResult, checklist, format_checklist
from benchkit.verify.claims import CLAIM_KINDS, Check, Claim, ClaimContext, ClaimError, register_claim
from benchkit.verify.data import SOURCES, StudyData, current_names
from benchkit.verify.report import (
    ERROR,
    FAIL,
    KNOWN,
    PASS,
    XPASS,
    CardResult,
    Outcome,
    format_result,
    markdown,
    read_blocks,
    verify_card,
    write_blocks,
)
from benchkit.verify.stats import PairedDifference, compare, paired_difference, t_interval

__all__ = [
    "BUDGETS", "CLAIM_KINDS", "ERROR", "FAIL", "KNOWN", "PASS", "RULES", "SOURCES", "XPASS", "Card", "CardError",
    "CardResult", "Check", "Claim", "ClaimContext", "ClaimError", "Outcome", "PairedDifference", "RuleResult",
    "StudyData", "build_claim", "checklist", "compare", "current_names", "find_cards", "format_checklist",
    "format_result", "load_card", "markdown", "paired_difference", "read_blocks", "register_claim", "resolve_card",
    "t_interval", "verify_card", "write_blocks",
]
