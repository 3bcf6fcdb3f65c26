"""`sftlab serve` on the tiny GLM-4: the official openai client (streaming and not, greedy equal to `sftlab chat`),
auth on every route but /health (the route list read from the app), every limit a 4xx in OpenAI's shape, a
client that leaves frees its slot, a bounded load run with no 5xx, a schemathesis run with no 5xx, and the chat
page in headless Chromium (Debian's package: CI installs it, elsewhere the test skips without it): a question
typed and sent streams a reply into the page, the second turn sends the whole conversation with the system
prompt, Clear empties it, and
no asset comes from outside the server (the page works offline)."""

import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import pytest

from helpers import QUESTION, serving
from sftlab.infer.routes import Limits
from sftlab.infer.serve import create_app
from sftlab.model.load import load_for_inference


@pytest.fixture(scope="module")
def tiny(sftlab_home):
    return load_for_inference(model="sftlab:tiny-glm4", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def url(tiny):
    model, tokenizer = tiny
    app = create_app(model, tokenizer, "tiny-glm4", limits=Limits(max_tokens=64, max_queue=16), context=4096)
    with serving(app) as base:
        yield base


def test_openai_client_gets_the_same_greedy_reply_as_sftlab_chat(url, capsys):
    from openai import OpenAI

    from sftlab.cli import main

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny-glm4"]
    reply = client.chat.completions.create(model="tiny-glm4", messages=QUESTION, temperature=0, max_tokens=12)
    assert main(["chat", "--model", "sftlab:tiny-glm4", "--prompt", "你是谁？", "--temperature", "0",
                 "--repetition_penalty", "1.0", "--json", "--max_new_tokens", "12", "--device", "cpu"]) == 0
    chat = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reply.choices[0].message.content == chat["reply"] and reply.choices[0].finish_reason == chat["finish_reason"]
    assert reply.usage.completion_tokens == chat["new_tokens"] == 12 and reply.usage.prompt_tokens > 0

    chunks = list(client.chat.completions.create(model="tiny-glm4", messages=QUESTION, temperature=0, max_tokens=12,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat["reply"]
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length" and len(chunks) > 3


def test_stop_strings_and_seeded_sampling(url):
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    full = client.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=12)
    text = full.choices[0].message.content
    cut = client.chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=12, stop=[text[3:5]])
    assert cut.choices[0].message.content == text[:3] and cut.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model="m", messages=QUESTION, temperature=1.0, top_p=0.9, seed=7,
                                              max_tokens=8).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize("body, status, needle", [
    (b'{"messages": [', 400, "malformed JSON"),
    ({"messages": []}, 400, "messages"),
    ({"messages": QUESTION, "n": 2}, 400, "not supported by this server: n (only 1)"),
    ({"messages": QUESTION, "max_tokens": 65}, 400, "over this server's cap of 64"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, 400, "messages.0.role: Input should be 'system'"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "first non-system message must be a user"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400, "two user messages"),
    ({"messages": QUESTION, "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "x" * 2_000_000}]}, 413, "request body over"),
    (b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', 400, "a lone surrogate \\ud800"),
    ({"messages": QUESTION, "tools": [{"type": "function", "function": "get_weather"}]}, 400,
     "tools[0].function: expected an object"),
    ({"messages": QUESTION, "seed": 2**64}, 400, "seed: Input should be less than 18446744073709551616"),
    ({"messages": QUESTION, "seed": -(2**63) - 1}, 400, "seed: Input should be greater than or equal to"),
])
def test_every_limit_is_a_4xx_in_openais_error_shape(url, body, status, needle):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{url}/v1/chat/completions", content=content,
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"] and response.json()["error"]["type"]


@pytest.mark.parametrize("body, needle", [
    ({"prompt": [], "max_tokens": 1}, "prompt: an empty list"),
    ({"prompt": ["hi"] * 17, "max_tokens": 1}, "prompt: 17 prompts in one request is over this server's cap of 16"),
    ({"prompt": "hi", "max_tokens": 1, "seed": 2**64 + 5}, "seed: Input should be less than"),
])
def test_completions_out_of_range_is_a_400_naming_it_not_a_retry_later(url, body, needle):
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]["message"]


def test_an_over_limit_chunked_body_is_a_413_and_a_small_one_is_read_whole(tiny):
    model, tokenizer = tiny
    app = create_app(model, tokenizer, "tiny", limits=Limits(max_tokens=2, max_body_bytes=10_000), context=4096)

    def chunks(body: bytes):  # no Content-Length: Transfer-Encoding: chunked
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    with serving(app) as base:
        big = json.dumps({"messages": [{"role": "user", "content": "x" * 50_000}]}).encode()
        refused = httpx.post(f"{base}/v1/chat/completions", content=chunks(big), timeout=30,
                             headers={"Content-Type": "application/json"})
        assert refused.status_code == 413 and "request body over 10000 bytes" in refused.json()["error"]["message"]
        small = json.dumps({"messages": QUESTION, "max_tokens": 2}).encode()
        ok = httpx.post(f"{base}/v1/chat/completions", content=chunks(small), timeout=30,
                        headers={"Content-Type": "application/json"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_a_prompt_over_the_models_context_is_refused(tiny):
    model, tokenizer = tiny
    app = create_app(model, tokenizer, "small", limits=Limits(max_tokens=64), context=20)
    with serving(app) as base:
        response = httpx.post(f"{base}/v1/chat/completions", json={"messages": [
            {"role": "user", "content": "long question " * 20}]}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


def test_a_full_queue_answers_429_at_once_and_a_client_that_leaves_frees_its_slot(tiny):
    model, tokenizer = tiny
    app = create_app(model, tokenizer, "busy", limits=Limits(max_tokens=4000, max_queue=1, max_batch=1), context=4096)
    with serving(app) as base:
        with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=60,
                          json={"messages": QUESTION, "max_tokens": 4000, "stream": True, "temperature": 0}) as long:
            lines = long.iter_lines()
            next(lines)
            next(lines)
            assert json.loads(next(lines)[len("data: "):])["choices"][0]["finish_reason"] is None  # generating now
            started = time.monotonic()
            busy = httpx.post(f"{base}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 4}, timeout=30)
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"
            assert time.monotonic() - started < 2
        deadline = time.monotonic() + 20  # the stream was closed mid-reply: its row ends, its slot frees
        while httpx.get(f"{base}/health").json()["load"] != 0:
            assert time.monotonic() < deadline, "the disconnected request kept its slot"
            time.sleep(0.1)
        after = httpx.post(f"{base}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 4}, timeout=30)
        assert after.status_code == 200


def test_with_a_key_every_route_but_health_needs_it(tiny):
    from fastapi.routing import APIRoute
    from starlette.routing import Route

    model, tokenizer = tiny
    app = create_app(model, tokenizer, "secret", api_key="s3cret", limits=Limits(max_tokens=4))
    routes = [(r.path, sorted(r.methods - {"HEAD"})[0]) for r in app.routes if isinstance(r, (APIRoute, Route))]
    assert {"/health", "/", "/v1/models", "/v1/chat/completions", "/v1/completions", "/openapi.json"} <= {
        p for p, _ in routes}
    bodies = {"/v1/chat/completions": {"messages": QUESTION, "max_tokens": 2},
              "/v1/completions": {"prompt": "hi", "max_tokens": 2}}
    with serving(app) as base:
        for path, method in routes:
            body = bodies[path] if method == "POST" else None
            bare = httpx.request(method, base + path, json=body, timeout=30)
            keyed = httpx.request(method, base + path, json=body, timeout=30,
                                  headers={"Authorization": "Bearer s3cret"})
            wrong = httpx.request(method, base + path, json=body, timeout=30,
                                  headers={"Authorization": "Bearer s3cret-not"})
            for scheme in ("bearer", "BEARER"):  # the scheme is case-insensitive (RFC 9110)
                assert httpx.request(method, base + path, json=body, timeout=30,
                                     headers={"Authorization": f"{scheme} s3cret"}).status_code == 200, scheme
            if path == "/health" or (path == "/" and method == "GET"):  # the page asks for the key itself
                assert bare.status_code == 200
            else:
                assert bare.status_code == wrong.status_code == 401, path
                assert bare.json()["error"]["type"] == "authentication_error"
            assert keyed.status_code == 200, (path, keyed.text)


@pytest.mark.slow  # measured over 3.5 s (pytest --durations): out of the quick loop
def test_bounded_load_run_has_no_server_errors(url):
    def ask(i):
        return httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 4, "temperature": 0,
            "stream": i % 2 == 0}).status_code

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(ask, range(200)))
    assert statuses == [200] * 200 and time.monotonic() - started < 300


@pytest.mark.slow  # in CI's whole run; kept out of the quick loop for its time
def test_schemathesis_finds_no_server_error(tiny):
    import schemathesis
    from hypothesis import HealthCheck, settings
    from schemathesis.checks import not_a_server_error

    model, tokenizer = tiny
    app = create_app(model, tokenizer, "fuzzed", limits=Limits(max_tokens=8, max_queue=64), context=4096)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures, statuses = [], []

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call()
        statuses.append((case.path, response.status_code))
        try:
            case.validate_response(response, checks=(not_a_server_error,))
        except AssertionError as exc:
            failures.append(f"{case.method} {case.path}: {exc}")

    for result in schema.get_all_operations():
        operation = result.ok()
        from hypothesis import given

        given(operation.as_strategy())(run)()
    assert failures == [] and len(statuses) >= 60
    assert {path for path, _ in statuses} == {"/", "/health", "/v1/models", "/v1/chat/completions",
                                              "/v1/completions"}
    assert 400 in {code for path, code in statuses if path == "/v1/chat/completions"}
    assert 400 in {code for path, code in statuses if path == "/v1/completions"}
    with serving(app) as base:  # the server still works afterwards
        assert httpx.get(f"{base}/health").status_code == 200
        ok = httpx.post(f"{base}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 3}, timeout=30)
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"


CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def chromium():
    if not shutil.which(CHROMIUM):  # CI installs it (.ci/run)
        pytest.skip(f"the chat page test needs Debian's Chromium at {CHROMIUM}: apt-get install chromium")
    return CHROMIUM


@pytest.mark.browser
def test_the_chat_page_asks_for_the_key_once_keeps_it_for_the_tab_and_sends_it(chromium, tiny):
    from playwright.sync_api import sync_playwright

    model, tokenizer = tiny
    app = create_app(model, tokenizer, "keyed", api_key="s3cret", limits=Limits(max_tokens=4), context=4096)
    with serving(app) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        asked, sent = [], []
        page.on("dialog", lambda d: (asked.append(d.message), d.accept("s3cret")))
        page.on("request", lambda r: sent.append(r.headers.get("authorization")) if "/v1/" in r.url else None)
        page.goto(base + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'keyed'")
        page.fill("#prompt", "你是谁？")
        page.press("#prompt", "Enter")
        page.wait_for_selector(".msg.assistant[data-streaming='false']", timeout=60_000)
        assert page.get_attribute(".msg.assistant", "data-finish") == "length"
        assert len(asked) == 1 and "API key" in asked[0]  # once: the chat request reused it
        assert sent[-1] == "Bearer s3cret" and page.evaluate("sessionStorage.getItem('sftlab-api-key')") == "s3cret"
        page.reload()  # the same tab keeps it: no second question
        page.wait_for_function("document.getElementById('model').textContent === 'keyed'")
        assert len(asked) == 1
        browser.close()


@pytest.mark.browser
def test_chat_page_streams_a_reply_keeps_the_conversation_and_clears(chromium, sftlab_home, monkeypatch):
    from playwright.sync_api import sync_playwright

    import sftlab.infer.routes as routes

    # a chunk per generated step: on idle cores the tiny model's 24 tokens took under 0.1 s, fewer than the
    # chunks (one per 20 ms at most) that show the reply arriving piece by piece. Even so the engine coalesces the
    # wake-ups of tokens that come faster than the event loop reads them (each token is decoded once now), so a
    # few updates, not one per token, are what streaming guarantees
    monkeypatch.setattr(routes, "STREAM_INTERVAL_S", 0)

    model, tokenizer = load_for_inference(model="sftlab:tiny-glm4", device="cpu", dtype="float32")
    app = create_app(model, tokenizer, "tiny-glm4", limits=Limits(max_tokens=24), context=4096)
    with serving(app) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        hosts, bodies = set(), []
        page.on("request", lambda r: hosts.add(urlparse(r.url).netloc))
        page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.method == "POST" else None)
        page.goto(base + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'tiny-glm4'")
        assert "<|user|>" in page.text_content("#stops")
        page.fill("#system", "Be brief.")
        page.dispatch_event("#system", "change")
        page.evaluate("""() => { window.updates = 0;
            new MutationObserver(() => window.updates++).observe(document.getElementById('log'),
                {childList: true, subtree: true, characterData: true}); }""")
        page.fill("#prompt", "你是谁？")
        page.press("#prompt", "Enter")
        page.wait_for_selector(".msg.assistant[data-streaming='false']", timeout=60_000)
        reply = page.text_content(".msg.assistant")
        assert reply.strip() and page.evaluate("window.updates") > 2  # the reply arrived piece by piece
        assert page.get_attribute(".msg.assistant", "data-finish") == "length"
        assert "cut at the length limit" in reply

        page.fill("#prompt", "再说一遍")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll(\".msg.assistant[data-streaming='false']\").length == 2",
                               timeout=60_000)
        assert [m["role"] for m in bodies[-1]["messages"]] == ["system", "user", "assistant", "user"]
        assert bodies[-1]["messages"][0]["content"] == "Be brief." and bodies[-1]["stream"] is True

        page.click("#clear")
        assert page.evaluate("document.getElementById('log').children.length") == 0
        browser.close()
    assert hosts == {urlparse(base).netloc}  # nothing fetched from anywhere else


@pytest.mark.parametrize("argv, message", [
    ([], "pass --adapter RUN (a training run) or --model PATH (a model folder)"),
    (["--model", "sftlab:tiny-glm4", "--max_queue", "0"], "max_queue: must be an integer >= 1, got 0"),
])
def test_bad_serve_arguments_are_one_line(argv, message, capsys):
    from sftlab.cli import main

    assert main(["serve", *argv]) == 2
    assert capsys.readouterr().err.strip() == f"sftlab serve: error: {message}"


def test_the_runs_system_prompt_goes_before_conversations_without_one(tiny):
    model, tokenizer = tiny
    app = create_app(model, tokenizer, "run", limits=Limits(max_tokens=2), context=4096, system_prompt="你是灵犀。")
    seen, prompt_ids = [], app.state.engine.renderer.prompt_ids
    app.state.engine.renderer.prompt_ids = lambda messages, tools=None: seen.append(messages) or prompt_ids(messages,
                                                                                                             tools)
    with serving(app) as url:
        for messages in ([{"role": "user", "content": "你是谁？"}],
                         [{"role": "system", "content": "mine"}, {"role": "user", "content": "你是谁？"}]):
            response = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                                  json={"model": "run", "messages": messages, "max_tokens": 2})
            assert response.status_code == 200, response.text
    assert [m[0] for m in seen] == [{"role": "system", "content": "你是灵犀。"}, {"role": "system", "content": "mine"}]


def test_parallel_tool_calls_from_an_openai_client_are_prompted_as_one_turn_of_the_templates_dialect(tiny):
    """The request's history in OpenAI's wire form (two calls in one assistant message, their arguments JSON
    strings, two results) is the prompt training renders for the same conversation: the arguments parsed, the
    calls one turn in GLM-4's dialect."""
    from sftlab.chat_format import ChatRenderer
    from sftlab.chat_tools import function_call

    model, tokenizer = tiny
    app = create_app(model, tokenizer, "tools", limits=Limits(max_tokens=2), context=4096)
    tools = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
             for name in ("get_weather", "get_time")]
    wire = [{"role": "user", "content": "Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "a", "content": "21"}, {"role": "tool", "tool_call_id": "b", "content": "9:00"}]
    with serving(app) as url:
        response = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                              json={"model": "tools", "messages": wire, "tools": tools, "max_tokens": 2})
    assert response.status_code == 200, response.text
    inside = [wire[0], {"role": "assistant", "content": "", "tool_calls": [
        function_call("get_weather", {"city": "Paris"}), function_call("get_time", {"city": "Paris"})]},
        {"role": "tool", "content": "21"}, {"role": "tool", "content": "9:00"}]
    prompt = ChatRenderer(tokenizer).render_text(inside, tools, add_generation_prompt=True)
    assert '<|assistant|>get_weather\n{"city": "Paris"}<|assistant|>get_time\n{"city": "Paris"}<|observation|>\n21' \
           '<|observation|>\n9:00<|assistant|>' in prompt
    assert response.json()["usage"]["prompt_tokens"] == len(tokenizer.encode(prompt, add_special_tokens=False))


def test_tools_for_a_template_that_renders_none_are_prompted_in_the_fallback_form(tiny):
    """The request's tools reach the prompt as training renders them (chat_format.to_fallback_form): JSON in the
    system message, not a 400 or a 500."""
    model, tokenizer = tiny
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)  # a copy: the fixture's stays GLM-4's
    plain.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
                           "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    app = create_app(model, plain, "no-tools", limits=Limits(max_tokens=2), context=4096)
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "几点了？"}]
    with serving(app) as url:
        response = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "no-tools", "messages": messages, "tools": tools})
    assert response.status_code == 200, response.text
    from sftlab.chat_format import ChatRenderer

    trained = ChatRenderer(plain).render_text(messages, tools, add_generation_prompt=True)
    assert trained == ("<|system|>\nYou can call these functions (JSON schemas, one per line):\n"
                       '{"name": "get_time", "parameters": {"type": "object"}}\nTo call one, reply with only a JSON '
                       'object: {"name": "<function name>", "arguments": {<arguments>}}. Its result comes back in the '
                       'next message, starting with "Result of".<|user|>\n几点了？<|assistant|>\n')
    assert response.json()["usage"]["prompt_tokens"] == len(plain.encode(trained, add_special_tokens=False))


