"""The web console in headless Chromium against `tollgate serve --demo`.

One operator's afternoon and one customer's look, each step checked against the API: the page
must show exactly what the API answers (money as the API's decimal string, to the last digit),
and what the page does must be what the API then reports.

Run (scripts/test does this after the SDK phases):

    TOLLGATE_URL=… TOLLGATE_KEY=… TOLLGATE_ADMIN_TOKEN=… python -m pytest -q tests/browser

With CONSOLE_SCREENSHOTS=docs/console it also saves the pages' screenshots there.
"""

import re
import secrets
import time

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from conftest import (
    ADMIN_TOKEN,
    KEY,
    URL,
    ApiError,
    admin_get,
    call,
    chat,
    find,
    message,
    ready,
    screenshot,
    text_becomes,
    wait,
)

# Nine fractional digits, the most money has: the page must show every one of them.
TOP_UP_AMOUNT = "12.345678901"
# After a second top-up of one nano-unit, left pending and confirmed from the page's list.
FUNDED = "12.345678902"


def login(driver, role: str, secret: str) -> None:
    find(driver, "#login-form")
    driver.find_element(By.ID, f"login-role-{role}").click()
    field = driver.find_element(By.ID, "login-secret")
    field.clear()
    field.send_keys(secret)
    driver.find_element(By.ID, "login-submit").click()


def logout(driver) -> None:
    find(driver, "#logout").click()
    find(driver, "#login-form")
    assert driver.execute_script("return sessionStorage.length") == 0


def statement_rows_shown(driver) -> list[tuple[str, str, str, str]]:
    """The statement table as (kind, reference, amount, balance after), in page order."""
    rows = driver.find_elements(By.CSS_SELECTOR, '[data-test="statement-table"] tr[data-test="statement-row"]')
    return [
        (
            row.get_attribute("data-kind"),
            row.get_attribute("data-ref"),
            row.find_element(By.CSS_SELECTOR, 'td[data-field="amount"]').text,
            row.find_element(By.CSS_SELECTOR, 'td[data-field="balance_after"]').text,
        )
        for row in rows
    ]


def statement_rows_api(statement: dict) -> list[tuple[str, str, str, str]]:
    return [
        (row["kind"], row.get("reference_id") or row.get("request_id") or "", row["amount"], row["balance_after"])
        for row in statement["rows"]
    ]


def statement_period(driver) -> tuple[str, str]:
    """The [start, end) the page asked its statement for (kept on the table)."""
    table = find(driver, '[data-test="statement-table"]')
    return table.get_attribute("data-start"), table.get_attribute("data-end")


def summary_period(driver) -> tuple[str, str]:
    """The [start, end) the page asked its usage summary for (kept on the table's holder)."""
    holder = find(driver, '[data-test="me-summary-table"]')
    return holder.get_attribute("data-start"), holder.get_attribute("data-end")


def summary_rows_shown(driver) -> list[tuple[str, ...]]:
    """The usage summary's rows as (each dimension shown…, cost)."""
    cells = 'td[data-field="day"], td[data-field="model"], td[data-field="key"], td[data-field="cost"]'
    return [
        tuple(cell.text for cell in row.find_elements(By.CSS_SELECTOR, cells))
        for row in driver.find_elements(By.CSS_SELECTOR, '[data-test="me-summary"] tr[data-test="summary-row"]')
    ]


def chart_shown(driver) -> tuple[list[tuple[str, str]], set[str]]:
    """The usage chart's segments as (model, value) and the models its legend names."""
    chart = find(driver, 'svg[data-test="usage-chart"]')
    assert chart.get_attribute("role") == "img"
    assert chart.get_attribute("aria-label")
    segments = sorted(
        (rect.get_attribute("data-series"), rect.get_attribute("data-value"))
        for rect in chart.find_elements(By.CSS_SELECTOR, "rect.chart-segment")
    )
    legend = {
        item.get_attribute("data-series") for item in chart.find_elements(By.CSS_SELECTOR, '[data-test="legend-item"]')
    }
    legend_text = {item.text for item in chart.find_elements(By.CSS_SELECTOR, '[data-test="legend-item"] text')}
    assert legend == legend_text
    return segments, legend


