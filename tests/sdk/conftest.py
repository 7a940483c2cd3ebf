"""Fixtures for the official-SDK tests: a running `tollgate serve --demo` (started by
scripts/test), its demo key and admin token. Money is compared as Decimal, never float."""

import json
import os
import urllib.request
from decimal import Decimal

import pytest

URL = os.environ["TOLLGATE_URL"]
KEY = os.environ["TOLLGATE_KEY"]
ADMIN_TOKEN = os.environ["TOLLGATE_ADMIN_TOKEN"]

# Demo prices per million tokens; per token: input 2500 nano-units, output 10000.
NANO = Decimal("0.000000001")


def expected_cost(input_tokens: int, output_tokens: int) -> Decimal:
    return Decimal(input_tokens * 2_500 + output_tokens * 10_000) * NANO


def get_json(path: str, token: str) -> dict:
    request = urllib.request.Request(URL + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def balance() -> Decimal:
    return Decimal(get_json("/v1/balance", KEY)["balance"])


@pytest.fixture
def url() -> str:
    return URL


@pytest.fixture
def key() -> str:
    return KEY
