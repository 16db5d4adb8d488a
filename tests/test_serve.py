"""``expertpred serve``: a real server subprocess on 127.0.0.1 with the shipped tiny model,
talked to with the official ``openai`` client (and httpx for raw bodies).

One server per module (``--trace-out``, one shard per request); the last test trains a
predictor on the routing the earlier tests' requests left in that trace."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from expertpred.shipped import model_gguf

ROOT = Path(__file__).resolve().parent.parent
MODEL = model_gguf("tiny-mixtral")
N_CTX = 256
GREEDY = dict(temperature=0.0, extra_body={"repeat_penalty": 1.0})  # what `run` does
PROMPTS = ["def read_config(path):", "The river was", "import numpy as np\n",
           "Once upon a time"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "expertpred.cli", *args], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


class Server:
    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        self.trace = tmp / "served-trace"
        self.log = open(tmp / "server.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "expertpred.cli", "serve", "--model", str(MODEL),
             "--port", str(self.port), "--n-ctx", str(N_CTX), "--trace-out", str(self.trace),
             "--trace-shard-rows", "1"], env=ENV, cwd=ROOT, stdout=self.log,
            stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.base + "/v1", api_key="unused",
                                    max_retries=0, timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited: {self.output()}"
            try:
                if httpx.get(self.base + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError(f"server not up in 60 s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def alive(self) -> None:
        assert self.proc.poll() is None, self.output()
        assert httpx.get(self.base + "/v1/models", timeout=10).status_code == 200

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.base + "/metrics", timeout=10).text
        return {s.name: s.value for fam in text_string_to_metric_families(text)
                for s in fam.samples}

    def complete(self, prompt: str, max_tokens: int = 12, stream: bool = False) -> str:
        r = self.client.completions.create(model="tiny-mixtral", prompt=prompt,
                                           max_tokens=max_tokens, stream=stream, **GREEDY)
        if not stream:
            return r.choices[0].text
        return "".join(c.choices[0].text for c in r)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    s = Server(tmp_path_factory.mktemp("serve"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def expected(server: Server) -> dict[str, str]:
    """Each prompt served alone, non-streamed: the reference for the other tests."""
    return {p: server.complete(p) for p in PROMPTS}


def test_models_lists_the_served_alias(server: Server) -> None:
    ids = [m.id for m in server.client.models.list()]
    assert ids == ["tiny-mixtral"]


def test_completion_equals_expertpred_run(server: Server, expected: dict[str, str]) -> None:
    prompt = PROMPTS[0]
    r = _cli("run", "--model", str(MODEL), "--prompt", prompt, "--max-tokens", "12",
             "--n-ctx", str(N_CTX), "--json")
    assert r.returncode == 0, r.stderr
    ran = json.loads(r.stdout.strip().splitlines()[-1])["text"]
    assert ran  # a non-empty greedy continuation
    assert expected[prompt] == ran
    assert server.complete(prompt, stream=True) == ran


def test_chat_completion_streamed_equals_not_streamed(server: Server) -> None:
    msgs = [{"role": "user", "content": "Write a function that reads a file."}]
    r = server.client.chat.completions.create(model="tiny-mixtral", messages=msgs,
                                              max_tokens=10, **GREEDY)
    text = r.choices[0].message.content
    assert text and r.choices[0].finish_reason in ("length", "stop")
    chunks = server.client.chat.completions.create(model="tiny-mixtral", messages=msgs,
                                                   max_tokens=10, stream=True, **GREEDY)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == text


def test_metrics_parse_and_counters_move(server: Server) -> None:
    before = server.metrics()
    r = server.client.completions.create(model="tiny-mixtral", prompt="Hello there",
                                         max_tokens=6, **GREEDY)
    after = server.metrics()
    gen = r.usage.completion_tokens
    assert gen >= 1
    assert after["expertpred_generated_tokens_total"] \
        - before["expertpred_generated_tokens_total"] == gen
    assert after["expertpred_requests_total"] - before["expertpred_requests_total"] == 1
    assert after["expertpred_plugin_tokens_total"] > before["expertpred_plugin_tokens_total"]
    uses = sum(after[f"expertpred_prefetch_{k}_total"] - before[f"expertpred_prefetch_{k}_total"]
               for k in ("hits", "late", "misses"))
    assert uses > 0  # every expert use is a hit, late or a miss
    assert after["expertpred_process_read_bytes_total"] >= 0
    assert after["expertpred_plugin_callback_errors_total"] == 0
    assert after["expertpred_trace_sequences_total"] > before["expertpred_trace_sequences_total"]


def test_four_concurrent_clients_get_their_own_output(server: Server,
                                                      expected: dict[str, str]) -> None:
    got: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            got[i] = server.complete(PROMPTS[i], stream=i % 2 == 1)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert [got[i] for i in range(len(PROMPTS))] == [expected[p] for p in PROMPTS]


def test_queued_requests_are_served_in_arrival_order(server: Server,
                                                    expected: dict[str, str]) -> None:
    """A long stream holds the context; three more requests are sent one after another,
    each once the server has admitted the one before (/metrics); they start in that order,
    and the first of them had to wait in the queue."""
    first_token: dict[int, float] = {}
    texts: dict[int, str] = {}
    errors: list[BaseException] = []
    running = threading.Event()

    def one(i: int) -> None:
        try:
            long = {"min_tokens": 96, "repeat_penalty": 1.0}  # no early end of text
            r = server.client.completions.create(
                model="tiny-mixtral", prompt="Long ago" if i == 0 else PROMPTS[i],
                max_tokens=96 if i == 0 else 12, stream=True, temperature=0.0,
                extra_body=long if i == 0 else GREEDY["extra_body"])
            parts = []
            for c in r:
                first_token.setdefault(i, time.monotonic())
                running.set()
                parts.append(c.choices[0].text)
            texts[i] = "".join(parts)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    base = server.metrics()["expertpred_requests_admitted_total"]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    threads[0].start()
    assert running.wait(60)
    queued = 0.0
    for i in (1, 2, 3):
        threads[i].start()
        deadline = time.monotonic() + 60
        while True:
            m = server.metrics()
            queued = max(queued, m["expertpred_requests_queued"])
            if m["expertpred_requests_admitted_total"] >= base + i + 1:
                break
            assert time.monotonic() < deadline and not errors, f"request {i} not admitted"
            time.sleep(0.02)
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert first_token[0] < first_token[1] < first_token[2] < first_token[3]
    assert [texts[i] for i in (1, 2, 3)] == [expected[p] for p in PROMPTS[1:]]
    assert queued >= 1  # request 1 was admitted while request 0 held the context


def test_client_disconnecting_mid_stream_leaves_server_serving(
        server: Server, expected: dict[str, str]) -> None:
    body = {"model": "tiny-mixtral", "prompt": PROMPTS[1], "max_tokens": 200, "stream": True,
            "temperature": 0.0}
    with httpx.stream("POST", server.base + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then hang up
    server.alive()
    assert server.complete(PROMPTS[2]) == expected[PROMPTS[2]]


@pytest.mark.parametrize("case", ["unknown model", "negative max_tokens",
                                  "negative chat max_tokens", "prompt over n_ctx",
                                  "streamed prompt over n_ctx", "malformed JSON",
                                  "JSON array body", "wrong type"])
def test_bad_request_gets_4xx_json_and_server_stays_up(server: Server, case: str) -> None:
    long = "word " * (2 * N_CTX)
    url, body = "/v1/completions", {"model": "tiny-mixtral", "prompt": "x", "max_tokens": 4}
    raw = None
    if case == "unknown model":
        body["model"] = "gpt-17"
    elif case == "negative max_tokens":
        body["max_tokens"] = -5
    elif case == "negative chat max_tokens":
        url, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                             "max_tokens": -1}
    elif case == "prompt over n_ctx":
        body["prompt"] = long
    elif case == "streamed prompt over n_ctx":
        body.update(prompt=long, stream=True)
    elif case == "malformed JSON":
        raw = b'{"prompt": "x", '
    elif case == "JSON array body":
        raw = b"[1, 2]"
    elif case == "wrong type":
        body["temperature"] = "hot"
    r = httpx.post(server.base + url, json=body if raw is None else None, content=raw,
                   headers={"content-type": "application/json"}, timeout=30)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    server.alive()


def test_openai_client_raises_on_unknown_model(server: Server) -> None:
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="gpt-17", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        server.client.completions.create(model="tiny-mixtral", prompt="x", max_tokens=-2)
    server.alive()


def test_served_trace_trains_a_predictor(server: Server, tmp_path: Path) -> None:
    from expertpred.trace.dataset import TraceDataset

    # this test's own sequences, not the module's earlier requests: 8 new prompts, enough
    # that the prompt-id hash split has train prompts
    before = (TraceDataset(server.trace).n_sequences
              if (server.trace / "_manifest.json").exists() else 0)
    for p in PROMPTS:
        for suffix in (" again", " once more"):
            server.complete(p + suffix, max_tokens=8)
    ds = TraceDataset(server.trace)
    assert ds.n_sequences >= before + 2 * len(PROMPTS)
    seqs = list(ds.sequences())
    assert all(s.prompt_id.startswith("sha256:") and s.text == "" for s in seqs)  # private
    assert all((s.experts >= 0).all() for s in seqs)
    r = _cli("train", f"--dataset={server.trace}", f"--out={tmp_path / 'pred'}",
             "--predictors=popularity,previous-token", "--offsets=1", "--plots=false",
             f"--gguf={MODEL}")
    assert r.returncode == 0, r.stdout + r.stderr
    saved = sorted(p.name for p in (tmp_path / "pred" / "models").glob("*.npz"))
    assert saved == ["nextuse.npz", "popularity-d1.npz", "previous-token-d1.npz"]
    server.alive()


@pytest.mark.parametrize("case", ["missing model", "port in use", "bad budget",
                                  "trace without callback"])
def test_cli_errors_are_one_line_exit_2(case: str, tmp_path: Path) -> None:
    args = ["serve", "--model", str(MODEL), "--port", str(_free_port())]
    busy = None
    if case == "missing model":
        args[2] = str(tmp_path / "nope.gguf")
    elif case == "port in use":
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args[4] = str(busy.getsockname()[1])
    elif case == "bad budget":
        args += ["--budget", "lots"]
    elif case == "trace without callback":
        args += ["--mode", "off", "--trace-out", str(tmp_path / "t")]
    try:
        r = _cli(*args, timeout=60)
    finally:
        if busy is not None:
            busy.close()
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
