"""A real `latentattn serve` process on 127.0.0.1 (a free port), driven by the official `openai` client and
by httpx for raw, malformed and abandoned requests.

Oracles: `latentattn generate --temperature 0` (a subprocess) for the greedy completion text; the
OpenAI error shape and status codes of the issue; /metrics for leaked blocks (every block free or held
only by the prefix cache once idle).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from latentattn import checkpoint as ckpt
from latentattn.cli import main
from latentattn.tokens import encode_prompt

STARTUP_SECONDS = 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cli(*args: str, **options) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "latentattn", *args], capture_output=True, text=True, timeout=120, **options
    )


class Server:
    """A `latentattn serve` subprocess; `stop()` sends SIGTERM and returns the exit code."""

    def __init__(self, checkpoint: Path, *flags: str) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        port = self.url.rsplit(":", 1)[1]
        command = [
            sys.executable,
            "-m",
            "latentattn",
            "serve",
            str(checkpoint),
            "--port",
            port,
            *flags,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.kill()
        raise AssertionError(f"the server did not start: {self.process.communicate()}")

    def stop(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {
            line.split()[0]: float(line.split()[1])
            for line in text.splitlines()
            if line.startswith("latentattn_")
        }

    def wait_idle(self, timeout: float = 10) -> dict[str, float]:
        """Metrics once nothing runs or waits."""
        deadline = time.monotonic() + timeout
        while True:
            metrics = self.metrics()
            if (
                metrics["latentattn_running"] == metrics["latentattn_waiting"] == 0
                or time.monotonic() > deadline
            ):
                return metrics
            time.sleep(0.05)


FLAGS = (
    "--num-blocks",
    "48",
    "--block-size",
    "4",
    "--threads",
    "1",
    "--max-batch-seqs",
    "4",
    "--max-queue",
    "4",
)


LONG_GREEDY = {"prompt": "def wrap(", "max_tokens": 50, "temperature": 0, "stream": True}
"""A streamed request of 50 steps (greedy: this checkpoint's continuation holds no EOS)."""


@pytest.fixture(scope="module")
def server(served_checkpoint) -> Iterator[Server]:
    running = Server(served_checkpoint, *FLAGS)
    try:
        yield running
    finally:
        running.kill()


def assert_all_blocks_free(metrics: dict[str, float]) -> None:
    assert metrics["latentattn_running"] == metrics["latentattn_waiting"] == 0
    cached = metrics["latentattn_blocks_prefix_cached"]
    assert metrics["latentattn_blocks_free"] + cached == metrics["latentattn_blocks_total"]


def test_openai_client_completions_stream_and_chat(server, served_checkpoint):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    (model,) = client.models.list().data
    prompt = "def wrap("
    completion = client.completions.create(model=model.id, prompt=prompt, max_tokens=8, temperature=0)
    (choice,) = completion.choices
    assert choice.finish_reason == "length" and completion.usage.completion_tokens == 8
    loaded = ckpt.load_checkpoint(served_checkpoint)
    assert completion.usage.prompt_tokens == len(encode_prompt(loaded.tokenizer, loaded.tokens, prompt))
    generated = cli(
        "generate", str(served_checkpoint), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "8"
    )
    assert generated.returncode == 0, generated.stderr
    expected = generated.stdout[
        len(prompt) : generated.stdout.rindex("\n\n", 0, generated.stdout.index(" new tokens in"))
    ]
    assert choice.text == expected

    streamed = client.completions.create(
        model=model.id, prompt=prompt, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"

    two = client.completions.create(model=model.id, prompt=[prompt, "import"], max_tokens=3, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == expected[
        : len(two.choices[0].text)
    ]

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model=model.id, messages=messages, max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(
        model=model.id,
        messages=messages,
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == chat.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == 5
    assert_all_blocks_free(server.wait_idle())


def test_stop_strings_end_the_text_before_them(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    full = (
        client.completions.create(model="m", prompt="def wrap(", max_tokens=12, temperature=0).choices[0].text
    )
    stop = full[3:5]
    cut = client.completions.create(model="m", prompt="def wrap(", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="m", prompt="def wrap(", max_tokens=12, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == full[: full.index(stop)]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),
        (b'{"prompt": 5}', 400, "prompt"),
        (b'{"prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
        (b'{"prompt": "x", "temperature": -1}', 400, "temperature"),
        (b'{"prompt": "x", "n": 2}', 400, "n"),
        (json.dumps({"prompt": "word " * 100}).encode(), 400, "context is 64"),
        (b'{"prompt": "x", "max_tokens": 63}', 400, "exceed the model's context of 64"),
        (b'{"messages": []}', 400, "messages"),
        (b'{"prompt": "' + b"x" * (1 << 20) + b'"}', 413, "exceeds"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(server, body, status, message):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    response = httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and message in error["message"]
    assert "Traceback" not in response.text


def test_unknown_routes_and_methods_are_openai_shaped(server):
    for response in (httpx.get(f"{server.url}/v1/nothing"), httpx.get(f"{server.url}/v1/completions")):
        assert response.status_code in (404, 405) and set(response.json()["error"]) >= {"message", "code"}


def test_a_full_queue_answers_429_with_retry_after(server):
    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            body = {"prompt": "def", "max_tokens": 40, "temperature": 0}
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(16)))

    responses = asyncio.run(flood())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429}, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"]["type"] == "rate_limit_error"
    assert_all_blocks_free(server.wait_idle())


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    whole = client.completions.create(model="m", **{**LONG_GREEDY, "stream": False})
    assert whole.choices[0].finish_reason == "length"  # no EOS: the request below would still be running
    with httpx.stream("POST", f"{server.url}/v1/completions", json=LONG_GREEDY) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert server.metrics()["latentattn_running"] == 1
    metrics = server.wait_idle()
    assert_all_blocks_free(metrics)
    assert metrics["latentattn_cancelled_total"] >= 1


def test_soak_with_random_disconnects_leaks_nothing(server):
    """300 short requests, 8 at a time against a queue of 4 (a 429 is retried), a third abandoned mid-way
    (streams closed after their first line, others timed out): no 5xx, every block back, still healthy."""
    rng = random.Random(0)

    async def one(client: httpx.AsyncClient, i: int) -> int | None:
        body = {
            "prompt": rng.choice(["def ", "import os", "x = ", "class A:"]) * rng.randint(1, 3),
            "max_tokens": rng.randint(1, 12),
            "temperature": rng.choice([0, 0.8]),
            "stream": i % 2 == 0,
        }
        abandon = rng.random() < 0.33
        try:
            if body["stream"]:
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    async for _ in response.aiter_lines():
                        if abandon:
                            break
                    return response.status_code
            timeout = 0.01 if abandon else 60
            return (await client.post("/v1/completions", json=body, timeout=timeout)).status_code
        except httpx.TimeoutException:
            return None

    async def patient(client: httpx.AsyncClient, i: int) -> int | None:
        """As a client honouring 429 would (sooner than its Retry-After, to keep the soak short)."""
        for _ in range(100):
            status = await one(client, i)
            if status != 429:
                return status
            await asyncio.sleep(0.02)
        return status

    async def soak() -> list[int | None]:
        limit = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:

            async def bounded(i: int) -> int | None:
                async with limit:
                    return await patient(client, i)

            return await asyncio.gather(*(bounded(i) for i in range(300)))

    start = time.monotonic()
    statuses = asyncio.run(soak())
    assert time.monotonic() - start < 60
    assert set(statuses) <= {200, 429, None}
    assert statuses.count(200) > 100
    assert_all_blocks_free(server.wait_idle())
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_loadtest_reports_latencies_against_the_server(server):
    args = ("--prompt-tokens", "2:8", "--output-tokens", "2:6", "--vocab", "300", "--json")
    closed = cli("loadtest", server.url, "--requests", "12", "--concurrency", "3", *args)
    assert closed.returncode == 0, closed.stderr
    report = json.loads(closed.stdout)
    assert report["completed"] == report["requests"] == 12 and report["errors"] == {}
    assert report["output_tokens"] >= 12 and report["output_tokens_per_s"] > 0
    for key in ("ttft_s", "itl_s", "e2e_s"):
        assert 0 < report[key]["p50"] <= report[key]["p90"] <= report[key]["p99"]
    poisson = cli("loadtest", server.url, "--rate", "50", "--requests", "1000", "--duration", "1", *args)
    assert poisson.returncode == 0 and 0 < json.loads(poisson.stdout)["requests"] < 1000
    table = cli("loadtest", server.url, "--requests", "2", "--output-tokens", "2")
    assert table.returncode == 0 and "TTFT" in table.stdout and "errors: none" in table.stdout
    assert_all_blocks_free(server.wait_idle())


def test_loadtest_counts_errors_and_checks_its_flags(capsys):
    assert main(["loadtest", f"http://127.0.0.1:{free_port()}", "--requests", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["errors"] == {"no response": 3}
    with pytest.raises(SystemExit) as exited:
        main(["loadtest", "http://127.0.0.1:1", "--rate", "1", "--concurrency", "2"])
    assert exited.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert main(["loadtest", "http://127.0.0.1:1", "--prompt-tokens", "9:3"]) == 2
    assert "1 <= LOW <= HIGH, got 9:3" in capsys.readouterr().err
    assert main(["loadtest", "127.0.0.1:8000"]) == 2
    assert "must start with http://" in capsys.readouterr().err


def test_sigterm_finishes_running_requests_refuses_new_ones_and_exits_0(served_checkpoint):
    server = Server(served_checkpoint, *FLAGS, "--max-batch-tokens", "1")
    try:
        with httpx.stream("POST", f"{server.url}/v1/completions", json=LONG_GREEDY) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            try:
                refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}, timeout=5)
                assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"
            except httpx.TransportError:
                pass  # the stream already ended and the server closed
            rest = list(lines)
        assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
        assert server.process.wait(timeout=30) == 0
        assert "Traceback" not in server.process.stderr.read()
    finally:
        server.kill()


def test_serve_cli_errors_are_one_line(served_checkpoint, tmp_path, capsys):
    missing = cli("serve", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and missing.stderr.startswith("latentattn serve: error:")
    assert len(missing.stderr.strip().splitlines()) == 1
    assert main(["serve", str(served_checkpoint), "--kv-budget", "lots"]) == 2
    assert "cannot read the size 'lots'" in capsys.readouterr().err
    assert main(["serve", str(served_checkpoint), "--kv-budget", "10B"]) == 2
    assert "holds no block" in capsys.readouterr().err
