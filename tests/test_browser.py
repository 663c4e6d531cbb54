"""The playground and browser safety, in a real headless Chromium (Debian's chromium and
chromedriver, driven by selenium) against a real `localgemma serve`.

The page: load it, pick the model, stream a reply (the same text the API gives), stop a long
generation midway (the server stops too), register an adapter from the page and see its
effect, a JSON-schema request shown parsed, the API key asked for and never put in a URL, a
phone's width. Safety: a page on another origin cannot read answers unless allowed, and its
`no-cors` text/plain POSTs run nothing and create nothing; a rebinding Host is refused;
/docs renders with no network. A screenshot of the page lands in artifacts/.

Chromium comes from apt (.ci/run installs it); locally the file is skipped without it, in CI
it fails instead.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socketserver
import threading
import time
from pathlib import Path

import httpx
import pytest
from peft_util import make_peft_adapter
from servers import TWO_B, Server, free_port, home_with_model, wait_for

pytestmark = pytest.mark.e2e

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        raise RuntimeError("CI must run the browser tests: install chromium and chromium-driver (.ci/run does)")
    pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)


def browser(width: int = 1400, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)


def wait(predicate, what: str = "condition"):
    """A condition on the page: a browser round trip is slower than the API's, so a minute."""
    return wait_for(predicate, timeout=60, what=what, every=0.05)


@pytest.fixture(scope="module")
def home(tmp_path_factory, embedded_gguf):
    home = tmp_path_factory.mktemp("browser-home")
    home_with_model(home, embedded_gguf)
    return home


