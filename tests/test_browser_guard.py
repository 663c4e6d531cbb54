"""What web pages may do, without a browser or a model: BrowserGuard's Host and Origin rules
and the API key's open paths, on a tiny app; the real page and Chromium are tests/test_browser.py."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from localgemma.server.middleware import BearerAuth, BrowserGuard, Guard

CALLS: list[str] = []


async def work(request):
    CALLS.append(request.method)
    return PlainTextResponse("done")


def app(bound="127.0.0.1", hosts=(), origins=(), key=None):
    inner = Starlette(routes=[Route("/ai/run", work, methods=["GET", "POST", "DELETE", "OPTIONS"]),
                              Route("/", work), Route("/docs", work)])
    if key:
        inner = BearerAuth(inner, api_key=key)
    return Guard(BrowserGuard(inner, bound=bound, allowed_hosts=list(hosts), cors_origins=list(origins)))


def send(asgi, method="POST", path="/ai/run", host="127.0.0.1:8080", **headers) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            return await client.request(method, path, headers={"host": host, **headers}, content=b'{"prompt":"hi"}')

    CALLS.clear()
    return asyncio.run(go())


@pytest.mark.parametrize("host", ["127.0.0.1:8080", "localhost:8080", "LOCALHOST", "[::1]:8080", "localhost"])
def test_loopback_names_are_served(host):
    assert send(app(), host=host).status_code == 200 and CALLS == ["POST"]


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8080", "127.0.0.1.nip.io:8080",
                                  "192.168.1.20:8080", ""])
def test_other_host_names_are_refused_before_anything_runs(host):
    r = send(app(), host=host)
    assert r.status_code == 403 and CALLS == []
    body = r.json()
    assert body["success"] is False and body["errors"][0]["code"] == 9109
    assert "--allowed-host" in body["errors"][0]["message"]


def test_allowed_hosts_and_the_bound_address_are_served():
    guarded = app(bound="192.168.1.20", hosts=["raspberrypi.local"])
    for host in ("192.168.1.20:8080", "raspberrypi.local:8080", "localhost:8080"):
        assert send(guarded, host=host).status_code == 200, host
    assert send(guarded, host="192.168.1.21:8080").status_code == 403


def test_bound_everywhere_any_address_but_not_any_name():
    guarded = app(bound="0.0.0.0")
    assert send(guarded, host="10.0.0.7:8080").status_code == 200
    assert send(guarded, host="[fe80::1]:8080").status_code == 200
    assert send(guarded, host="evil.example:8080").status_code == 403


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          "application/json"])
@pytest.mark.parametrize("method", ["POST", "DELETE"])
def test_a_foreign_origin_cannot_act_whatever_the_content_type(content_type, method):
    r = send(app(), method, origin="http://evil.example", **{"content-type": content_type})
    assert r.status_code == 403 and CALLS == []
    assert "--cors-origin" in r.json()["errors"][0]["message"]


@pytest.mark.parametrize("origin", ["null", "http://127.0.0.1:9999", "https://127.0.0.1:8080", "http://localhost:8080"])
def test_other_ports_schemes_and_opaque_origins_are_foreign(origin):
    # the server is reached as 127.0.0.1:8080: localhost:8080 is another origin to a browser
    assert send(app(), origin=origin).status_code == 403 and CALLS == []


def test_cross_site_fetch_metadata_without_origin_is_refused():
    assert send(app(), **{"sec-fetch-site": "cross-site"}).status_code == 403 and CALLS == []
    assert send(app(), **{"sec-fetch-site": "same-origin"}).status_code == 200


def test_same_origin_and_clients_without_origin_may_act():
    assert send(app(), origin="http://127.0.0.1:8080").status_code == 200
    assert send(app(), host="localhost:8080", origin="http://localhost:8080/").status_code == 200
    assert send(app()).status_code == 200 and CALLS == ["POST"]  # curl, SDKs: no Origin


def test_reads_from_anywhere_pass_and_cors_keeps_them_unreadable():
    r = send(app(), "GET", origin="http://evil.example")
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_a_preflight_from_a_foreign_origin_is_refused():
    r = send(app(), "OPTIONS", origin="http://evil.example", **{"access-control-request-method": "POST"})
    assert r.status_code == 403 and CALLS == []


@pytest.mark.parametrize("allowed", ["http://app.example:3000", "*"])
def test_allowed_origins_may_act(allowed):
    guarded = app(origins=[allowed])
    assert send(guarded, origin="http://app.example:3000").status_code == 200
    if allowed != "*":
        assert send(guarded, origin="http://other.example").status_code == 403


def test_the_page_and_docs_are_open_with_an_api_key_but_work_is_not():
    guarded = app(key="k")
    assert send(guarded, "GET", "/").status_code == 200
    assert send(guarded, "GET", "/docs").status_code == 200
    assert send(guarded).status_code == 401 and CALLS == []
    assert send(guarded, authorization="Bearer k").status_code == 200
