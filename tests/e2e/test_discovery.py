"""`arbstr discover` against a real Nostr relay (nostr-relay, on loopback) holding signed kind-38421
announcements this test publishes, a fake provider directory, and mock provider nodes."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nostr_sdk import EventBuilder, Keys, Kind, Tag
from websockets.sync.client import connect

from arbstr.cli import main
from arbstr.discovery import ANNOUNCEMENT_KIND, parse_announcement

from e2e.conftest import BIN, free_port, get_server


def announcement(keys: Keys, provider_id: str, urls: list[str], mints: list[str], name: str | None = None,
                 extra_tags: list[list[str]] = ()) -> dict:
    tags = [["d", provider_id]] + [["u", url] for url in urls] + [["mint", m] for m in mints] + list(extra_tags)
    content = json.dumps({"name": name, "about": "test node"} if name else {"about": "no name"})
    event = EventBuilder(Kind(ANNOUNCEMENT_KIND), content).tags([Tag.parse(t) for t in tags]).finalize(keys)
    return json.loads(event.as_json())


@pytest.fixture
def relay(start_process, tmp_path) -> str:
    """A nostr-relay on a free loopback port that stores whatever it is sent: checking signatures is
    arbstr's job here, so the relay's own check is left out of its validators."""
    port = free_port()
    config = tmp_path / "relay.yaml"
    config.write_text(f"""DEBUG: false
storage:
  sqlalchemy.url: sqlite+aiosqlite:///{tmp_path / 'relay.sqlite3'}
  validators:
    - nostr_relay.validators.is_not_too_large
gunicorn:
  bind: 127.0.0.1:{port}
  workers: 1
  loglevel: warning
  reload: false
authentication:
  enabled: false
