"""Shared helpers for the official-SDK tests.

`scripts/test` starts `tollgate serve --demo` and passes its address, demo key and admin token in
TOLLGATE_URL, TOLLGATE_KEY and TOLLGATE_ADMIN_TOKEN. Money is compared as Decimal strings and
integer nano-units, never as floats: a charge must be exact to the unit.
"""

import json
import os
import time
import urllib.request
from decimal import Decimal

import pytest

URL = os.environ["TOLLGATE_URL"]
KEY = os.environ["TOLLGATE_KEY"]
ADMIN_TOKEN = os.environ["TOLLGATE_ADMIN_TOKEN"]

# The demo prices (`serve --demo`), per million tokens, in nano-units (1 unit = 10^-9).
NANO_PER_UNIT = 10**9
INPUT_NANO_PER_MTOK = 2_500_000_000  # 2.50
CACHED_INPUT_NANO_PER_MTOK = 1_250_000_000  # 1.25
CACHE_WRITE_NANO_PER_MTOK = 3_125_000_000  # 3.125
OUTPUT_NANO_PER_MTOK = 10_000_000_000  # 10.00
TOKENS_PER_MTOK = 1_000_000

# What the mock upstream generates by default: N tokens of " hello" (capped by max_tokens).
MOCK_TOKENS_DEFAULT = 16
MOCK_TOKEN = " hello"


def expected_cost(
    input_tokens: int, output_tokens: int, cached_input_tokens: int = 0, cache_write_tokens: int = 0
) -> Decimal:
    """The exact demo cost: the sum over token kinds of tokens × price, rounded up to the unit.

    `input_tokens` are the uncached input tokens (OpenAI: prompt_tokens − cached_tokens;
    Anthropic: input_tokens as reported)."""
    numerator = (
        input_tokens * INPUT_NANO_PER_MTOK
        + cached_input_tokens * CACHED_INPUT_NANO_PER_MTOK
        + cache_write_tokens * CACHE_WRITE_NANO_PER_MTOK
        + output_tokens * OUTPUT_NANO_PER_MTOK
    )
    nano = -(-numerator // TOKENS_PER_MTOK)  # ceiling division, in integers
    return Decimal(nano) / NANO_PER_UNIT


def openai_cost(usage) -> Decimal:
    """The exact cost of an OpenAI `CompletionUsage`."""
    details = usage.prompt_tokens_details
    cached = (details.cached_tokens or 0) if details is not None else 0
    return expected_cost(usage.prompt_tokens - cached, usage.completion_tokens, cached)


def anthropic_cost(usage) -> Decimal:
    """The exact cost of an Anthropic `Usage` (its input_tokens exclude cache reads and writes)."""
    return expected_cost(
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_input_tokens or 0,
        usage.cache_creation_input_tokens or 0,
    )


def get_json(path: str, token: str) -> dict:
    request = urllib.request.Request(URL + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def balance() -> Decimal:
    """The demo account's balance (not `available`: holds are released once a call returns)."""
    return Decimal(get_json("/v1/balance", KEY)["balance"])


def account() -> dict:
    """The demo account as the operator API shows it: live balance, held, ledger balance."""
    account_id = get_json("/v1/balance", KEY)["account_id"]
    return get_json(f"/internal/accounts/{account_id}", ADMIN_TOKEN)


QUIET_WAIT_SECONDS = 5


def assert_quiet_and_conserved() -> None:
    """No hold is left, and the hot balance equals the ledger's (I2). Embedded, this holds right
    after a call (the charge is committed before the last byte); in services mode the worker
    writes the ledger just after, so wait (bounded) until it is quiet."""
    deadline = time.monotonic() + QUIET_WAIT_SECONDS
    while True:
        state = account()
        quiet = Decimal(state["held"]) == 0 and Decimal(state["balance"]) == Decimal(state["ledger_balance"])
        if quiet or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert Decimal(state["held"]) == 0, state
    assert Decimal(state["balance"]) == Decimal(state["ledger_balance"]), state


def usage_rows(request_id: str) -> list[dict]:
    """The caller's usage rows with this request id (newest page of /v1/usage)."""
    deadline = time.monotonic() + QUIET_WAIT_SECONDS
    while True:
        page = get_json("/v1/usage?limit=100", KEY)
        rows = [row for row in page["data"] if row["request_id"] == request_id]
        if rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


@pytest.fixture(scope="session", autouse=True)
def demo_prices_are_the_assumed_ones():
    """Every test fails, with the reason, if the gateway's demo prices are not the ones assumed here."""
    tier = account()["customer_type"]
    prices = get_json("/internal/prices", ADMIN_TOKEN)["data"]
    for model in ("demo-gpt", "demo-claude", "demo-embedding"):
        [price] = [p for p in prices if p["model"] == model and p["customer_type"] == tier]
        assert Decimal(price["input_per_mtok"]) * NANO_PER_UNIT == INPUT_NANO_PER_MTOK, price
        assert Decimal(price["cached_input_per_mtok"]) * NANO_PER_UNIT == CACHED_INPUT_NANO_PER_MTOK, price
        assert Decimal(price["cache_write_per_mtok"]) * NANO_PER_UNIT == CACHE_WRITE_NANO_PER_MTOK, price
        assert Decimal(price["output_per_mtok"]) * NANO_PER_UNIT == OUTPUT_NANO_PER_MTOK, price
        assert Decimal(price["per_request"] or "0") == 0, price

