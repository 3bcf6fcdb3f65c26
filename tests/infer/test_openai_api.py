"""`sftlab serve` for agents and harnesses: function calls in a reply come back as OpenAI tool_calls for every
family's call format (the reply planted through the engine: the ids training would supervise for that call),
/v1/completions with echo, logprobs and max_tokens 0 (checked against one forward pass), chat logprobs, the
developer role, max_tokens bounded by the context instead of a fixed cap, unsupported parameters named in a 400,
and the access log."""

import json
import logging

import httpx
import pytest
import torch

from helpers import QUESTION, serving
from sftlab.chat_format import ChatRenderer
from sftlab.chat_tools import function_call
from sftlab.infer.generate import decode_complete
from sftlab.infer.routes import Limits
from sftlab.infer.serve import create_app
from sftlab.model.load import load_for_inference

TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name} of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
         for name in ("get_weather", "get_time")]
ASK = [{"role": "user", "content": "Weather and time in Paris?"}]


@pytest.fixture(scope="module")
def tiny(sftlab_home):
    return load_for_inference(model="sftlab:tiny-glm4", device="cpu", dtype="float32")


def planted(app, ids: list[int]) -> None:
    """The engine generates `ids` (then a stop id) for every request, as a model trained on them would."""
    engine = app.state.engine
    stop = sorted(engine.stop_ids)[0]

    def generate(jobs):
        for job in jobs:
            for token in [*ids, stop]:
                if job.done:
                    break
                engine.add_token(job, token)
            job.notify()

    engine._generate = generate


def call_reply_ids(tokenizer, calls: list[dict]) -> list[int]:
    """What training supervises for an assistant turn making `calls`: the completion piece's ids, without the
    turn's terminator (the planted stop ends it)."""
    renderer = ChatRenderer(tokenizer)
    completion = renderer.pieces([*ASK, {"role": "assistant", "content": "", "tool_calls": calls}], TOOLS)[-1][0]
    ids = renderer.encode(completion)
    return [i for i in ids if i not in renderer.stop_ids]


def sse(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


FAMILY_CALLS = {  # GLM-4-0414 and Llama-3.1's templates take one call per turn; GLM-4 and Qwen3 parallel ones
    "sftlab:tiny-glm4": 2, "sftlab:tiny-glm4-0414": 1, "sftlab:tiny-qwen3": 2, "sftlab:tiny-llama3": 1}


@pytest.mark.parametrize("family", FAMILY_CALLS)
def test_a_function_call_in_the_reply_comes_back_as_tool_calls_streamed_and_not(sftlab_home, family):
    import openai

    model, tokenizer = load_for_inference(model=family, device="cpu", dtype="float32")
    calls = [function_call("get_weather", {"city": "Paris"}), function_call("get_time", {"city": "巴黎"})]
    calls = calls[:FAMILY_CALLS[family]]
    app = create_app(model, tokenizer, "agent", context=4096)
    planted(app, call_reply_ids(tokenizer, calls))
    expected = [(c["function"]["name"], c["function"]["arguments"]) for c in calls]
    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        reply = client.chat.completions.create(model="agent", messages=ASK, tools=TOOLS, temperature=0)
        streamed = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "messages": ASK, "tools": TOOLS, "stream": True})
        declined = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "messages": ASK, "tools": TOOLS, "tool_choice": "none"}).json()
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == expected
    assert all(c.type == "function" and c.id.startswith("call_") for c in choice.message.tool_calls)
    assert len({c.id for c in choice.message.tool_calls}) == len(calls)

    chunks = sse(streamed)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == ""  # the call's text never leaks as content
    sent = [call for d in deltas for call in d.get("tool_calls", [])]
    assert [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in sent] == \
           [(n, name, arguments) for n, (name, arguments) in enumerate(expected)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    # tool_choice "none": the reply is left as text
    assert declined["choices"][0]["finish_reason"] == "stop" and "get_weather" in declined["choices"][0]["message"][
        "content"] and "tool_calls" not in declined["choices"][0]["message"]


def test_words_before_a_call_stream_as_content_and_a_plain_reply_is_not_a_call(sftlab_home):
    model, tokenizer = load_for_inference(model="sftlab:tiny-qwen3", device="cpu", dtype="float32")
    renderer = ChatRenderer(tokenizer)
    turn = {"role": "assistant", "content": "Let me look.", "tool_calls": [function_call("get_time", {"city": "Oslo"})]}
    ids = renderer.encode(renderer.pieces([*ASK, turn], TOOLS)[-1][0])
    app = create_app(model, tokenizer, "agent", context=4096)
    planted(app, [i for i in ids if i not in renderer.stop_ids])
    with serving(app) as url:
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"messages": ASK, "tools": TOOLS}).json()
        chunks = sse(httpx.post(f"{url}/v1/chat/completions", timeout=60,
                                json={"messages": ASK, "tools": TOOLS, "stream": True}))
        # a function the request did not offer is no call: the text comes back as it is
        unknown = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "messages": ASK, "tools": TOOLS[:1]}).json()
    message = reply["choices"][0]["message"]
    assert message["content"] == "Let me look." and message["tool_calls"][0]["function"] == {
        "name": "get_time", "arguments": '{"city": "Oslo"}'}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "Let me look."
    assert unknown["choices"][0]["finish_reason"] == "stop"
    assert "<tool_call>" in unknown["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def url(tiny):
    model, tokenizer = tiny
    app = create_app(model, tokenizer, "tiny-glm4", context=4096)
    with serving(app) as base:
        yield base


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_completions_echo_logprobs_are_the_models_own(tiny, url):
    """What lm-eval's loglikelihood requests send (token ids, echo, logprobs 1, max_tokens 1) and max_tokens 0:
    every prompt token after the first has the log-probability one forward pass gives it, the first none."""
    model, tokenizer = tiny
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog", add_special_tokens=False)
    other = ids[:5]
    body = {"prompt": [ids, other], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    for choice, prompt in zip(response["choices"], (ids, other)):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(prompt) + 1 and logprobs["token_logprobs"][0] is None
        expected = forward_logprobs(model, prompt)
        for n in range(1, len(prompt)):
            assert logprobs["token_logprobs"][n] == pytest.approx(expected[n - 1, prompt[n]].item(), abs=1e-4)
            top = logprobs["top_logprobs"][n]
            best = expected[n - 1].argmax().item()
            assert max(top.values()) == pytest.approx(expected[n - 1, best].item(), abs=1e-4)
        greedy = expected[-1].argmax().item()  # temperature 0: the generated token is the argmax
        assert logprobs["token_logprobs"][-1] == pytest.approx(expected[-1, greedy].item(), abs=1e-4)
        assert choice["text"].startswith(tokenizer.decode(prompt))
        assert logprobs["text_offset"][1] == len(logprobs["tokens"][0])
    assert response["usage"]["prompt_tokens"] == len(ids) + len(other)
    assert response["usage"]["completion_tokens"] == 2

    zero = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "prompt": "The quick brown fox", "echo": True, "logprobs": 0, "max_tokens": 0}).json()
    prompt = tokenizer.encode("The quick brown fox")  # text is tokenized as the model's tokenizer does
    assert zero["choices"][0]["text"] == tokenizer.decode(prompt) and zero["usage"]["completion_tokens"] == 0
    assert len(zero["choices"][0]["logprobs"]["tokens"]) == len(prompt)
    assert zero["choices"][0]["finish_reason"] == "length"


