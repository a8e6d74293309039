"""mitmweb with the addon, read back through mitmweb's own HTTP API after the official openai client
drove traffic through it: every routed flow shows where the request really went and what it cost,
each failed attempt is a flow of its own, and no secret shows anywhere."""

from __future__ import annotations

import concurrent.futures
import os
import re
import time

import httpx
import openai
import pytest

from conftest import provider_toml
from e2e.conftest import CLIENT_KEY, ROOT, free_port, start_mitmweb

PROXY_LINE = re.compile(r"reverse proxy to \S+ listening at ([0-9.]+):(\d+)")
WEB_TOKEN = "mitmweb-test-token"
CHEAP_KEY = "sk-cheapfail-provider-key-0123456789"
DEAR_KEY = "sk-dear-provider-key-9876543210abcdef"
SCREENSHOT = ROOT / "docs" / "mitmweb-failover.png"
COLUMNS = ("index", "method", "path", "status", "time", "comment")


@pytest.fixture
def mitmweb(start_provider, start_process, tmp_path):
    """mitmweb with arbstr in front of a cheap provider that answers 503 and a dear one that works,
    listening where `[server] listen` says (no --listen-host, no -p)."""
    cheap = start_provider("cheapfail", ["gpt-4o"], 0.001, 0.002, fail_status=503)
    dear = start_provider("dear", ["gpt-4o"], 0.01, 0.02)
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(provider_toml("cheapfail", cheap.url, ["gpt-4o"], 1, 2, api_key=CHEAP_KEY)
                      + provider_toml("dear", dear.url, ["gpt-4o"], 10, 20, api_key=DEAR_KEY)
                      + f'[server]\nlisten = "127.0.0.1:{port}"\n'
                      + '[routing]\nhealth_interval = 0\nfailure_threshold = 100\n'
                      + '[database]\npath = ":memory:"\n')
    web_port = free_port()
    columns = [arg for column in COLUMNS for arg in ("--set", f"web_columns={column}")]
    process = start_mitmweb(start_process, tmp_path, config, web_port, WEB_TOKEN, tuple(columns), listen=(),
                            pattern=re.compile(rf"listening at (127\.0\.0\.1):({port})\b"))
    web = httpx.Client(base_url=f"http://127.0.0.1:{web_port}", timeout=10,
                       headers={"authorization": f"Bearer {WEB_TOKEN}"})
    yield process, web, cheap, dear, port
    web.close()