def test_a_body_over_the_limit_gets_its_413_back_to_ordinary_clients(url):
    """A 20 MB body: the server reads and drops it, so urllib, requests and the openai client, which read the
    response only after sending everything, get the 413 instead of a broken pipe."""
    import urllib.error
    import urllib.request

    import openai
    import requests

    big = [{"role": "user", "content": "x" * 20_000_000}]
    body = json.dumps({"messages": big}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413
    assert requests.post(f"{url}/v1/chat/completions", data=body, timeout=60,
                         headers={"Content-Type": "application/json"}).status_code == 413
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.APIStatusError) as status:
        client.chat.completions.create(model="tiny-glm4", messages=big)
    assert status.value.status_code == 413


@pytest.mark.slow
def test_idle_and_slow_connections_are_closed(tiny, monkeypatch):
    """A connection that sends nothing, and one that sends its headers a line at a time past the deadline, are
    closed; an idle keep-alive connection too; a normal request on a fresh connection still gets its answer."""
    from sftlab.infer import http

    monkeypatch.setattr(http, "HEADER_TIMEOUT_S", 1)
    monkeypatch.setattr(http, "KEEP_ALIVE_S", 1)
    model, tokenizer = tiny
    app = create_app(model, tokenizer, "timeouts", limits=Limits(max_tokens=4))
    with serving(app) as base:
        port = int(base.rsplit(":", 1)[1])

        def closed_within(sock, seconds: float) -> bool:
            sock.settimeout(seconds)
            try:
                while sock.recv(4096):
                    pass  # a response may come first (keep-alive); then the close
                return True
            except TimeoutError:
                return False

        with socket.create_connection(("127.0.0.1", port)) as silent:
            assert closed_within(silent, 5)
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.sendall(b"GET /health HTTP/1.1\r\n")
            time.sleep(0.6)
            slow.sendall(b"Host: x\r\n")  # still no blank line ending the headers
            assert closed_within(slow, 5)
        with socket.create_connection(("127.0.0.1", port)) as idle:
            idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert closed_within(idle, 5)  # answered, then closed after the keep-alive timeout
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200


