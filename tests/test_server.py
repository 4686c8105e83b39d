"""`dgemma serve` as a real process on loopback, on the embedded default model, through the official
`openai` client and plain HTTP: plain and streamed answers, concurrency, dropped streams, errors, auth,
metrics."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

MODEL = "default_model"  # the served id: the embedded model's directory name
PROMPT = 'def add(a, b):\n    """Return a + b."""\n'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str):
    port = free_port()
    env = {**os.environ, "DGEMMA_MODEL": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dgemma.cli", "serve", "--port", str(port), "--device", "cpu", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read().decode()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--max-running", "32")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def complete(client, seed: int, max_tokens: int = 24, prompt: str = PROMPT):
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, seed=seed)


def test_plain_and_streamed_answers_agree(client):
    plain = complete(client, seed=1)
    assert plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens <= 24
    assert plain.usage.model_extra["tokens_per_forward"] > 1
    pieces, finish = [], None
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, seed=1, stream=True):
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == plain.choices[0].text and finish == plain.choices[0].finish_reason

    messages = [{"role": "user", "content": "write add"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, seed=2)
    streamed = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, seed=2, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed)
    assert text == chat.choices[0].message.content


def test_openai_defaults_sent_explicitly_change_nothing(client, server):
    """Clients often send OpenAI's defaults (temperature 1, top_p 1, n 1, chat logprobs false): accepted
    as asking for nothing; another temperature is refused with what to send instead."""
    messages = [{"role": "user", "content": "write add"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, seed=2)
    spelled = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, seed=2, temperature=1.0, top_p=1, n=1,
        logprobs=False, presence_penalty=0.0, frequency_penalty=0,
    )  # fmt: skip
    assert spelled.choices[0].message.content == plain.choices[0].message.content
    body = {"model": MODEL, "messages": messages, "temperature": 0}
    error = httpx.post(server + "/v1/chat/completions", json=body, timeout=30).json()["error"]
    assert error["param"] == "temperature" and "t_max" in error["message"] and "t_min" in error["message"]


def test_max_tokens_holds_exactly(client):
    out = complete(client, seed=3, max_tokens=100, prompt="import os\n")
    assert out.usage.completion_tokens == 100 or out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens <= 100


def test_32_concurrent_seeded_answers_equal_their_one_at_a_time_answers(client):
    seeds = range(100, 132)
    alone = {s: complete(client, seed=s, max_tokens=16).choices[0].text for s in seeds}
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = dict(
            zip(seeds, pool.map(lambda s: complete(client, seed=s, max_tokens=16).choices[0].text, seeds))
        )
    assert together == alone


def test_a_dropped_stream_is_cancelled_and_the_server_stays_healthy(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the first event arrived; now hang up
    deadline = time.time() + 30
    while time.time() < deadline:
        metrics = httpx.get(server + "/metrics").text
        if "dgemma_running_requests 0" in metrics and 'reason="cancelled"' in metrics:
            break
        time.sleep(0.2)
    assert "dgemma_running_requests 0" in metrics and 'reason="cancelled"' in metrics
    assert httpx.get(server + "/health").json() == {"status": "ok"}


def cancelled(server) -> int:
    for line in httpx.get(server + "/metrics").text.splitlines():
        if line.startswith('dgemma_requests_finished_total{reason="cancelled"}'):
            return int(line.split()[-1])
    return 0


# a request that keeps the CPU busy for many seconds: no EOS, and every canvas runs all its 12 steps (a
# stability test it can never pass: the model's canvases otherwise settle early, the pads fastest)
LONG_WORK = {"ignore_eos": True, "max_denoising_steps": 12, "stability_threshold": 10**6}


def test_a_client_that_gives_up_on_a_plain_request_frees_its_row(server):
    """Its canvases commit every 4 steps (a few tenths of a second), more often than the server checks for
    a hang-up: the check must still happen, not wait for a quiet moment that never comes."""
    frequent = {**LONG_WORK, "max_denoising_steps": 4}
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1900, **frequent}  # 120 steps: ~10 s of work
    before = cancelled(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/completions", json=body, timeout=1.5)
    deadline = time.time() + 2
    while time.time() < deadline and cancelled(server) == before:
        time.sleep(0.1)
    assert cancelled(server) == before + 1
    assert "dgemma_running_requests 0" in httpx.get(server + "/metrics").text


def test_drafts_are_an_opt_in_extension(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "stream": True, "drafts": True, "seed": 0}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    objects = [json.loads(e)["object"] for e in events[:-1]]
    assert objects[0] == "dgemma.draft" and objects[-1] == "text_completion"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        ({"model": MODEL, "prompt": PROMPT, "max_tokens": "ten"}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": PROMPT, "entropy_bound": -1}, 400, "entropy_bound"),
        ({"model": MODEL, "prompt": PROMPT, "stream": "yes"}, 400, "stream"),
        ({"model": MODEL, "prompt": PROMPT, "n": 2}, 400, "n"),
        ({"model": MODEL, "prompt": PROMPT, "temperature": 0.2}, 400, "temperature"),
        ({"model": MODEL, "prompt": PROMPT, "top_p": True}, 400, "top_p"),
        ({"model": MODEL, "prompt": PROMPT, "logprobs": 0}, 400, "logprobs"),
        ({"model": MODEL, "prompt": ""}, 400, "prompt"),
        ({"model": "gpt-4", "prompt": PROMPT}, 404, "model"),
        ({"model": MODEL, "prompt": "x " * 3000}, 400, "prompt"),
        ({"model": MODEL, "prompt": PROMPT, "max_tokens": 100000}, 400, "max_tokens"),
    ],
)
def test_bad_requests_get_openai_errors_naming_the_field(server, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server + "/v1/completions", content=content, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["param"] == param
    assert "max_new_tokens" not in error["message"]  # the engine's name: clients sent max_tokens


def test_context_errors_give_the_numbers(server):
    response = httpx.post(
        server + "/v1/completions", json={"model": MODEL, "prompt": "x " * 3000}, timeout=30
    )
    assert "context" in response.json()["error"]["message"] and "2048" in response.json()["error"]["message"]


def test_models_metrics_and_unknown_routes(server):
    assert httpx.get(server + "/v1/models").json()["data"][0]["id"] == MODEL
    metrics = httpx.get(server + "/metrics").text
    for series in ("dgemma_requests_total", "dgemma_queue_depth", "dgemma_request_latency_seconds_bucket"):
        assert series in metrics
    assert httpx.get(server + "/v1/nothing").status_code == 404


def test_api_key_and_a_full_queue():
    proc, url = start_server(
        "--api-key", "sekrit", "--max-running", "1", "--max-waiting", "0", "--request-timeout", "8"
    )  # 8 s: the first canvas (1-3 s on two busy cores) arrives well before it, the 1500 tokens never do
    try:
        assert httpx.get(url + "/health").status_code == 200  # no key needed
        assert httpx.get(url + "/v1/models").status_code == 401
        auth = {"Authorization": "Bearer sekrit"}
        assert httpx.get(url + "/v1/models", headers=auth).status_code == 200
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1500, "stream": True, **LONG_WORK}
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth, timeout=60) as first:
            lines = first.iter_lines()
            next(lines)
            second = httpx.post(
                url + "/v1/completions", json={**body, "stream": False}, headers=auth, timeout=30
            )
            assert second.status_code == 503 and second.headers["retry-after"] == "1"
            # the long stream passes its 8 s timeout: an error event ends it and its row is freed
            events = [line for line in lines if line.startswith("data: ")]
        assert json.loads(events[-1][6:])["error"]["type"] == "timeout"
        deadline = time.time() + 5
        while "dgemma_running_requests 0" not in httpx.get(url + "/metrics", headers=auth).text:
            assert time.time() < deadline, "the timed-out stream kept its row"
            time.sleep(0.1)
        plain = httpx.post(url + "/v1/completions", json={**body, "stream": False}, headers=auth, timeout=30)
        assert plain.status_code == 504 and "8 s" in plain.json()["error"]["message"]
        assert httpx.get(url + "/health").status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_schemathesis_finds_no_server_error(server):
    """A bounded property-based run over the server's own OpenAPI document: no request it allows may
    get a 5xx. Generations are kept short for CPU time."""
    schema = schemathesis.openapi.from_url(server + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 4
    statuses = []
    for operation in operations:

        @given(operation.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
        def run(case):
            if isinstance(case.body, dict):
                case.body["max_tokens"] = 4
                case.body["stream"] = False
            response = case.call_and_validate(base_url=server, checks=[not_a_server_error], timeout=60)
            statuses.append(response.status_code)

        run()
    assert len(statuses) >= 30 and 200 in statuses  # it ran, and some generated requests were valid
