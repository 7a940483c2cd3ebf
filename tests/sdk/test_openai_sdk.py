"""The official openai SDK against Tollgate in front of the mock upstream: every call succeeds
as it would against OpenAI, and is charged exactly what its usage and the prices say."""

import uuid
from decimal import Decimal

import openai
import pytest

from conftest import KEY, URL, balance, expected_cost


@pytest.fixture
def client() -> openai.OpenAI:
    return openai.OpenAI(base_url=URL + "/v1", api_key=KEY, max_retries=0)


MESSAGES = [{"role": "user", "content": "What does a ledger record?"}]


def test_non_streaming_charge_is_exact(client):
    before = balance()
    raw = client.chat.completions.with_raw_response.create(model="demo-gpt", messages=MESSAGES)
    completion = raw.parse()
    assert completion.choices[0].message.content == " hello" * 16
    usage = completion.usage
    assert usage.completion_tokens == 16
    cost = Decimal(raw.headers["x-tollgate-cost"])
    assert cost == expected_cost(usage.prompt_tokens, usage.completion_tokens)
    assert raw.headers["x-request-id"]
    after = balance()
    assert before - after == cost
    assert Decimal(raw.headers["x-tollgate-balance"]) == after


def test_streaming_with_usage_is_charged_exactly(client):
    before = balance()
    chunks = list(client.chat.completions.create(
        model="demo-gpt", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == " hello" * 16
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert before - balance() == expected_cost(usage.prompt_tokens, usage.completion_tokens)


def test_streaming_without_usage_hides_the_injected_usage_chunk(client):
    # Same prompt as above, so the same usage; measure it first with include_usage.
    reference = list(client.chat.completions.create(
        model="demo-gpt", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))[-1].usage
    before = balance()
    chunks = list(client.chat.completions.create(model="demo-gpt", messages=MESSAGES, stream=True))
    assert all(chunk.choices for chunk in chunks), "no usage-only chunk reaches a client that did not ask"
    assert before - balance() == expected_cost(reference.prompt_tokens, reference.completion_tokens)


def test_tools_pass_through_and_are_charged(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    before = balance()
    raw = client.chat.completions.with_raw_response.create(model="demo-gpt", messages=MESSAGES, tools=tools)
    completion = raw.parse()
    assert completion.usage.completion_tokens == 16
    cost = Decimal(raw.headers["x-tollgate-cost"])
    assert cost == expected_cost(completion.usage.prompt_tokens, completion.usage.completion_tokens)
    assert before - balance() == cost


def test_a_wrong_key_is_an_authentication_error():
    bad = openai.OpenAI(base_url=URL + "/v1", api_key="tg_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as error:
        bad.chat.completions.create(model="demo-gpt", messages=MESSAGES)
    assert error.value.status_code == 401
    assert error.value.code == "invalid_api_key"


def test_an_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert error.value.code == "model_not_found"


def test_a_retry_with_the_same_request_id_is_replayed_not_charged(client):
    request_id = f"sdk-{uuid.uuid4()}"
    before = balance()
    first = client.chat.completions.with_raw_response.create(
        model="demo-gpt", messages=MESSAGES, extra_headers={"X-Request-ID": request_id})
    cost = Decimal(first.headers["x-tollgate-cost"])
    second = client.chat.completions.with_raw_response.create(
        model="demo-gpt", messages=MESSAGES, extra_headers={"X-Request-ID": request_id})
    assert second.headers["idempotent-replayed"] == "true"
    assert second.parse().id == first.parse().id
    assert before - balance() == cost


def test_models_lists_the_demo_models(client):
    ids = {model.id for model in client.models.list()}
    assert {"demo-gpt", "demo-claude"} <= ids