def stats_equal(driver, prefix: str, state: dict, fields: tuple[str, ...]) -> None:
    for name in fields:
        text_becomes(driver, f"#{prefix}-{name.replace('_', '-')}", state[name])


def test_operator_flow(driver):
    # 1. `/` lands on the console's login; the admin token logs in.
    driver.get(URL + "/")
    find(driver, "#login-form")
    assert driver.current_url == URL + "/console/#/login"
    screenshot(driver, "login")
    login(driver, "operator", ADMIN_TOKEN)
    ready(driver, "accounts-list")
    assert driver.current_url.endswith("#/accounts")
    assert driver.execute_script("return sessionStorage.getItem('tollgate.console.secret')") == ADMIN_TOKEN
    assert driver.execute_script("return localStorage.length") == 0

    # 2. A new account through the form, then found through the search.
    marker = secrets.token_hex(4)
    account_id = f"browser-{marker}"
    find(driver, "#new-account-toggle").click()
    find(driver, "#new-account-id").send_keys(account_id)
    driver.find_element(By.ID, "new-account-name").send_keys(f"Browser Test {marker}")
    driver.find_element(By.CSS_SELECTOR, '#new-account-kind option[value="tenant"]').click()
    tier = driver.find_element(By.ID, "new-account-tier")
    assert tier.get_attribute("value") == "standard"
    driver.find_element(By.ID, "new-account-submit").click()
    wait(driver, lambda browser: account_id in browser.find_element(By.ID, "notice").text, "the account-created notice")
    account = admin_get(f"/internal/accounts/{account_id}")
    assert (account["name"], account["kind"], account["customer_type"]) == (
        f"Browser Test {marker}",
        "tenant",
        "standard",
    )
    ready(driver, "accounts-list")
    screenshot(driver, "accounts")

    search = find(driver, "#accounts-search")
    search.clear()
    search.send_keys(marker.upper(), Keys.ENTER)  # q matches case-insensitively
    wait(
        driver,
        lambda browser: (
            [
                row.get_attribute("data-id")
                for row in browser.find_elements(By.CSS_SELECTOR, '[data-test="account-row"]')
            ]
            == [account_id]
        ),
        "the search to list the new account alone",
    )
    listed = admin_get(f"/internal/accounts?q={marker.upper()}")["data"]
    assert [entry["id"] for entry in listed] == [account_id]
    row = driver.find_element(By.CSS_SELECTOR, f'[data-test="account-row"][data-id="{account_id}"]')
    for name in ("name", "customer_type", "balance", "held", "available"):
        assert row.find_element(By.CSS_SELECTOR, f'td[data-field="{name}"]').text == listed[0][name], name
    assert row.find_element(By.CSS_SELECTOR, 'td[data-field="status"]').text == listed[0]["status"]

    # 3. Top-up, in two visible steps: created pending (no money yet), then confirmed.
    row.find_element(By.CSS_SELECTOR, '[data-test="account-link"]').click()
    ready(driver, "account-stats")
    text_becomes(driver, "#account-balance", "0")
    find(driver, "#topup-amount").send_keys(TOP_UP_AMOUNT)
    reference = driver.find_element(By.ID, "topup-reference").get_attribute("value")
    assert re.fullmatch(r"topup-\d{8}-[0-9a-f]{12}", reference), reference
    driver.find_element(By.ID, "topup-create").click()
    pending = find(driver, '[data-test="topup-pending"]')
    topup_id = pending.get_attribute("data-id")
    assert "pending" in pending.text
    assert driver.find_element(By.CSS_SELECTOR, '[data-test="topup-pending-amount"]').text == TOP_UP_AMOUNT
    assert admin_get(f"/internal/accounts/{account_id}")["balance"] == "0"
    driver.find_element(By.ID, "topup-confirm").click()
    find(driver, '[data-test="topup-confirmed"]')
    account = admin_get(f"/internal/accounts/{account_id}")
    assert account["balance"] == TOP_UP_AMOUNT
    ready(driver, "account-stats")
    stats_equal(driver, "account", account, ("balance", "held", "available", "ledger_balance"))
    # The confirm is idempotent: confirming again changes nothing.
    call("POST", f"/internal/topups/{topup_id}/confirm", ADMIN_TOKEN)
    assert admin_get(f"/internal/accounts/{account_id}")["balance"] == TOP_UP_AMOUNT
    # A fresh reference is ready for the next top-up.
    assert driver.find_element(By.ID, "topup-reference").get_attribute("value") != reference

    # A top-up created elsewhere and left pending is listed on the page and confirmed there.
    left = call("POST", "/internal/topups", ADMIN_TOKEN, {"account_id": account_id, "amount": "0.000000001", "reference_id": f"left-{marker}"})
    assert [entry["id"] for entry in admin_get(f"/internal/topups?account_id={account_id}&status=pending")["data"]] == [left["id"]]
    driver.refresh()
    ready(driver, "account-stats")
    listed = find(driver, f'[data-test="topups-pending"] [data-test="topup-pending"][data-id="{left["id"]}"]')
    assert listed.find_element(By.CSS_SELECTOR, '[data-test="topup-pending-amount"]').text == "0.000000001"
    driver.find_element(By.ID, f"topup-confirm-{left['id']}").click()
    find(driver, '[data-test="topups-pending"] [data-test="topup-confirmed"]')
    assert admin_get(f"/internal/topups?account_id={account_id}&status=pending")["data"] == []
    account = admin_get(f"/internal/accounts/{account_id}")
    assert account["balance"] == FUNDED
    ready(driver, "account-stats")
    stats_equal(driver, "account", account, ("balance", "held", "available", "ledger_balance"))

    # A refund beyond the free funds: refused, and the banner says what the API said.
    with pytest.raises(ApiError) as refused:
        call(
            "POST",
            f"/internal/accounts/{account_id}/refunds",
            ADMIN_TOKEN,
            {"amount": "1000", "reason": "too much", "reference_id": f"refund-{marker}-api"},
        )
    assert refused.value.status == 402
    driver.find_element(By.ID, "funds-tab-refund").click()
    find(driver, "#refund-amount").send_keys("1000")
    driver.find_element(By.ID, "refund-reason").send_keys("too much")
    driver.find_element(By.ID, "refund-submit").click()
    find(driver, "#banner")
    text_becomes(
        driver,
        "#banner-text",
        f"{refused.value.body['error']['message']} ({refused.value.body['error']['code']}, HTTP 402)",
    )
    assert admin_get(f"/internal/accounts/{account_id}")["balance"] == FUNDED
    driver.find_element(By.ID, "banner-close").click()

    # Suspend (after a confirmation) and activate again: the API's status follows the page.
    find(driver, "#account-status-toggle").click()
    find(driver, '[data-test="confirm-yes"]').click()
    wait(
        driver,
        lambda browser: browser.find_element(By.ID, "account-status").get_attribute("data-status") == "suspended",
        "the account shown suspended",
    )
    assert admin_get(f"/internal/accounts/{account_id}")["status"] == "suspended"
    find(driver, "#account-status-toggle").click()
    wait(
        driver,
        lambda browser: browser.find_element(By.ID, "account-status").get_attribute("data-status") == "active",
        "the account shown active",
    )
    assert admin_get(f"/internal/accounts/{account_id}")["status"] == "active"

    # 4. A key, shown once.
    find(driver, "#create-key-toggle").click()
    find(driver, "#create-key-name").send_keys("browser-key")
    driver.find_element(By.ID, "create-key-budget-daily").send_keys("5")
    driver.find_element(By.ID, "create-key-budget-total").send_keys("10.5")
    driver.find_element(By.ID, "create-key-submit").click()
    box = find(driver, '[data-test="new-key-box"]')
    key = find(driver, "#new-key").text
    assert key.startswith("tg_"), key
    assert "only time it is shown" in box.text
    ready(driver, "account-keys")
    [listed_key] = admin_get(f"/internal/accounts/{account_id}/keys")["data"]
    assert key.startswith(listed_key["prefix"])
    key_row = find(driver, f'[data-test="key-row"][data-id="{listed_key["id"]}"]')
    assert key_row.get_attribute("data-status") == "active"
    assert key_row.find_element(By.CSS_SELECTOR, 'td[data-field="budget_daily"]').text == listed_key["budget_daily"]
    assert key_row.find_element(By.CSS_SELECTOR, 'td[data-field="budget_total"]').text == listed_key["budget_total"]
    assert key_row.find_element(By.CSS_SELECTOR, 'td[data-field="budget_monthly"]').text == "no limit"
    driver.find_element(By.ID, "new-key-dismiss").click()
    wait(driver, lambda browser: key not in browser.page_source, "the key to leave the page once dismissed")

    # 5. Traffic with that key, outside the browser, over both protocols.
    request_ids = [chat(key, "demo-gpt"), chat(key, "demo-gpt"), chat(key, "demo-claude"), message(key, "demo-claude")]

    # 6. Reloaded, the page shows the usage: chart, table by model, statement rows, balance.
    driver.refresh()
    ready(driver, "account-stats")
    account = admin_get(f"/internal/accounts/{account_id}")
    assert account["balance"] != FUNDED
    stats_equal(driver, "account", account, ("balance", "held", "available", "ledger_balance"))
    assert key not in driver.page_source  # not after a reload either

    ready(driver, "account-usage")
    segments, legend = chart_shown(driver)
    assert len(segments) > 0
    assert legend == {"demo-gpt", "demo-claude"}
    start, end = statement_period(driver)
    summary = admin_get(
        f"/internal/billing/summary?account_id={account_id}&start={start}&end={end}&group_by=day,model&limit=100"
    )
    assert segments == sorted((row["model"], row["cost"]) for row in summary["data"])

    ready(driver, "account-by-model")
    by_model = admin_get(
        f"/internal/billing/summary?account_id={account_id}&start={start}&end={end}&group_by=model&limit=100"
    )["data"]
    shown = {
        row.find_element(By.CSS_SELECTOR, 'td[data-field="model"]').text: row.find_element(
            By.CSS_SELECTOR, 'td[data-field="cost"]'
        ).text
        for row in driver.find_elements(By.CSS_SELECTOR, '[data-test="account-by-model"] tr[data-test="summary-row"]')
    }
    assert shown == {row["model"]: row["cost"] for row in by_model}

    ready(driver, "account-statement")
    statement = admin_get(f"/internal/accounts/{account_id}/statement?start={start}&end={end}&format=json")
    assert statement_rows_shown(driver) == statement_rows_api(statement)
    usage_refs = [row[1] for row in statement_rows_shown(driver) if row[0] == "usage"]
    assert sorted(usage_refs) == sorted(request_ids)
    assert driver.find_element(By.CSS_SELECTOR, '[data-test="closing-balance"]').text == statement["closing_balance"]
    screenshot(driver, "account", full_page=True)

    # 7. Revoked in the page (after a confirmation), the key is refused at once.
    key_row = find(driver, f'[data-test="key-row"][data-id="{listed_key["id"]}"]')
    key_row.find_element(By.CSS_SELECTOR, '[data-test="revoke-key"]').click()
    find(driver, '[data-test="confirm-yes"]').click()
    wait(
        driver,
        lambda browser: browser.find_elements(
            By.CSS_SELECTOR, f'[data-test="key-row"][data-id="{listed_key["id"]}"][data-status="revoked"]'
        ),
        "the key row to show it revoked",
    )
    with pytest.raises(ApiError) as refused:
        call(
            "POST",
            "/v1/chat/completions",
            key,
            {"model": "demo-gpt", "messages": [{"role": "user", "content": "Hello"}]},
        )
    assert refused.value.status == 401
    assert refused.value.body["error"]["code"] == "invalid_api_key"

    # Prices: the page lists what GET /internal/prices answers, and one row's history.
    find(driver, '[data-test="nav-prices"]').click()
    ready(driver, "prices-current")
    prices = admin_get("/internal/prices")["data"]
    price_cells = ("input_per_mtok", "output_per_mtok", "per_request")
    shown_prices = sorted(
        (
            row.get_attribute("data-tier"),
            row.get_attribute("data-model"),
            *(row.find_element(By.CSS_SELECTOR, f'td[data-field="{name}"]').text for name in price_cells),
        )
        for row in driver.find_elements(By.CSS_SELECTOR, '[data-test="price-row"]')
    )
    assert shown_prices == sorted(
        (price["customer_type"], price["model"], *(price[name] for name in price_cells)) for price in prices
    )
    find(
        driver,
        '[data-test="price-row"][data-model="demo-gpt"][data-tier="standard"] [data-test="price-history-button"]',
    ).click()
    ready(driver, "price-history")
    history = admin_get("/internal/prices/history?provider=mock&model=demo-gpt&customer_type=standard&limit=100")[
        "data"
    ]
    assert [
        row.get_attribute("data-id") for row in driver.find_elements(By.CSS_SELECTOR, '[data-test="price-history-row"]')
    ] == [str(price["id"]) for price in history]

    # Operations: a reconciliation run from the page is the API's newest run, with its drift.
    find(driver, '[data-test="nav-operations"]').click()
    ready(driver, "reconciliations")
    ready(driver, "jobs")
    ready(driver, "alerts")
    ready(driver, "channels")
    driver.find_element(By.ID, "reconcile-run").click()
    wait(
        driver,
        lambda browser: "Reconciliation run" in browser.find_element(By.ID, "notice").text,
        "the reconciliation's notice",
    )
    ready(driver, "reconciliations")
    newest = admin_get("/internal/reconciliations")["data"][0]
    assert f"Reconciliation run {newest['id']}:" in driver.find_element(By.ID, "notice").text
    first = driver.find_element(By.CSS_SELECTOR, '[data-test="reconciliation-row"]')
    assert first.get_attribute("data-id") == str(newest["id"])
    assert first.find_element(By.CSS_SELECTOR, 'td[data-field="total_drift"]').text == newest["total_drift"]
    alerts = admin_get("/internal/alerts")["data"]
    assert [
        row.get_attribute("data-id") for row in driver.find_elements(By.CSS_SELECTOR, '[data-test="alert-row"]')
    ] == [str(alert["id"]) for alert in alerts[:100]]
    screenshot(driver, "operations")

    logout(driver)