@pytest.fixture(scope="module")
def srv(home, embedded_gguf):
    server = Server(home, "--model", f"{TWO_B}={embedded_gguf}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(srv):
    driver = browser()
    driver.get(srv.base + "/")
    wait(lambda: driver.find_element("id", "model").get_attribute("value") == TWO_B, what="models loaded")
    yield driver
    driver.quit()


def api_text(srv, body: dict) -> str:
    r = httpx.post(srv.url(), json={**body, "stream": False}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["result"]["response"]


def fill(driver, element_id: str, value: str) -> None:
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(value)


def run_and_wait(driver) -> str:
    driver.find_element("id", "run").click()
    wait(lambda: driver.find_element("id", "run").is_enabled() and driver.find_element("id", "stats").text,
         what="the answer")
    error = driver.find_element("id", "error")
    assert not error.is_displayed(), error.text
    return driver.find_element("id", "output").text.strip()


def test_the_page_streams_the_apis_answer(page, srv):
    fill(page, "prompt", "The capital of France is")
    page.find_element("id", "raw").click()
    fill(page, "f-temperature", "0")
    fill(page, "f-max_tokens", "12")
    shown = run_and_wait(page)
    assert shown == api_text(srv, {"prompt": "The capital of France is", "raw": True, "temperature": 0,
                                   "max_tokens": 12}).strip()
    stats = page.find_element("id", "stats").text
    assert "completion 12 tokens" in stats and "tokens/s" in stats
    # every sampling field came from the server's schema, with its range
    temperature = page.find_element("id", "f-temperature")
    assert (temperature.get_attribute("min"), temperature.get_attribute("max")) == ("0", "5")
    ARTIFACTS.mkdir(exist_ok=True)
    page.save_screenshot(str(ARTIFACTS / "playground.png"))


def test_stop_ends_a_long_generation_on_the_server_too(page, srv):
    seen = {j["id"] for j in srv.jobs()}
    fill(page, "prompt", "la la la la la la la la")
    fill(page, "f-max_tokens", "4000")
    page.find_element("id", "run").click()
    wait(lambda: len(page.find_element("id", "output").text) > 10, what="some output")
    page.find_element("id", "stop").click()
    wait(lambda: "stopped" in page.find_element("id", "stats").text, what="stopped")
    job = wait(lambda: next((j for j in srv.jobs() if j["id"] not in seen and j["ended_at"]), None), what="job ended")
    assert job["state"] == "cancelled" and job["chunks"] < 200, job  # the context would have allowed ~240
    fill(page, "f-max_tokens", "12")


def test_an_adapter_registered_from_the_page_changes_the_answer(page, srv, embedded_gguf, tmp_path):
    folder = make_peft_adapter(tmp_path / "peft", embedded_gguf, targets=("q_proj", "v_proj", "o_proj"), seed=11)
    fill(page, "ft-name", "from-the-page")
    fill(page, "ft-description", "registered in a browser")
    page.find_element("id", "ft-files").send_keys(
        f"{folder / 'adapter_config.json'}\n{folder / 'adapter_model.safetensors'}")
    page.find_element("id", "ft-register").click()
    wait(lambda: page.find_element("id", "ft-status").text.startswith("ready"), what="the adapter converted")
    assert "from-the-page" in page.find_element("id", "adapter-list").text
    from selenium.webdriver.support.ui import Select

    fill(page, "prompt", "The capital of France is")
    Select(page.find_element("id", "adapter")).select_by_value("from-the-page")
    adapted = run_and_wait(page)
    base = api_text(srv, {"prompt": "The capital of France is", "raw": True, "temperature": 0, "max_tokens": 12})
    expected = api_text(srv, {"prompt": "The capital of France is", "raw": True, "temperature": 0, "max_tokens": 12,
                              "lora": "from-the-page"})
    assert adapted == expected.strip() and adapted != base.strip()
    Select(page.find_element("id", "adapter")).select_by_value("")  # back to none
    assert [o.get_attribute("value") for o in Select(page.find_element("id", "adapter")).all_selected_options] == [""]


def test_a_json_schema_request_is_shown_parsed(page):
    page.find_element("css selector", "#structured summary").click()
    fill(page, "schema", json.dumps({"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12}},
                                     "required": ["answer"]}))
    fill(page, "prompt", 'The JSON object {"answer": "yes"} is')
    fill(page, "f-max_tokens", "40")
    run_and_wait(page)
    parsed = json.loads(page.find_element("css selector", "#parsed pre").text)
    assert set(parsed) == {"answer"} and len(parsed["answer"]) <= 12
    page.find_element("id", "schema").clear()


def test_show_code_gives_the_same_request_as_curl_python_and_a_worker(page):
    page.find_element("id", "show-code").click()
    curl = page.find_element("id", "code").text
    assert curl.startswith("curl ") and "/ai/run/" in curl and '"prompt"' in curl
    for lang, needle in (("requests", "requests.post("), ("openai", "client.chat.completions.create("),
                         ("worker", "env.AI.run(")):
        page.find_element("css selector", f'#code-tabs [data-lang="{lang}"]').click()
        assert needle in page.find_element("id", "code").text, lang
    page.find_element("id", "close-code").click()


def test_messages_mode_keeps_the_conversation(page):
    page.find_element("css selector", '[data-mode="messages"]').click()
    page.find_element("css selector", "#turns textarea").send_keys("Name a colour.")
    fill(page, "f-max_tokens", "6")
    run_and_wait(page)
    turns = page.find_elements("css selector", "#turns li")
    assert len(turns) == 2 and turns[1].find_element("css selector", "select").get_attribute("value") == "assistant"
    page.find_element("css selector", '[data-mode="prompt"]').click()


def test_a_phones_width_stacks_the_page(srv):
    driver = browser()
    try:  # a desktop window cannot be narrower than 500 px: emulate the phone's screen instead
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 390, "height": 844, "deviceScaleFactor": 3, "mobile": True})
        driver.get(srv.base + "/")
        wait(lambda: driver.find_element("id", "model").get_attribute("value"), what="models loaded")
        width, scroll = driver.execute_script("return [window.innerWidth, document.documentElement.scrollWidth]")
        assert width == 390 and scroll <= width  # nothing sticks out sideways
        compose, result = (driver.find_element("id", i).rect for i in ("compose", "result"))
        assert result["y"] >= compose["y"] + compose["height"] - 1 and compose["width"] <= width
    finally:
        driver.quit()


def test_the_api_key_is_asked_for_and_never_in_a_url(home, embedded_gguf):
    server = Server(home, "--model", f"{TWO_B}={embedded_gguf}", "--api-key", "pw-123")
    driver = browser()
    try:
        driver.get(server.base + "/")
        wait(lambda: driver.find_element("id", "key-box").is_displayed(), what="the key box")
        driver.find_element("id", "key").send_keys("pw-123")
        driver.find_element("id", "key-save").click()
        wait(lambda: driver.find_element("id", "model").get_attribute("value") == TWO_B, what="models with the key")
        assert "pw-123" not in driver.current_url
        assert "pw-123" not in server.output()  # not in any logged request line either
    finally:
        driver.quit()
        server.stop()


