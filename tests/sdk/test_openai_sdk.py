"""The official openai SDK against `tollgate serve --demo` (mock upstream behind it).

Every call must work exactly as it would against OpenAI, and be charged exactly what its usage and
the demo prices say: the balance drops by X-Tollgate-Cost, to the unit, once per request id.
"""

import uuid
from decimal import Decimal

import openai
import pytest

from conftest import (
    KEY,
    MOCK_TOKEN,
    MOCK_TOKENS_DEFAULT,
    URL,
    assert_quiet_and_conserved,
    balance,
    expected_cost,
    openai_cost,
    usage_rows,
)

MODEL = "demo-gpt"
MESSAGES = [{"role": "user", "content": "What does a ledger record?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture
def client() -> openai.OpenAI:
    # No SDK retries: a retry would hide what the gateway answered the first time.
    return openai.OpenAI(base_url=URL + "/v1", api_key=KEY, max_retries=0)


def test_non_streaming_is_charged_exactly_what_usage_and_prices_say(client):
    before = balance()
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES)
    completion = raw.parse()

    assert completion.choices[0].message.content == MOCK_TOKEN * MOCK_TOKENS_DEFAULT
    usage = completion.usage
    assert usage is not None
    assert usage.completion_tokens == MOCK_TOKENS_DEFAULT
    assert usage.prompt_tokens > 0

    request_id = raw.headers["x-request-id"]
    assert request_id
    cost = Decimal(raw.headers["x-tollgate-cost"])
    assert cost == openai_cost(usage)
    after = balance()
    assert before - after == cost
    assert Decimal(raw.headers["x-tollgate-balance"]) == after

    [row] = usage_rows(request_id)
    assert Decimal(row["cost"]) == cost
    assert row["usage_source"] == "upstream"
    assert Decimal(row["balance_before"]) - Decimal(row["balance_after"]) == cost
    assert_quiet_and_conserved()


def test_streaming_with_include_usage_ends_with_the_usage_chunk_and_is_charged_exactly(client):
    before = balance()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    request_id = raw.headers["x-request-id"]
    assert request_id
    chunks = list(raw.parse())

    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content == MOCK_TOKEN * MOCK_TOKENS_DEFAULT
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None, "the usage chunk comes last, with no choices"
    assert last.usage.completion_tokens == MOCK_TOKENS_DEFAULT
    cost = openai_cost(last.usage)
    assert before - balance() == cost

    [row] = usage_rows(request_id)
    assert Decimal(row["cost"]) == cost
    assert_quiet_and_conserved()


def test_streaming_without_include_usage_hides_the_injected_usage_chunk(client):
    # The gateway asks the upstream for usage anyway; the client must not see that extra chunk.
    # The same prompt gives the same usage, so measure it first with include_usage.
    reference = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )[-1].usage
    before = balance()
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))

    assert chunks, "the stream has chunks"
    assert all(chunk.choices != [] for chunk in chunks), "no usage-only chunk reaches a client that did not ask"
    assert all(chunk.usage is None for chunk in chunks)
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert content == MOCK_TOKEN * MOCK_TOKENS_DEFAULT
    assert before - balance() == openai_cost(reference)
    assert_quiet_and_conserved()


def test_max_tokens_caps_the_output_and_the_charge(client):
    before = balance()
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=5)
    completion = raw.parse()
    assert completion.choices[0].message.content == MOCK_TOKEN * 5
    assert completion.usage.completion_tokens == 5
    cost = Decimal(raw.headers["x-tollgate-cost"])
    assert cost == openai_cost(completion.usage)
    assert before - balance() == cost


def test_tools_pass_through_and_are_charged(client):
    before = balance()
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, tools=TOOLS)
    completion = raw.parse()
    assert completion.choices
    assert completion.usage is not None
    cost = Decimal(raw.headers["x-tollgate-cost"])
    assert cost == openai_cost(completion.usage)
    assert before - balance() == cost


def test_a_forced_tool_call_comes_back_as_tool_calls_and_is_charged_exactly(client):
    before = balance()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    completion = raw.parse()
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert call.type == "function"
    cost = Decimal(raw.headers["x-tollgate-cost"])
    assert cost == openai_cost(completion.usage)
    assert before - balance() == cost
    assert_quiet_and_conserved()


def test_cached_and_reasoning_tokens_are_priced_apart(client):
    # The mock reports 5 prompt tokens as cached and 6 of the completion as reasoning (OpenAI
    # counts reasoning inside completion_tokens, priced as output).
    before = balance()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, extra_body={"mock": {"cached_tokens": 5, "thoughts_tokens": 6}}
    )
    usage = raw.parse().usage
    assert usage.prompt_tokens_details.cached_tokens == 5
    assert usage.completion_tokens_details.reasoning_tokens == 6
    cost = Decimal(raw.headers["x-tollgate-cost"])
    assert cost == openai_cost(usage)
    assert cost < expected_cost(usage.prompt_tokens, usage.completion_tokens), "cached tokens cost less"
    assert before - balance() == cost
    [row] = usage_rows(raw.headers["x-request-id"])
    assert row["usage"]["cached_input_tokens"] == 5
    assert_quiet_and_conserved()


def test_embeddings_are_charged_by_input_tokens(client):
    before = balance()
    raw = client.embeddings.with_raw_response.create(model="demo-embedding", input=["a ledger", "records money"])
    response = raw.parse()
    assert len(response.data) == 2
    assert len(response.data[0].embedding) > 0
    assert response.usage.prompt_tokens > 0
    cost = Decimal(raw.headers["x-tollgate-cost"])
    assert cost == expected_cost(response.usage.prompt_tokens, 0)
    assert before - balance() == cost
    assert_quiet_and_conserved()


def test_a_wrong_key_is_an_authentication_error_and_charges_nothing():
    before = balance()
    bad = openai.OpenAI(base_url=URL + "/v1", api_key="tg_wrong_key_0000000000000000", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as error:
        bad.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert error.value.status_code == 401
    assert error.value.code == "invalid_api_key"
    assert error.value.response.headers["x-request-id"]
    assert balance() == before


def test_an_unknown_model_is_not_found_and_charges_nothing(client):
    before = balance()
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert error.value.status_code == 404
    assert error.value.code == "model_not_found"
    assert balance() == before


def test_a_retry_with_the_same_request_id_is_replayed_not_charged(client):
    request_id = f"sdk-{uuid.uuid4()}"
    headers = {"X-Request-ID": request_id}
    before = balance()

    first = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, extra_headers=headers)
    cost = Decimal(first.headers["x-tollgate-cost"])
    assert first.headers["x-request-id"] == request_id
    assert first.headers.get("idempotent-replayed") is None
    after_first = balance()
    assert before - after_first == cost

    second = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, extra_headers=headers)
    assert second.headers["idempotent-replayed"] == "true"
    assert second.parse().id == first.parse().id
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert balance() == after_first, "the replay is not charged"
    assert len(usage_rows(request_id)) == 1
    assert_quiet_and_conserved()


def test_a_streaming_retry_of_a_succeeded_request_id_is_a_conflict(client):
    request_id = f"sdk-{uuid.uuid4()}"
    headers = {"X-Request-ID": request_id}
    list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, extra_headers=headers))
    after_first = balance()

    with pytest.raises(openai.ConflictError) as error:
        list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, extra_headers=headers))
    assert error.value.status_code == 409
    assert error.value.code == "duplicate_request"
    assert balance() == after_first
    assert len(usage_rows(request_id)) == 1


def test_models_lists_the_demo_models(client):
    ids = {model.id for model in client.models.list()}
    assert {"demo-gpt", "demo-claude"} <= ids