def test_completions_generate_greedy_text_without_a_chat_template(tiny, url):
    model, tokenizer = tiny
    prompt = "Once upon a time"
    ids = tokenizer.encode(prompt)
    response = httpx.post(f"{url}/v1/completions", timeout=60,
                          json={"prompt": prompt, "max_tokens": 6, "temperature": 0}).json()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                             eos_token_id=sorted(ChatRenderer(tokenizer).stop_ids))
    new = [t for t in out[0, len(ids):].tolist() if t not in ChatRenderer(tokenizer).stop_ids]
    # cut at max_tokens, as every reply is: without a character the cut split (the untrained model writes bytes)
    assert response["choices"][0]["text"] == decode_complete(tokenizer, new)
    assert response["object"] == "text_completion" and response["usage"]["prompt_tokens"] == len(ids)
    streamed = httpx.post(f"{url}/v1/completions", timeout=60,
                          json={"prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": True})
    chunks = sse(streamed)
    assert "".join(c["choices"][0]["text"] for c in chunks) == response["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == response["choices"][0]["finish_reason"]


def test_chat_logprobs_and_top_logprobs(tiny, url):
    model, tokenizer = tiny
    response = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "messages": QUESTION, "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 3}).json()
    content = response["choices"][0]["logprobs"]["content"]
    prompt = ChatRenderer(tokenizer).prompt_ids(QUESTION)
    assert len(content) == response["usage"]["completion_tokens"] == 5  # 5 tokens, none a stop
    expected = forward_logprobs(model, prompt)
    first = content[0]
    assert first["logprob"] == pytest.approx(expected[-1].max().item(), abs=1e-4)  # greedy: the top token
    assert [t["logprob"] for t in first["top_logprobs"]] == pytest.approx(
        expected[-1].topk(3).values.tolist(), abs=1e-4)
    assert first["bytes"] == list(first["token"].encode())
    assert first["token"] == tokenizer.decode([expected[-1].argmax().item()])


def test_a_developer_message_is_a_system_message(tiny, url):
    system = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "system", "content": "Be brief."}, *QUESTION], "max_tokens": 3, "temperature": 0})
    developer = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "developer", "content": "Be brief."}, *QUESTION], "max_tokens": 3, "temperature": 0})
    assert developer.status_code == 200, developer.text
    assert developer.json()["usage"] == system.json()["usage"]
    assert developer.json()["choices"][0]["message"] == system.json()["choices"][0]["message"]