def drive(port: int) -> None:
    """What a user's app does: a plain and a streamed completion, a model nobody serves, the model list."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=20)
    messages = [{"role": "user", "content": "hi"}]
    assert client.chat.completions.create(model="gpt-4o", messages=messages).choices[0].message.content
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=messages, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=messages)
    assert [m.id for m in client.models.list()] == ["gpt-4o"]


def test_mitmweb_shows_where_each_request_went_what_it_cost_and_every_failed_attempt(mitmweb):
    process, web, cheap, dear, port = mitmweb
    drive(port)
    assert web.get("/options").json()["listen_host"]["value"] == "127.0.0.1"
    flows = web.get("/flows").json()
    routed = [f for f in flows if f["comment"].startswith("gpt-4o → ")]
    failed = [f for f in flows if f["comment"].startswith("cheapfail 503: attempt ")]
    local = [f for f in flows if f["comment"].startswith("arbstr: ")]
    assert (len(routed), len(failed), len(local), len(flows)) == (2, 2, 2, 6), [f["comment"] for f in flows]

    dear_url = f"{dear.url}/chat/completions"
    for flow in routed:
        # short and complete: model, provider, actual cost, saving, who failed first and how
        # (nothing saved: the provider that failed was the cheaper one)
        assert re.fullmatch(r"gpt-4o → dear [0-9.]+ sats after cheapfail 503",
                            flow["comment"]), flow["comment"]
        assert flow["marked"] == "🔄"
        request = flow["request"]
        assert f"{request['scheme']}://{request['host']}:{request['port']}{request['path']}" == dear_url
        headers = dict((name.lower(), value) for name, value in request["headers"])
        # the headers arbstr sent, the provider key masked; none of the client's own
        assert headers["authorization"] == "[provider credential]" and headers["accept-encoding"] == "identity"
        assert headers["content-type"] == "application/json" and headers["user-agent"].startswith("OpenAI/Python")
        assert not any(name.startswith(("x-stainless", "x-arbstr")) for name in headers)
        assert flow["server_conn"]["address"] == [request["host"], request["port"]]
        assert flow["response"]["status_code"] == 200
    plain, streamed = sorted(routed, key=lambda f: f["request"]["timestamp_start"])
    plain_body = web.get(f"/flows/{plain['id']}/response/content.data").content
    assert b'"arbstr_provider": "dear"' in plain_body and b"Hello from dear" in plain_body
    # the stream's body, kept after it passed, as the client got it
    stream_body = web.get(f"/flows/{streamed['id']}/response/content.data").content
    assert stream_body.startswith(b"data: ") and b"data: [DONE]" in stream_body

    cheap_url = f"{cheap.url}/chat/completions"
    for flow in failed:
        # its own flow, marked, naming the client request it served and why it failed
        assert re.fullmatch(r"cheapfail 503: attempt 1 for request [0-9a-f]{12} \(gpt-4o\).*", flow["comment"])
        request = flow["request"]
        assert f"{request['scheme']}://{request['host']}:{request['port']}{request['path']}" == cheap_url
        assert dict(request["headers"])["authorization"] == "[provider credential]"
        assert flow["response"]["status_code"] == 503 and flow["marked"] == "❌"

    for flow in local:
        # answered by arbstr itself: the address the client used, not the reverse placeholder
        assert (flow["request"]["host"], flow["request"]["port"]) == ("127.0.0.1", port)
    known_ports = {port, cheap.port, dear.port}
    for flow in flows:
        assert flow["request"]["port"] in known_ports  # never the stream relay
        assert (flow["server_conn"]["address"] or [None, port])[1] in known_ports
    events = [event["message"] for event in web.get("/events").json()]
    assert any("client connect" in message for message in events)  # mitmproxy's connection lines are kept,
    assert not any("server connect" in m or "server disconnect" in m for m in events)  # its relay ones not
    everything = str(flows) + "".join(web.get(f"/flows/{f['id']}/request/content.data").text for f in flows)
    for secret in (CHEAP_KEY, DEAR_KEY, CLIENT_KEY, "x-arbstr-relay-ticket"):
        assert secret not in everything


def test_a_failover_reads_as_a_sequence_in_the_flow_list(mitmweb, browser, tmp_path):
    """mitmweb's own page in headless chromium: the failed attempt and the answer, each a row with
    its comment. ARBSTR_SCREENSHOT=1 keeps the picture as docs/mitmweb-failover.png (the README's)."""
    process, web, cheap, dear, port = mitmweb
    drive(port)
    page = browser.new_page()
    page.set_viewport_size({"width": 1500, "height": 380})
    page.goto(f"{web.base_url}/?token={WEB_TOKEN}")
    page.wait_for_selector("text=arbstr: local /v1/models")
    rows = [row for row in page.locator(".flow-table tbody tr").all_inner_texts() if row.strip()]  # no spacers
    assert len(rows) == 6
    assert "cheapfail 503: attempt 1 for request" in rows[1] and "503" in rows[1]
    assert re.search(r"gpt-4o → dear [0-9.]+ sats.* after cheapfail 503", rows[0]) and "200" in rows[0]
    # mitmweb gives comments a narrow column; widen it so the picture shows them whole
    page.add_style_tag(content=".flow-table .col-comment { width: 640px; }")
    target = SCREENSHOT if os.environ.get("ARBSTR_SCREENSHOT") else tmp_path / "flows.png"
    page.screenshot(path=str(target))
    assert target.read_bytes().startswith(b"\x89PNG")


def test_a_routed_flow_is_listed_with_the_providers_url_from_its_first_moment(start_provider, start_process,
                                                                               tmp_path):
    """mitmweb's flow list polled while a slow provider answers: a routed flow, streamed or not, is
    listed only once it shows the provider's URL, never with mitmproxy's reverse placeholder (while
    the provider thinks) nor arbstr's stream relay (until the stream's head has passed through),
    and a stream is listed while it still flows."""
    slow = start_provider("slow", ["gpt-4o"], 0.001, 0.001, latency=0.6, chunk_delay=0.15,
                          reply="one two three four five six seven eight")
    config = tmp_path / "config.toml"
    config.write_text(provider_toml("slow", slow.url, ["gpt-4o"], 1, 1)
                      + '[routing]\nhealth_interval = 0\n[database]\npath = ":memory:"\n')
    web_port = free_port()
    process = start_mitmweb(start_process, tmp_path, config, web_port, WEB_TOKEN)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{process.port}/v1", api_key=CLIENT_KEY, max_retries=0,
                           timeout=20)
    messages = [{"role": "user", "content": "slowly"}]
    ended: dict[str, float] = {}

    def drive_slowly() -> None:
        assert client.chat.completions.create(model="gpt-4o", messages=messages).choices[0].message.content
        ended["plain"] = time.monotonic()
        assert list(client.chat.completions.create(model="gpt-4o", messages=messages, stream=True))
        ended["stream"] = time.monotonic()

    snapshots: list[tuple[float, list[dict]]] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{web_port}", timeout=10,
                      headers={"authorization": f"Bearer {WEB_TOKEN}"}) as web, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        driving = pool.submit(drive_slowly)
        while not driving.done():
            snapshots.append((time.monotonic(), web.get("/flows").json()))
        driving.result()
        snapshots.append((time.monotonic(), web.get("/flows").json()))
    provider_url = f"{slow.url}/chat/completions"
    for _, flows in snapshots:
        for flow in flows:
            request = flow["request"]
            assert f"{request['scheme']}://{request['host']}:{request['port']}{request['path']}" == provider_url
            assert flow["server_conn"]["address"] == [request["host"], request["port"]]
    plain, streamed = sorted(snapshots[-1][1], key=lambda f: f["request"]["timestamp_start"])
    listed = [when for when, flows in snapshots if any(f["id"] == streamed["id"] for f in flows)]
    assert listed and listed[0] < ended["stream"] - 0.3  # listed while its chunks still came


