"""The HTTP intake over real HTTP: CapMonster-compatible reports from a published client
and from curl, bulk JSON, bad input, tokens, caps, fuzzing, and the status page."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
import requests
from click.testing import CliRunner
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from worker.cli import main
from worker.intake import Intake
from worker.settings import Settings
from worker.testing.processes import free_port
from worker.testing.sandbox import Sandbox

from .chromium_support import CHROMIUM, CHROMIUM_FLAGS
from .conftest import CLIENT_KEY, Service, queue_length, running_worker, wait_until
from .intake_support import Server

IMAGE = "/reportIncorrectImageCaptcha"
TOKEN = "intake-token-abc"


@pytest.fixture
def intake(settings: Settings, env: dict[str, str]) -> Iterator[Server]:
    with Server(Intake(settings, settings.redis_url, environ=env)) as server:
        yield server


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def post(http: requests.Session, url: str, body: Any, **kw: Any) -> requests.Response:
    return http.post(url, json=body, timeout=10, **kw)


def test_unmodified_third_party_client_gets_success_and_the_report_reaches_the_api(
    intake: Server, settings: Settings, env: dict[str, str], sandbox: Sandbox
) -> None:
    """python-anticaptcha (a published client of this protocol, with report calls), given
    only the intake's address, reports image and reCAPTCHA tasks; both reach the API."""
    from python_anticaptcha import AnticaptchaClient

    client = AnticaptchaClient(CLIENT_KEY, host=f"127.0.0.1:{intake.port}", use_ssl=False)
    with client:
        assert client.reportIncorrectImage(424242) is True
        assert client.reportIncorrectRecaptcha(434343) is True
    with running_worker(settings, env):
        wait_until(lambda: sandbox.count() == 2)
    seen = {r.task_id: r for r in sandbox.requests()}
    assert "/reportIncorrectImageCaptcha" == seen[424242].path
    assert "/reportIncorrectTokenCaptcha" == seen[434343].path
    assert {"clientKey": CLIENT_KEY, "taskId": 424242} == json.loads(seen[424242].body)


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on this machine")
def test_plain_curl_reports_successfully(intake: Server, redis_client: redis.Redis) -> None:
    """curl with a JSON body gets the API's success answer and the report is queued."""
    body = json.dumps({"clientKey": CLIENT_KEY, "taskId": 555})
    out = subprocess.run(
        [
            "curl",
            "-s",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            intake.url + "/reportIncorrectHcaptcha",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    assert {"errorId": 0, "status": "success"} == json.loads(out)
    assert b"hcaptcha" == redis_client.hget("rf:r:default:555", "t")


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b'{"clientKey": "nope", "taskId": 5}', {}, 200, "ERROR_KEY_DOES_NOT_EXIST"),
        (b"{not json", {}, 400, "ERROR_INVALID_JSON"),
        (b"[1, 2]", {}, 400, "ERROR_INVALID_JSON"),
        (json.dumps({"clientKey": CLIENT_KEY}).encode(), {}, 400, "ERROR_NO_SUCH_CAPCHA_ID"),
        (
            json.dumps({"clientKey": CLIENT_KEY, "taskId": -4}).encode(),
            {},
            400,
            "ERROR_NO_SUCH_CAPCHA_ID",
        ),
        (
            json.dumps({"clientKey": CLIENT_KEY, "taskId": "x"}).encode(),
            {},
            400,
            "ERROR_NO_SUCH_CAPCHA_ID",
        ),
        (
            json.dumps({"clientKey": CLIENT_KEY, "taskId": 5}).encode(),
            {"Content-Type": "text/plain"},
            415,
            "ERROR_UNSUPPORTED_CONTENT_TYPE",
        ),
        (b"{" + b" " * 20000 + b"}", {}, 413, "ERROR_BODY_TOO_LARGE"),
    ],
    ids=[
        "unknown-key",
        "malformed",
        "not-object",
        "no-task-id",
        "negative",
        "string-id",
        "content-type",
        "oversized",
    ],
)
def test_bad_requests_get_clear_4xx_answers_and_nothing_is_queued(
    intake: Server,
    http: requests.Session,
    redis_client: redis.Redis,
    body: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    """Each bad request gets errorId 1, a descriptive code, the expected status, no key echo."""
    sent = {"Content-Type": "application/json", **headers}
    response = http.post(intake.url + IMAGE, data=body, headers=sent, timeout=10)
    assert status == response.status_code
    doc = response.json()
    assert (1, code) == (doc["errorId"], doc["errorCode"])
    assert doc["errorDescription"]
    assert CLIENT_KEY not in response.text
    assert 0 == queue_length(redis_client)


def test_wrong_method_and_unknown_path(intake: Server, http: requests.Session) -> None:
    """GET on a report path is 405; an unknown path is 404 ERROR_NO_SUCH_METHOD."""
    assert 405 == http.get(intake.url + IMAGE, timeout=10).status_code
    response = post(http, intake.url + "/createTask", {"clientKey": CLIENT_KEY})
    assert (404, "ERROR_NO_SUCH_METHOD") == (response.status_code, response.json()["errorCode"])


def test_bulk_endpoint_takes_an_array_or_json_lines(
    intake: Server, http: requests.Session, redis_client: redis.Redis
) -> None:
    """POST /v1/reports answers how many were queued and, per refused item, index and why."""
    items = [
        {"taskId": 1, "captchaType": "image"},
        {"taskId": 0, "captchaType": "image"},
        {"taskId": 2, "captchaType": "Nope"},
        {"taskId": 3, "captchaType": "token"},
    ]
    doc = post(http, intake.url + "/v1/reports", items).json()
    assert (2, 0, [1, 2]) == (
        doc["queued"],
        doc["duplicates"],
        [r["index"] for r in doc["refused"]],
    )
    assert "unknown captchaType 'Nope'" in doc["refused"][1]["error"]
    lines = "\n".join(json.dumps({"taskId": n, "captchaType": "image"}) for n in (3, 4, 5))
    response = http.post(
        intake.url + "/v1/reports",
        data=lines,
        headers={"Content-Type": "application/x-ndjson"},
        timeout=10,
    )
    assert {"queued": 2, "duplicates": 1, "refused": []} == response.json()
    assert 4 == queue_length(redis_client)


def test_health_and_metrics(intake: Server, http: requests.Session) -> None:
    """/healthz reports Redis and the queue depth; /metrics parses as Prometheus text."""
    post(http, intake.url + IMAGE, {"clientKey": CLIENT_KEY, "taskId": 9})
    assert {"status": "ok", "redis": "ok", "queue_depth": 1} == http.get(
        intake.url + "/healthz", timeout=10
    ).json()
    text = http.get(intake.url + "/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = families["report_forwarder_intake_requests"].samples
    assert any(s.labels == {"route": IMAGE, "status": "200"} and s.value == 1 for s in samples)
    assert 1 == families["report_forwarder_pending_reports"].samples[0].value


def test_token_guards_the_operator_routes_not_the_report_routes(
    settings: Settings, env: dict[str, str], http: requests.Session
) -> None:
    """With a token, /v1/* and the status page need it (bearer or ?token=); the report
    routes are authenticated by the clientKey as at the real API."""
    with Server(Intake(settings, settings.redis_url, environ=env, token=TOKEN)) as server:
        items = [{"taskId": 1, "captchaType": "image"}]
        assert 401 == post(http, server.url + "/v1/reports", items).status_code
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert 200 == post(http, server.url + "/v1/reports", items, headers=bearer).status_code
        assert 401 == http.get(server.url + "/", timeout=10).status_code
        assert 200 == http.get(server.url + f"/?token={TOKEN}", timeout=10).status_code
        report = post(http, server.url + IMAGE, {"clientKey": CLIENT_KEY, "taskId": 2})
        assert 0 == report.json()["errorId"]
        assert TOKEN not in http.get(server.url + "/healthz", timeout=10).text


def test_serving_beyond_loopback_needs_a_token(env: dict[str, str]) -> None:
    """`serve --host 0.0.0.0` without a token refuses to start, saying what to set."""
    result = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0"], env=env)  # noqa: S104
    assert 2 == result.exit_code
    assert "REPORT_FORWARDER_INTAKE_TOKEN" in result.output


@pytest.mark.parametrize("token", ["   ", "\t", " \n "], ids=["spaces", "tab", "newline"])
@pytest.mark.parametrize("via", ["option", "env"])
def test_a_blank_token_does_not_open_a_public_bind(
    env: dict[str, str], token: str, via: str
) -> None:
    """A whitespace-only token counts as no token: `serve` on a public address refuses to
    start (usage error, exit 2) and says the token is blank."""
    args = ["serve", "--host", "0.0.0.0", "--port", str(free_port())]  # noqa: S104
    extra = {"REPORT_FORWARDER_INTAKE_TOKEN": token} if via == "env" else {}
    if via == "option":
        args += ["--token", token]
    result = CliRunner().invoke(main, args, env={**env, **extra})
    assert 2 == result.exit_code
    assert "intake token is blank" in result.output


def test_the_token_in_the_query_is_decoded_and_only_opens_the_status_page(
    settings: Settings, env: dict[str, str], http: requests.Session
) -> None:
    """`?token=` is percent-decoded and accepted on the status page only; /v1/*, /metrics
    take the token as `Authorization: Bearer` only."""
    token = "a+b/c=d&e%f é"
    encoded = quote(token, safe="")
    with Server(Intake(settings, settings.redis_url, environ=env, token=token)) as server:
        assert 200 == http.get(f"{server.url}/?token={encoded}", timeout=10).status_code
        assert 401 == http.get(f"{server.url}/?token=a%2Bb", timeout=10).status_code
        for path in ("/v1/stats", "/metrics"):
            response = http.get(f"{server.url}{path}?token={encoded}", timeout=10)
            assert 401 == response.status_code, path
            assert "ERROR_UNAUTHORIZED" == response.json()["errorCode"]
        items = [{"taskId": 1, "captchaType": "image"}]
        response = post(http, f"{server.url}/v1/reports?token={encoded}", items)
        assert 401 == response.status_code
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_bearer_scheme_matches_in_any_case(
    settings: Settings, env: dict[str, str], http: requests.Session, scheme: str
) -> None:
    """`Authorization: bearer …` (any case of the scheme) is accepted; the token itself is
    matched exactly."""
    with Server(Intake(settings, settings.redis_url, environ=env, token=TOKEN)) as server:
        good = {"Authorization": f"{scheme} {TOKEN}"}
        assert 200 == post(http, server.url + "/v1/reports", [], headers=good).status_code
        bad = {"Authorization": f"{scheme} {TOKEN.upper()}"}
        assert 401 == post(http, server.url + "/v1/reports", [], headers=bad).status_code


def test_one_bad_json_line_refuses_that_line_only(
    intake: Server, http: requests.Session, redis_client: redis.Redis
) -> None:
    """In JSON lines, a line that is not JSON is refused with its index, the others are
    queued; a JSON array that is not valid as a whole is still a 400."""
    lines = [
        json.dumps({"taskId": 11, "captchaType": "image"}),
        '{"taskId": 12, "captchaType": ',
        "",
        json.dumps({"taskId": 13, "captchaType": "token"}),
        "\xff\xfe not text",
    ]
    response = http.post(
        intake.url + "/v1/reports",
        data="\n".join(lines).encode("latin-1"),
        headers={"Content-Type": "application/x-ndjson"},
        timeout=10,
    )
    assert 200 == response.status_code
    doc = response.json()
    assert (2, 0) == (doc["queued"], doc["duplicates"])
    assert [1, 3] == [r["index"] for r in doc["refused"]]
    assert "not valid JSON" in doc["refused"][0]["error"]
    assert {"invalid_json": 2} == doc["refused_by_reason"]
    assert 2 == queue_length(redis_client)
    broken = '[{"taskId": 14, "captchaType": "image"},\n{"taskId": 15, "captchaType": ]'
    response = http.post(
        intake.url + "/v1/reports",
        data=broken,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert (400, "ERROR_INVALID_JSON") == (response.status_code, response.json()["errorCode"])
    assert 2 == queue_length(redis_client)


def test_fifty_thousand_refusals_make_a_small_answer(
    intake: Server, http: requests.Session
) -> None:
    """50,000 refused items: the first ones are listed with short errors, all are counted
    by reason, and the accepted type names come once — not 30 names per refusal."""
    items = [{"taskId": n, "captchaType": "Nope"} for n in range(1, 50_001)]
    response = post(http, intake.url + "/v1/reports", items)
    assert 200 == response.status_code
    assert len(response.content) < 200_000
    doc = response.json()
    assert (0, 0) == (doc["queued"], doc["duplicates"])
    assert 50_000 == doc["refused_total"]
    assert {"unknown_captcha_type": 50_000} == doc["refused_by_reason"]
    assert 1000 == len(doc["refused"])
    assert {"index": 0} == {"index": doc["refused"][0]["index"]}
    assert "unknown captchaType 'Nope'" in doc["refused"][0]["error"]
    assert "RecaptchaV2Task" in doc["accepted_captcha_types"]
    assert "RecaptchaV2Task" not in doc["refused"][0]["error"]


def test_client_rate_cap_answers_429(
    settings: Settings, env: dict[str, str], http: requests.Session
) -> None:
    """A client over its request rate gets 429 ERROR_TOO_MUCH_REQUESTS with Retry-After."""
    with Server(Intake(settings, settings.redis_url, environ=env, client_rate=2)) as server:
        codes = [
            post(http, server.url + IMAGE, {"clientKey": CLIENT_KEY, "taskId": n})
            for n in range(1, 12)
        ]
    refused = [r for r in codes if r.status_code == 429]
    assert refused
    assert "ERROR_TOO_MUCH_REQUESTS" == refused[0].json()["errorCode"]
    assert "1" == refused[0].headers["Retry-After"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {
            "clientKey": st.one_of(st.just(CLIENT_KEY), st.text(max_size=20), st.integers()),
            "taskId": json_values,
        }
    ).map(lambda v: json.dumps(v).encode()),
)


@hsettings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(
        [
            IMAGE,
            "/reportIncorrectTokenCaptcha",
            "/reportIncorrectRecaptcha",
            "/v1/reports",
            "/healthz",
            "/nope",
            "/",
        ]
    ),
    method=st.sampled_from(["POST", "GET", "PUT"]),
    content_type=st.sampled_from(
        ["application/json", "text/plain", "", "application/json; charset=utf-8"]
    ),
    body=bodies,
)
def test_fuzzed_requests_never_get_a_5xx_or_a_traceback(
    intake: Server, http: requests.Session, path: str, method: str, content_type: str, body: bytes
) -> None:
    """Any body, path, method and content type: never a 5xx, never a traceback, never the key."""
    headers = {"Content-Type": content_type} if content_type else {}
    response = http.request(method, intake.url + path, data=body, headers=headers, timeout=10)
    assert response.status_code < 500
    assert "Traceback" not in response.text
    if path != "/" and response.headers["content-type"].startswith("application/json"):
        doc = response.json()
        assert isinstance(doc, dict)
    if CLIENT_KEY.encode() not in body:
        assert CLIENT_KEY not in response.text


# the page's own timers run ahead of the clock, so --dump-dom sees it loaded
VIRTUAL_TIME = "--virtual-time-budget=8000"


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium (Debian package `chromium`); .ci/run installs it where apt-get is root",
)
@pytest.mark.timeout(120)
def test_status_page_in_headless_chromium_shows_the_numbers_of_stats_json(
    settings: Settings,
    env: dict[str, str],
    sandbox: Sandbox,
    redis_client: redis.Redis,
    tmp_path: Path,
    service: Service,
) -> None:
    """The page, rendered by Chromium from the intake itself (no CDN), shows the same
    numbers as `stats --json`; a screenshot is kept with the test run."""
    from worker.testing.sandbox import Rule

    sandbox.add_rule(Rule(task_id=3, error_code="ERROR_NO_SUCH_CAPCHA_ID"))
    service.producer.enqueue_many([(n, "image" if n % 2 else "token") for n in range(1, 41)])
    wait_until(lambda: int(redis_client.get("rf:npending") or -1) == 0)
    with Server(Intake(settings, settings.redis_url, environ=env)) as server:
        assert CHROMIUM is not None
        dom = subprocess.run(
            [
                CHROMIUM,
                *CHROMIUM_FLAGS,
                VIRTUAL_TIME,
                f"--user-data-dir={tmp_path / 'c1'}",
                "--dump-dom",
                server.url + "/",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        shot = tmp_path / "status.png"
        subprocess.run(
            [
                CHROMIUM,
                *CHROMIUM_FLAGS,
                VIRTUAL_TIME,
                f"--user-data-dir={tmp_path / 'c2'}",
                "--window-size=1280,900",
                f"--screenshot={shot}",
                server.url + "/",
            ],
            capture_output=True,
            timeout=60,
            check=True,
        )
    stats = json.loads(CliRunner().invoke(main, ["stats", "--json"], env=env).stdout)
    assert 'data-loaded="1"' in dom

    def shown(element: str) -> str:
        match = re.search(rf'id="{element}">([^<]*)<', dom)
        assert match is not None, element
        return match.group(1)

    assert str(stats["dead_letters"]["total"]) == shown("dead-total") == "1"
    assert str(stats["backlog"]["pending_reports"]) == shown("pending") == "0"
    assert str(len(stats["paused_accounts"])) == shown("paused-count")
    accepted = stats["throughput"]["5m"]["by_kind"]
    cells = re.findall(r"<tr><td[^>]*>(\w+)</td><td>(\w+)</td><td[^>]*>(\d+)</td></tr>", dom)
    for outcome, kind, count in cells:
        assert accepted[kind][outcome] == int(count)
    assert {("accepted", "image"), ("accepted", "token"), ("rejected", "image")} <= {
        (o, k) for o, k, _ in cells
    }
    assert "http://" not in dom.split("<script>", 1)[0].replace(server.url, "")  # nothing external
    assert shot.stat().st_size > 10_000
    (Path(__file__).resolve().parents[2] / "bench" / "results").mkdir(exist_ok=True)
    shutil.copy(shot, Path(__file__).resolve().parents[2] / "bench" / "results" / "status-page.png")


LONG_CODE = "ERROR_" + "X" * 52 + "_LIMIT"  # 64 characters with no break: the longest code
TWO_ACCOUNTS = f"""
[delivery]
account_pause_s = 86400
[providers.reseller]
base_url = "https://api.reseller.invalid"
deadline_s = 300
[providers.reseller.endpoints]
image = "/reportIncorrectImageCaptcha"
token = "/reportIncorrectTokenCaptcha"
[providers.reseller.error_codes]
{LONG_CODE} = "account_fault"
[accounts.default]
provider = "capmonster"
key_env = "CAPMONSTER_CLIENT_KEY"
rate_limit = "2000/second"
[accounts.reseller-eu-west-backup]
provider = "reseller"
key_env = "SPARE_KEY"
rate_limit = "2000/second"
"""
SPARE_KEY = "spare-key-not-a-secret"


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium (Debian package `chromium`); .ci/run installs it where apt-get is root",
)
@pytest.mark.timeout(120)
def test_status_page_cards_hold_their_text_from_desktop_to_phone_width(
    make_settings: Callable[..., Settings],
    env: dict[str, str],
    sandbox: Sandbox,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    """With both accounts paused for a day (one for a 64-character error code, also in the
    codes table), no cell or text of any card runs past its card and no card past the
    page, at 1400, 820, 390, 360 or 320 px wide; screenshots at 1400 and 390 px are kept."""
    from worker.testing.sandbox import Rule

    from .chromium_support import OUTSIDE_THEIR_CARDS, RENDERED, Browser

    sandbox.add_rule(Rule(task_id=3, client_key=CLIENT_KEY, error_code="ERROR_ZERO_BALANCE"))
    sandbox.add_rule(Rule(client_key=SPARE_KEY, error_code=LONG_CODE))
    environ = dict(env, SPARE_KEY=SPARE_KEY)
    settings = make_settings(TWO_ACCOUNTS, SPARE_KEY=SPARE_KEY)
    with running_worker(settings, environ) as service:
        reports = [(n, "image" if n % 2 else "token", "default") for n in range(1, 9)]
        reports += [(n, "image", "reseller-eu-west-backup") for n in range(11, 14)]
        service.producer.enqueue_many(reports)
        wait_until(lambda: int(redis_client.get("rf:npending") or -1) == 0)
    found: list[str] = []
    intake = Intake(settings, settings.redis_url, environ=environ)
    with Server(intake) as server, Browser(tmp_path / "chromium") as browser:
        for width in (1400, 820, 390, 360, 320):
            browser.open(server.url + "/", width, 900)
            assert browser.evaluate(RENDERED)
            shown = browser.evaluate("document.getElementById('accounts').innerText")
            assert re.search(rf"paused \({LONG_CODE}, 86\d\d\d s\)", shown), shown
            assert LONG_CODE in browser.evaluate("document.getElementById('codes').innerText")
            if width in (1400, 390):
                browser.screenshot(tmp_path / f"status-{width}.png")
            found += [f"{width} px: {line}" for line in browser.evaluate(OUTSIDE_THEIR_CARDS)]
    assert not found, "\n".join(found)