def test_docs_render_with_no_network(page, srv):
    page.get(srv.base + "/docs")
    title = wait(lambda: page.find_elements("css selector", ".swagger-ui .info .title"), what="Swagger UI")
    assert "localgemma" in title[0].text
    paths = page.page_source
    assert "/v1/chat/completions" in paths and "/ai/run/" in paths
    schema = httpx.get(srv.base + "/openapi.json").json()
    temperature = schema["components"]["schemas"]["PromptInputs"]["properties"]["temperature"]
    assert (temperature["minimum"], temperature["maximum"], temperature["default"]) == (0, 5, 0.6)
    page.get(srv.base + "/")
    wait(lambda: page.find_element("id", "model").get_attribute("value") == TWO_B, what="back on the page")


# -- other origins ------------------------------------------------------------------------------

FOREIGN = """<!doctype html><script>
const out = {};
async function go() {
  try { const r = await fetch("%(base)s/v1/models"); out.read = (await r.json()).object; }
  catch (e) { out.read = "blocked: " + e.name; }
  for (const [name, path, body] of [["run", "%(run)s", {prompt: "hi", max_tokens: 2}],
      ["create", "%(finetunes)s", {model: "%(model)s", name: "csrf"}]]) {
    try { await fetch(path, {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"},
                             body: JSON.stringify(body)}); out[name] = "sent"; }
    catch (e) { out[name] = "error"; }
  }
  document.title = "done " + JSON.stringify(out);
}
go();
</script>"""


@pytest.fixture
def foreign_page(tmp_path):
    """Serves one HTML file on another port: another origin."""
    def serve(html: str) -> str:
        (tmp_path / "index.html").write_text(html)
        handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
        httpd = socketserver.TCPServer(("127.0.0.1", free_port()), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/index.html"

    servers: list = []
    yield serve
    for httpd in servers:
        httpd.shutdown()


def visit(url: str) -> dict:
    driver = browser()
    try:
        driver.get(url)
        title = wait(lambda: driver.title.startswith("done") and driver.title, what="the foreign page")
        return json.loads(title[5:])
    finally:
        driver.quit()


def test_a_foreign_page_can_neither_read_nor_act(srv, foreign_page):
    jobs, finetunes = len(srv.jobs()), httpx.get(srv.finetunes()).json()["result"]
    result = visit(foreign_page(FOREIGN % {"base": srv.base, "run": srv.url(), "finetunes": srv.finetunes(),
                                           "model": TWO_B}))
    assert result["read"].startswith("blocked")  # no CORS header: the browser keeps the answer from the page
    time.sleep(0.5)
    assert len(srv.jobs()) == jobs  # the no-cors text/plain POST ran no generation...
    assert httpx.get(srv.finetunes()).json()["result"] == finetunes  # ...and created no finetune
    r = httpx.post(srv.url(), content=b'{"prompt": "hi"}', headers={"Origin": "http://evil.example",
                                                                     "Content-Type": "text/plain"})
    assert r.status_code == 403 and r.json()["errors"][0]["code"] == 9109


def test_an_allowed_origin_may_read_and_act(home, embedded_gguf, foreign_page, tmp_path):
    url = foreign_page("<p>placeholder</p>")
    origin = url.rsplit("/", 1)[0]
    server = Server(home, "--model", f"{TWO_B}={embedded_gguf}", "--cors-origin", origin)
    try:
        jobs = len(server.jobs())
        (tmp_path / "index.html").write_text(FOREIGN % {"base": server.base, "run": server.url(),
                                                        "finetunes": server.finetunes("/none"), "model": TWO_B})
        result = visit(url)
        assert result["read"] == "list"
        wait(lambda: len(server.jobs()) > jobs, what="the allowed page's generation")
        preflight = httpx.options(server.url(), headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                         "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        refused = httpx.options(server.url(), headers={"Origin": "http://evil.example",
                                                       "Access-Control-Request-Method": "POST"})
        assert refused.status_code == 403
    finally:
        server.stop()


def test_a_rebinding_host_is_refused(srv):
    r = httpx.get(srv.base + "/v1/models", headers={"Host": "attacker.example"})
    assert r.status_code == 403 and "DNS rebinding" in r.json()["error"]["message"]
    assert httpx.get(srv.base + "/v1/models", headers={"Host": f"localhost:{srv.port}"}).status_code == 200
