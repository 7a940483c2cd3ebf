"""The official anthropic SDK against Tollgate in front of the mock upstream."""

from decimal import Decimal

import anthropic
import pytest

from conftest import KEY, URL, balance, expected_cost


@pytest.fixture
def client() -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=URL, api_key=KEY, max_retries=0)


MESSAGES = [{"role": "user", "content": "What does a ledger record?"}]


def test_non_streaming_charge_is_exact(client):
    before = balance()
    raw = client.messages.with_raw_response.create(model="demo-claude", max_tokens=64, messages=MESSAGES)
    message = raw.parse()
    assert message.content[0].text == " hello" * 16
    cost = Decimal(raw.headers["x-tollgate-cost"])
    assert cost == expected_cost(message.usage.input_tokens, message.usage.output_tokens)
    assert before - balance() == cost


def test_streaming_charge_is_exact(client):
    before = balance()
    with client.messages.stream(model="demo-claude", max_tokens=10, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text == " hello" * 10
    assert message.usage.output_tokens == 10
    assert before - balance() == expected_cost(message.usage.input_tokens, message.usage.output_tokens)


def test_a_wrong_key_is_an_authentication_error():
    bad = anthropic.Anthropic(base_url=URL, api_key="tg_wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.create(model="demo-claude", max_tokens=8, messages=MESSAGES)
