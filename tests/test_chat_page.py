"""The chat page at `/` of `aquila serve`: a self-contained file, driven in headless chromium over a real server."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

import aquila
from aquila.checkpoint import build_model, save_model_dir
from aquila.config import ModelArgs
from aquila.serve.app import create_app

DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "examples" / "aquila" / "demo_tokenizer"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# A long context so a reply can stream long enough to be stopped mid-way.
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=16008, multiple_of=16, max_seq_len=2048)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "aquila-chat-test"
    save_model_dir(build_model(ARGS, seed=0), path, formats=("safetensors",))
    for f in DEMO_TOKENIZER.iterdir():
        shutil.copy(f, path)
    return path


def test_page_is_served_self_contained(model_dir):
    loader = aquila.AutoLoader("lm", model_dir=model_dir.parent, model_name=model_dir.name)
    app = create_app(aquila.Predictor(loader.get_model(), loader.get_tokenizer()), model_name="m")
    with TestClient(app) as client:
        r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in r.headers["content-security-policy"]
    page = r.text
    assert "<title>aquila chat</title>" in page and "/v1/chat/completions" in page and "/v1/models" in page
    assert re.findall(r"(?:https?:)?//[\w.-]+\.\w+", page) == []  # no other host, not even protocol-relative
    assert not re.search(r"<(?:link|img|iframe)\b|<script[^>]*\bsrc=|@import|url\(", page)
    assert ".innerHTML" not in page  # model text goes through textContent


# --- the browser test --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(model_dir):
    port = free_port()
    cmd = [sys.executable, "-m", "aquila", "serve", "--model-dir", str(model_dir.parent)]
    cmd += ["--model-name", model_dir.name, "--port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # a loaded CI machine starts torch + uvicorn slowly
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            proc.kill()
            pytest.fail(f"aquila serve did not come up: {proc.communicate()[0][-2000:]}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian packages chromium, chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1000,800", f"--user-data-dir={tmp_path_factory.mktemp('profile')}"):  # fmt: skip
        options.add_argument(flag)
    # A driver path in Service: selenium-manager is never asked to find or download anything.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition, timeout: float = 20.0, what: str = "condition", page=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    state = page.execute_script("return [chat, document.getElementById('status').textContent]") if page else ""
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} {state}")


def set_number(driver, element_id: str, value) -> None:
    field = driver.find_element("id", element_id)
    field.clear()
    field.send_keys(str(value))


@pytest.mark.slow
def test_chat_page_streams_stops_and_keeps_history(browser, server_url, model_dir):
    from selenium.webdriver.common.keys import Keys

    browser.get(server_url + "/")
    model_name = browser.find_element("id", "model-name")
    wait_for(lambda: model_name.text == model_dir.name, what="the model name from /v1/models")
    state = lambda: browser.execute_script(  # noqa: E731
        "const r = chat.messages.at(-1); return {streaming: chat.streaming, finish: chat.lastFinish,"
        " reply: r ? r.content : null, shown: document.querySelector('.assistant:last-child .bubble')?.textContent,"
        " status: document.getElementById('status').textContent}"
    )
    message, send, stop = (browser.find_element("id", i) for i in ("message", "send", "stop"))

    # Turn 1: Shift+Enter is a new line, Enter sends; a long reply streams in, growing, until Stop.
    set_number(browser, "temperature", 1)
    set_number(browser, "max-tokens", 1000)
    message.send_keys("Hello", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "there", Keys.ENTER)
    lengths: set[int] = set()

    def grown_twice() -> bool:
        s = state()
        assert s["finish"] is None, f"the reply ended before Stop: {s}"
        if s["reply"]:
            assert s["shown"] == s["reply"]
            lengths.add(len(s["reply"]))
        return len(lengths) >= 2

    wait_for(grown_twice, what="the reply to grow", page=browser)
    assert stop.is_enabled() and not send.is_enabled()
    stop.click()
    stopped = wait_for(lambda: (s := state())["finish"] and s, timeout=5, what="the stream to end after Stop")
    assert stopped["finish"] == "stopped" and not stopped["streaming"]
    assert browser.find_element("css selector", ".assistant:last-child .note").text == "stopped"
    time.sleep(0.3)
    assert state()["reply"] == stopped["reply"], "text kept arriving after Stop"
    assert send.is_enabled() and not stop.is_enabled() and message.is_enabled() and message.get_attribute("value") == ""  # fmt: skip

    # Turn 2: the request carries the first turn, including the stopped reply.
    set_number(browser, "max-tokens", 6)
    message.send_keys("And then?", Keys.ENTER)
    done = wait_for(lambda: (s := state())["finish"] and s, what="the second reply")
    assert done["finish"] in ("stop", "length") and done["shown"] == done["reply"]
    sent = browser.execute_script("return chat.lastRequest")
    assert [(m["role"], m["content"]) for m in sent["messages"]] == [
        ("user", "Hello\nthere"), ("assistant", stopped["reply"]), ("user", "And then?")]  # fmt: skip
    assert (sent["stream"], sent["max_tokens"], sent["temperature"], sent["model"]) == (True, 6, 1, model_dir.name)
    assert len(browser.find_elements("css selector", "#log .turn")) == 4

    # A refused request takes its turn back: the error is shown and the text is back in the box to edit.
    set_number(browser, "max-tokens", 100_000)
    message.send_keys("Too long", Keys.ENTER)
    wait_for(lambda: state()["finish"] == "error", what="the refusal")
    assert "max_tokens" in state()["status"] and message.get_attribute("value") == "Too long"
    assert len(browser.find_elements("css selector", "#log .turn")) == 4
    assert browser.execute_script("return chat.messages.length") == 4


STUB_FETCH = """
const [chunks, status] = arguments, realFetch = window.fetch;
window.fetch = (url, options) => {
  if (url !== "/v1/chat/completions") return realFetch(url, options);
  const body = new ReadableStream({ start(c) { for (const x of chunks) c.enqueue(new TextEncoder().encode(x)); c.close(); } });
  return Promise.resolve(new Response(body, { status, headers: { "Content-Type": "text/event-stream" } }));
};
"""


def event(content: str | None = None, finish: str | None = None) -> str:
    delta = {} if content is None else {"content": content}
    return "data: " + json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


@pytest.mark.slow
@pytest.mark.parametrize(
    "chunks, finish, reply, note, status",
    [
        # Events split across network chunks, CRLF line ends, markup in the model's text (shown as text).
        ([event("Hel")[:30], event("Hel")[30:] + "\r\n\r\n" + event(" <b>x</b>") + "\r\n",
          "\r\n" + event(finish="stop") + "\r\n\r\ndata: [DONE]\r\n\r\n"], "stop", "Hel <b>x</b>", None, ""),
        # A stream cut off before its finish_reason keeps the text and says so.
        ([event("par") + "\n\n"], "error", "par", "error: the stream ended without a finish_reason", "error:"),
        # An error event before any text takes the turn back.
        (['data: {"error": {"message": "boom"}}\n\n'], "error", None, None, "error: boom"),
    ],
    ids=["split-crlf-markup", "cut-off", "error-event"],
)  # fmt: skip
def test_chat_page_reads_server_sent_events(browser, server_url, chunks, finish, reply, note, status):
    from selenium.webdriver.common.keys import Keys

    browser.get(server_url + "/")
    browser.execute_script(STUB_FETCH, chunks, 200)
    browser.find_element("id", "message").send_keys("hi", Keys.ENTER)
    wait_for(lambda: browser.execute_script("return chat.lastFinish") == finish, what=f"finish {finish}", page=browser)
    turns = browser.find_elements("css selector", "#log .turn")
    if reply is None:
        assert turns == [] and browser.execute_script("return chat.messages") == []
        assert browser.find_element("id", "message").get_attribute("value") == "hi"
    else:
        bubble = turns[-1].find_element("css selector", ".bubble")
        assert bubble.text == reply and bubble.find_elements("css selector", "*") == []  # no markup made from text
        assert browser.execute_script("return chat.messages.at(-1).content") == reply
        notes = turns[-1].find_elements("css selector", ".note")
        assert [n.text for n in notes] == ([note] if note else [])
    assert browser.find_element("id", "status").text.startswith(status)
