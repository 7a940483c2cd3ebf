"""The official anthropic SDK against `tollgate serve --demo` (mock upstream behind it).

`demo-claude` routes over the Anthropic Messages protocol. Anthropic's `input_tokens` are the
uncached input tokens; the charge must equal usage × demo prices, to the unit.
"""

from decimal import Decimal

import anthropic
import pytest

from conftest import (
    KEY,
    MOCK_TOKEN,
    MOCK_TOKENS_DEFAULT,
    URL,
    anthropic_cost,
    assert_quiet_and_conserved,
    balance,
    expected_cost,
    usage_rows,
)

MODEL = "demo-claude"
MAX_TOKENS = 64
MESSAGES = [{"role": "user", "content": "What does a ledger record?"}]


@pytest.fixture
def client() -> anthropic.Anthropic:
    # No SDK retries: a retry would hide what the gateway answered the first time.
    return anthropic.Anthropic(base_url=URL, api_key=KEY, max_retries=0)


def test_non_streaming_is_charged_exactly_what_usage_and_prices_say(client):
    before = balance()
    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=MAX_TOKENS, messages=MESSAGES)
    message = raw.parse()

    assert message.content[0].text == MOCK_TOKEN * MOCK_TOKENS_DEFAULT
    assert message.usage is not None
    assert message.usage.output_tokens == MOCK_TOKENS_DEFAULT
    assert message.usage.input_tokens > 0

    request_id = raw.headers["x-request-id"]
    cost = Decimal(raw.headers["x-tollgate-cost"])
    assert cost == anthropic_cost(message.usage)
    after = balance()
    assert before - after == cost
    assert Decimal(raw.headers["x-tollgate-balance"]) == after
    [row] = usage_rows(request_id)
    assert Decimal(row["cost"]) == cost
    assert_quiet_and_conserved()


def test_streaming_final_message_carries_usage_and_is_charged_exactly(client):
    before = balance()
    with client.messages.stream(model=MODEL, max_tokens=MAX_TOKENS, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()

    assert text == MOCK_TOKEN * MOCK_TOKENS_DEFAULT
    assert message.content[0].text == text
    assert message.usage.output_tokens == MOCK_TOKENS_DEFAULT
    assert message.usage.input_tokens > 0
    assert before - balance() == anthropic_cost(message.usage)
    assert_quiet_and_conserved()


def test_streaming_output_is_capped_by_max_tokens_and_so_is_the_charge(client):
    before = balance()
    with client.messages.stream(model=MODEL, max_tokens=10, messages=MESSAGES) as stream:
        message = stream.get_final_message()

    assert message.content[0].text == MOCK_TOKEN * 10
    assert message.usage.output_tokens == 10
    assert before - balance() == anthropic_cost(message.usage)


TOOLS = [
    {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]


def test_a_forced_tool_use_comes_back_as_a_tool_use_block_and_is_charged_exactly(client):
    before = balance()
    raw = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=MAX_TOKENS, messages=MESSAGES, tools=TOOLS, tool_choice={"type": "any"}
    )
    message = raw.parse()
    assert message.stop_reason == "tool_use"
    [block] = message.content
    assert block.type == "tool_use"
    assert block.name == "get_weather"
    cost = Decimal(raw.headers["x-tollgate-cost"])
    assert cost == anthropic_cost(message.usage)
    assert before - balance() == cost
    assert_quiet_and_conserved()


def test_cache_reads_and_writes_are_each_priced(client):
    # The mock reports part of the prompt as read from the cache and part as written to it.
    before = balance()
    raw = client.messages.with_raw_response.create(
        model=MODEL,
        max_tokens=MAX_TOKENS,
        messages=MESSAGES,
        extra_body={"mock": {"cached_tokens": 4, "cache_write_tokens": 3}},
    )
    usage = raw.parse().usage
    assert usage.cache_read_input_tokens == 4
    assert usage.cache_creation_input_tokens == 3
    cost = Decimal(raw.headers["x-tollgate-cost"])
    assert cost == anthropic_cost(usage)
    assert cost != expected_cost(usage.input_tokens + 7, usage.output_tokens), "cache tokens have prices of their own"
    assert before - balance() == cost
    [row] = usage_rows(raw.headers["x-request-id"])
    assert row["usage"]["cached_input_tokens"] == 4
    assert row["usage"]["cache_write_tokens"] == 3
    assert_quiet_and_conserved()


def test_streaming_with_cache_usage_is_charged_exactly(client):
    before = balance()
    with client.messages.stream(
        model=MODEL,
        max_tokens=MAX_TOKENS,
        messages=MESSAGES,
        extra_body={"mock": {"cached_tokens": 4, "cache_write_tokens": 3}},
    ) as stream:
        message = stream.get_final_message()
    assert message.usage.cache_read_input_tokens == 4
    assert message.usage.cache_creation_input_tokens == 3
    assert before - balance() == anthropic_cost(message.usage)
    assert_quiet_and_conserved()


def test_a_wrong_key_is_an_authentication_error_and_charges_nothing():
    before = balance()
    bad = anthropic.Anthropic(base_url=URL, api_key="tg_wrong_key_0000000000000000", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as error:
        bad.messages.create(model=MODEL, max_tokens=MAX_TOKENS, messages=MESSAGES)
    assert error.value.status_code == 401
    assert error.value.body["error"]["type"] == "authentication_error"
    assert balance() == before


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(anthropic.NotFoundError) as error:
        client.messages.create(model="no-such-model", max_tokens=MAX_TOKENS, messages=MESSAGES)
    assert error.value.status_code == 404