def test_a_flow_the_user_intercepts_is_listed_so_it_can_be_resumed(start_provider, start_process, tmp_path):
    provider = start_provider("p", ["gpt-4o"], 0.001, 0.001)
    config = tmp_path / "config.toml"
    config.write_text(provider_toml("p", provider.url, ["gpt-4o"], 1, 1)
                      + '[routing]\nhealth_interval = 0\n[database]\npath = ":memory:"\n')
    web_port = free_port()
    process = start_mitmweb(start_process, tmp_path, config, web_port, WEB_TOKEN,
                            ("--set", "intercept=~u chat/completions"))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{process.port}/v1", api_key=CLIENT_KEY, max_retries=0,
                           timeout=20)
    with httpx.Client(base_url=f"http://127.0.0.1:{web_port}", timeout=10,
                      headers={"authorization": f"Bearer {WEB_TOKEN}"}) as web, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(lambda: list(client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "held"}], stream=True)))
        deadline = time.monotonic() + 10
        while not (paused := [f for f in web.get("/flows").json() if f["intercepted"]]):
            assert time.monotonic() < deadline, "the intercepted flow was never listed"
            time.sleep(0.05)
        # mitmweb's XSRF check wants its cookie and header to agree
        resumed = web.post(f"/flows/{paused[0]['id']}/resume", headers={"x-xsrftoken": "resume"},
                           cookies={"_mitmproxy_xsrf": "resume"})
        assert resumed.status_code == 200
        assert streaming.result(timeout=10)