def test_customer_flow(driver, download_dir):
    # Some traffic of the demo key's own, so that its pages have rows to show.
    request_ids = [chat(KEY, "demo-gpt"), chat(KEY, "demo-claude")]

    # 8. The customer logs in with the demo key and sees exactly what /v1/balance says.
    driver.get(URL + "/console/")
    login(driver, "customer", KEY)
    ready(driver, "me-stats")
    assert driver.current_url.endswith("#/me")
    balance = call("GET", "/v1/balance", KEY)
    stats_equal(driver, "me", balance, ("balance", "held", "available"))
    for name in ("daily", "monthly", "total"):
        expected = balance["key"][f"budget_{name}_remaining"]
        assert find(driver, f"#me-budget-{name}").text == (expected if expected is not None else "no limit")
    ready(driver, "me-usage-chart")
    segments, legend = chart_shown(driver)
    assert segments and legend >= {"demo-gpt", "demo-claude"}
    screenshot(driver, "customer")

    # The usage summary (by day and model, then by key) and the newest requests.
    find(driver, '[data-test="nav-usage"]').click()
    ready(driver, "me-summary")
    start, end = summary_period(driver)
    ready(driver, "me-recent")
    # Each row's request, model, cost and balance after, exactly as /v1/usage gives them.
    recent = [
        (
            row.get_attribute("data-request"),
            row.find_element(By.CSS_SELECTOR, 'td[data-field="model"]').text,
            row.find_element(By.CSS_SELECTOR, 'td[data-field="cost"]').text,
            row.find_element(By.CSS_SELECTOR, 'td[data-field="balance_after"]').text,
        )
        for row in driver.find_elements(By.CSS_SELECTOR, '[data-test="usage-row"]')
    ]
    api_recent = [
        (row["request_id"], row["model"], row["cost"], row["balance_after"])
        for row in call("GET", f"/v1/usage?limit=25&start={start}&end={end}", KEY)["data"]
    ]
    assert recent == api_recent
    assert set(request_ids) <= {row[0] for row in recent}

    by_day_model = call("GET", f"/v1/usage/summary?group_by=day,model&limit=50&start={start}&end={end}", KEY)["data"]
    assert summary_rows_shown(driver) == [(row["day"], row["model"], row["cost"]) for row in by_day_model]
    driver.find_element(By.CSS_SELECTOR, '#usage-group-by option[value="day,key"]').click()
    wait(
        driver,
        lambda browser: browser.find_elements(By.CSS_SELECTOR, '[data-test="me-summary"] td[data-field="key"]'),
        "the summary by key",
    )
    ready(driver, "me-summary")
    by_day_key = call("GET", f"/v1/usage/summary?group_by=day,key&limit=50&start={start}&end={end}", KEY)["data"]
    assert summary_rows_shown(driver) == [(row["day"], row["api_key_id"], row["cost"]) for row in by_day_key]

    # The statement, and its CSV saved through the browser.
    find(driver, '[data-test="nav-statement"]').click()
    ready(driver, "me-statement")
    start, end = statement_period(driver)
    statement = call("GET", f"/v1/statement?start={start}&end={end}&format=json", KEY)
    assert statement_rows_shown(driver) == statement_rows_api(statement)
    assert set(request_ids) <= {row[1] for row in statement_rows_shown(driver)}
    csv_api = call("GET", f"/v1/statement?start={start}&end={end}&format=csv", KEY, raw=True)
    find(driver, "#statement-csv").click()
    note = find(driver, '[data-test="statement-csv-note"]')
    wait(driver, lambda _: note.text.startswith("Saved "), "the CSV to be fetched")
    saved = download_dir / note.get_attribute("data-filename")
    deadline = time.monotonic() + 15
    while not saved.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert saved.exists(), sorted(download_dir.iterdir())
    text = saved.read_text()
    assert text.splitlines()[0] == csv_api.splitlines()[0]
    assert text.splitlines()[0].startswith("ledger_seq,kind,amount,")
    assert text == csv_api

    # The account's keys, with their budgets, and never a secret.
    find(driver, '[data-test="nav-keys"]').click()
    ready(driver, "me-keys")
    keys = call("GET", "/v1/keys", KEY)["data"]
    assert [row.get_attribute("data-id") for row in driver.find_elements(By.CSS_SELECTOR, '[data-test="key-row"]')] == [
        k["id"] for k in keys
    ]
    assert all("key" not in entry for entry in keys)
    assert KEY not in driver.find_element(By.TAG_NAME, "main").text

    logout(driver)


def test_wrong_admin_token_is_refused_with_the_apis_message(driver):
    # 9. A wrong token shows the API's own message and logs nobody in.
    wrong = "not-the-admin-token-" + secrets.token_hex(8)
    with pytest.raises(ApiError) as refused:
        call("GET", "/internal/accounts?limit=1", wrong)
    expected = refused.value.body["error"]["message"]
    driver.get(URL + "/console/")
    login(driver, "operator", wrong)
    error = find(driver, "#login-error")
    assert error.text == expected
    assert driver.current_url.endswith("#/login")
    assert driver.execute_script("return sessionStorage.length") == 0
    # The same for a customer's unknown key.
    with pytest.raises(ApiError) as refused:
        call("GET", "/v1/balance", "tg_" + secrets.token_hex(20))
    login(driver, "customer", "tg_" + secrets.token_hex(20))
    wait(
        driver,
        lambda browser: browser.find_element(By.ID, "login-error").text == refused.value.body["error"]["message"],
        "the key's error message",
    )
    assert driver.execute_script("return sessionStorage.length") == 0