""")
    start_process([str(BIN / "nostr-relay"), "-c", str(config), "serve", "--use-uvicorn"], name="relay",
                  pattern=re.compile(r"Starting version"))
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "the relay did not start listening"
            time.sleep(0.1)
    return f"ws://127.0.0.1:{port}"


def publish(relay: str, *events: dict) -> None:
    with connect(relay, open_timeout=10) as ws:
        for event in events:
            ws.send(json.dumps(["EVENT", event]))
            answer = json.loads(ws.recv(timeout=10))
            assert answer[:3] == ["OK", event["id"], True], answer


@pytest.fixture
def directory() -> Iterator:
    """A provider directory on loopback answering GET with whatever `server.payload` holds."""
    with get_server(lambda: json.dumps(server.payload).encode(), "application/json") as server:
        server.payload = {"providers": []}
        server.url = f"http://127.0.0.1:{server.server_address[1]}/v1/providers/"
        yield server


def test_discover_finds_probes_and_ranks_providers(relay, directory, start_provider, capsys, tmp_path):
    cheap = start_provider("cheap-node", ["x", "y"], 0.001, 0.002, 0.001)
    dear = start_provider("dear-node", ["x"], 0.005, 0.005)
    forged_target = start_provider("forged-node", ["x"], 0.0001, 0.0001)
    listed = start_provider("listed-node", ["x"], 0.003, 0.003)
    keys = Keys.generate()
    good = announcement(keys, "cheap", [cheap.url], ["https://mint.cheap"], name="Cheap Node")
    other = announcement(Keys.generate(), "dear", ["http://dear.onion", dear.url], [], name="Dear")
    forged = announcement(keys, "forged", [forged_target.url], [], name="Forged")
    forged["sig"] = announcement(keys, "other", [forged_target.url], [])["sig"]  # a real signature, of another event
    no_url = announcement(keys, "no-url", [], ["https://mint"], name="Nowhere")
    gone = announcement(keys, "gone", [f"http://127.0.0.1:{free_port()}"], [], name="Gone")
    publish(relay, good, other, forged, no_url, gone)
    directory.payload = {"providers": [
        {"id": "listed", "name": "Listed", "endpoint_url": listed.url, "mint_urls": ["https://mint.listed"]},
        {"id": "broken", "name": "Broken"}]}
    dead_relay = f"ws://127.0.0.1:{free_port()}"
    config = tmp_path / "config.toml"
    config.write_text("# my config\n[server]\nlisten = \"127.0.0.1:8080\"\n")

    argv = ["discover", "-c", str(config), "--relay", relay, "--relay", dead_relay, "--directory", directory.url,
            "--timeout", "5", "--model", "x"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    table = [line.split() for line in out[:4]]
    assert table[0] == ["NAME", "URL", "MINTS", "IN/1K", "OUT/1K", "REQUEST", "FEE", "PROBE", "MS"]
    assert [row[:6] for row in table[1:]] == [
        ["Cheap-Node", cheap.url, "https://mint.cheap", "1", "2", "0.001"],
        ["Listed", listed.url, "https://mint.listed", "3", "3", "0"],
        ["Dear", dear.url, "https://mint.mock.invalid", "5", "5", "0"]]  # mints from its /v1/info
    assert all(float(row[6]) > 0 for row in table[1:])
    assert out[4] == "3 of 3 reachable providers serve x"
    rest = "\n".join(out[5:])
    assert re.search(r"unreachable: Gone http://127\.0\.0\.1:\d+/v1: /v1/models: ", rest)
    assert f"unreachable: {dead_relay}: " in rest
    assert re.search(r"skipped: ws://127\.0\.0\.1:\d+: event \w+ \(forged\): bad signature", rest)
    assert re.search(r"skipped: ws://127\.0\.0\.1:\d+: event \w+ \(no-url\): malformed: no-url: no http\(s\) URL", rest)
    assert "skipped: directory: broken: no http(s) endpoint URL" in rest
    assert "Forged" not in rest and forged_target.url not in "\n".join(out)
    assert not forged_target.requests  # never even probed

    assert main(["discover", "-c", str(config), "--relay", relay, "--no-directory", "--timeout", "5",
                 "--add", "Cheap-Node", "Dear"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{config}: added Cheap-Node, Dear (live pricing; set each one's api_key)"
    assert config.read_text() == ("# my config\n[server]\nlisten = \"127.0.0.1:8080\"\n"
                                  f'\n[[providers]]\nname = "Cheap-Node"\nurl = "{cheap.url}"\n'
                                  f'\n[[providers]]\nname = "Dear"\nurl = "{dear.url}"\n')


def test_nothing_reachable_is_a_report_not_a_crash(capsys, tmp_path):
    dead = f"ws://127.0.0.1:{free_port()}"
    assert main(["discover", "-c", str(tmp_path / "none.toml"), "--relay", dead, "--relay", "wss://bad host",
                 "--directory", f"http://127.0.0.1:{free_port()}/v1/providers/", "--timeout", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["NAME", "URL", "MINTS", "MODELS", "PROBE", "MS"]
    assert out.count("unreachable: ") == 3


def test_an_unknown_name_to_add_is_a_clear_error(relay, capsys, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("")
    assert main(["discover", "-c", str(config), "--relay", relay, "--no-directory", "--add", "nobody"]) == 1
    assert "arbstr: not found: nobody (found: none)" in capsys.readouterr().err
    assert config.read_text() == ""


class TestParseAnnouncement:
    def test_several_urls_and_mints(self):
        event = {"tags": [["d", "p1"], ["u", "https://a.example", "http://b.example/v1"], ["u", "ws://nope"],
                          ["mint", "https://m1"], ["mint", "https://m2"], ["t", "x"]],
                 "content": '{"name": "P One"}', "created_at": 5}
        parsed = parse_announcement(event, "nostr relay")
        assert (parsed.provider_id, parsed.name, parsed.urls, parsed.mints, parsed.created_at) == (
            "p1", "P One", ("https://a.example/v1", "http://b.example/v1"), ("https://m1", "https://m2"), 5)

    @pytest.mark.parametrize("tags, problem", [
        ([["u", "https://a.example"]], "no d tag"), ([["d", "p"]], "p: no http(s) URL"),
        ([["d", "p"], ["u", 5]], "p: no http(s) URL"), ("tags", "no tags")])
    def test_malformed(self, tags, problem):
        with pytest.raises(ValueError, match=re.escape(problem)):
            parse_announcement({"tags": tags, "content": "{}"}, "nostr relay")

    def test_content_that_is_not_json_names_it_by_its_id(self):
        assert parse_announcement({"tags": [["d", "p"], ["u", "https://a.example"]], "content": "hi"}, "x").name == "p"