@pytest.mark.slow
def test_valid_enough_requests_that_reach_generation_are_never_a_5xx(tiny):
    """Beyond schemathesis's schema-shaped bodies, which mostly stop at validation: conversations that are valid
    or nearly so (any unicode, lone surrogates included, text parts, every role, sampling settings at their
    bounds, tools of any shape), so that many reach tokenization and generation. None may be a 5xx, and a good
    share must be answered."""
    from fastapi.testclient import TestClient
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    model, tokenizer = tiny
    app = create_app(model, tokenizer, "fuzzed", limits=Limits(max_tokens=8, max_queue=64), context=4096)
    text = st.text(st.characters(exclude_categories=()), max_size=30)  # surrogates (Cs) included
    content = st.one_of(text, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}), max_size=3))
    any_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]),
                                         "content": st.one_of(content, st.none())})
    valid = st.tuples(st.one_of(st.just([]), st.builds(lambda c: [{"role": "system", "content": c}], text)),
                      st.builds(lambda c: [{"role": "user", "content": c}], content)).map(lambda p: p[0] + p[1])
    tool = st.one_of(st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": st.text(max_size=10), "parameters": st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)})}),
        st.fixed_dictionaries({"type": st.just("function"), "function": st.one_of(st.text(max_size=5), st.integers())}))
    body = st.fixed_dictionaries({"messages": st.one_of(valid, valid, st.lists(any_message, min_size=1, max_size=4))},
                                 optional={"temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
                                           "max_tokens": st.integers(1, 8), "seed": st.integers(0, 2**31),
                                           "stop": st.lists(text, max_size=2), "stream": st.booleans(),
                                           "tools": st.lists(tool, max_size=2)})
    statuses = []
    with TestClient(app) as client:
        @settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(body)
        def post(request):
            response = client.post("/v1/chat/completions", content=json.dumps(request).encode(),
                                   headers={"Content-Type": "application/json"})
            statuses.append(response.status_code)
            assert response.status_code < 500, (request, response.text[:500])

        post()
    app.state.engine.close()
    assert statuses.count(200) >= 20 and 400 in statuses, sorted(set(statuses))