def test_max_tokens_is_bounded_by_the_context_left_not_a_fixed_cap(tiny):
    model, tokenizer = tiny
    app = create_app(model, tokenizer, "long", context=2048)
    planted(app, tokenizer.encode(" yes", add_special_tokens=False))
    prompt = len(ChatRenderer(tokenizer).prompt_ids(QUESTION))
    with serving(app) as url:
        asked = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                           json={"messages": QUESTION, "max_tokens": 1280})  # lm-eval's IFEval asks 1280
        over = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                          json={"messages": QUESTION, "max_tokens": 2048 - prompt + 1})
        exact = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                           json={"messages": QUESTION, "max_tokens": 2048 - prompt})
    assert asked.status_code == 200 and exact.status_code == 200, asked.text
    assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("extra, named", [
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1}, "frequency_penalty"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"tool_choice": "required", "tools": TOOLS}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True, "stream": True}, "logprobs with stream"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"top_k": 5, "min_p": 0.1}, "min_p, top_k"),
])
def test_a_parameter_the_server_does_not_honour_is_a_400_naming_it(url, extra, named):
    response = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                          json={"messages": QUESTION, "max_tokens": 2, **extra})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == f"not supported by this server: {named}" or \
        response.json()["error"]["message"].startswith(f"not supported by this server: {named}")
    assert response.json()["error"]["code"] == "unsupported_parameter"


def test_parameters_that_change_nothing_are_accepted(url):
    response = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "messages": QUESTION, "max_tokens": 2, "user": "u1", "metadata": {"k": "v"}, "store": False,
        "stream_options": None, "parallel_tool_calls": True, "presence_penalty": 0, "tool_choice": "auto",
        "response_format": {"type": "text"}})
    assert response.status_code == 200, response.text
    for extra in ({"suffix": "x"}, {"best_of": 2}, {"echo": True, "stream": True}, {"prompt": [[]]},
                  {"prompt": [10 ** 9]}):
        response = httpx.post(f"{url}/v1/completions", timeout=60, json={"prompt": "hi", "max_tokens": 1, **extra})
        assert response.status_code == 400, (extra, response.text)


def test_every_request_is_a_line_in_the_access_log(tiny, caplog):
    model, tokenizer = tiny
    app = create_app(model, tokenizer, "logged", limits=Limits(max_tokens=4), context=4096)
    planted(app, tokenizer.encode(" yes", add_special_tokens=False))
    with caplog.at_level(logging.INFO, logger="sftlab.serve"), serving(app) as url:
        httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"messages": QUESTION})
        httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"messages": QUESTION, "stream": True})
        httpx.post(f"{url}/v1/chat/completions", timeout=60, json={"messages": QUESTION, "max_tokens": 5})
        httpx.get(f"{url}/v1/nowhere", timeout=60)
    lines = [r.getMessage() for r in caplog.records if r.name == "sftlab.serve"]
    reply = len(tokenizer.encode(" yes", add_special_tokens=False)) + 1  # and the stop token
    prompt = len(ChatRenderer(tokenizer).prompt_ids(QUESTION))
    assert [line.split(" ", 1)[1].rsplit(" ms", 1)[0].rsplit(" ", 1)[0] for line in lines] == [
        '"POST /v1/chat/completions" 200', '"POST /v1/chat/completions" 200', '"POST /v1/chat/completions" 400',
        '"GET /v1/nowhere" 404']
    assert lines[0].endswith(f" prompt_tokens={prompt} completion_tokens={reply}")
    assert lines[1].endswith(f" prompt_tokens={prompt} completion_tokens={reply}")  # a stream: logged at its end
    assert lines[0].startswith("127.0.0.1 ") and lines[2].endswith(" ms")


def test_completions_release_every_slot_including_max_tokens_0_and_streams(tiny):
    model, tokenizer = tiny
    app = create_app(model, tokenizer, "slots", context=4096)
    with serving(app) as url:
        for body in ({"prompt": ["a", "b"], "max_tokens": 0, "echo": True, "logprobs": 1},
                     {"prompt": ["a", "b"], "max_tokens": 2}, {"prompt": "a", "max_tokens": 0, "stream": True},
                     {"prompt": "a", "max_tokens": 2, "stream": True}):
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
        zero = sse(httpx.post(f"{url}/v1/completions", json={"prompt": "a", "max_tokens": 0, "stream": True},
                              timeout=60))
        assert zero[-1]["choices"][0]["finish_reason"] == "length"
        assert app.state.engine.in_flight == 0
