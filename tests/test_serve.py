"""`bertkit serve` end to end: a real uvicorn process on a free loopback port, real HTTP (http.client).

Every route is checked against the in-process SentenceEncoder / tokenizer; every limit and error code,
the API key, two models in one process, a failing batch, a client that leaves, and SIGTERM with requests
in flight. The server runs through a small launcher that wraps the model's forward: a row holding the
word "explode" raises, "sleepy" sleeps $SLEEP seconds, "tired" one second (nothing of this is in bertkit).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from bertkit.encoder import SentenceEncoder, bundled_model_dir  # noqa: E402

KEY = "s3cret"
LAUNCHER = r'''
import os, sys, time
from bertkit.serving import backends

forward = backends.EmbeddingModel.forward

def patched(self, ids, types):
    vocab = self.tokenizer.convert_tokens_to_ids
    if any(vocab("explode") in row for row in ids):
        raise RuntimeError("boom: a row holds 'explode'")
    if any(vocab("sleepy") in row for row in ids):
        time.sleep(float(os.environ["SLEEP"]))
    elif any(vocab("tired") in row for row in ids):
        time.sleep(1.0)
    return forward(self, ids, types)

backends.EmbeddingModel.forward = patched
from bertkit.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: Path, args: list[str], sleep: float = 3.5):
        tmp.mkdir(parents=True, exist_ok=True)
        launcher = tmp / "launch.py"
        launcher.write_text(LAUNCHER)
        self.port = _free_port()
        self.log = open(tmp / "server.log", "w+")
        env = {**os.environ, "SLEEP": str(sleep)}
        self.proc = subprocess.Popen([sys.executable, str(launcher), "serve", "--port", str(self.port),
                                      "--threads", "1", "--log-level", "warning", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        self.health_seen = []  # /health answers while starting: 503 {"status": "loading"} until warm
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                self.health_seen.append(self.request("GET", "/health"))
                if self.health_seen[-1][0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("server did not become healthy:\n" + self.output())

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def request(self, method: str, path: str, body=None, key: str | None = KEY, raw: bytes | None = None,
                headers: dict | None = None, timeout: float = 60):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        head = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            head["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers=head)
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        if resp.getheader("content-type", "").startswith("application/json"):
            return resp.status, json.loads(payload)
        return resp.status, payload.decode()

    def metric(self, name: str, **labels) -> float:
        text = self.request("GET", "/metrics")[1]
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf'^{name}(?:{{(.*)}})? (\S+)$', line)
            if m and all(part in (m.group(1) or "") for part in want.split(",") if part):
                total += float(m.group(2))
        return total

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def cls_folder(tmp_path_factory) -> Path:
    # A second model that answers differently: the bundled weights with CLS pooling and no Normalize.
    src, dst = bundled_model_dir(), tmp_path_factory.mktemp("cls-model")
    for item in src.iterdir():
        if item.name not in ("modules.json", "1_Pooling", "2_Normalize"):
            (dst / item.name).symlink_to(item)
    modules = [m for m in json.loads((src / "modules.json").read_text()) if "Normalize" not in m["type"]]
    (dst / "modules.json").write_text(json.dumps(modules))
    (dst / "1_Pooling").mkdir()
    (dst / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 384, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    return dst


@pytest.fixture(scope="module")
def encoders(cls_folder):
    return {"minilm": SentenceEncoder.from_pretrained(None, device="cpu"),
            "cls": SentenceEncoder.from_pretrained(cls_folder, device="cpu")}


@pytest.fixture(scope="module")
def server(tmp_path_factory, cls_folder):
    srv = Server(tmp_path_factory.mktemp("serve"), [
        "--model", f"minilm={bundled_model_dir()}", "--model", f"cls={cls_folder}", "--api-key", KEY,
        "--max-client-batch-size", "8", "--payload-limit", "20000", "--max-concurrent-requests", "4",
        "--request-timeout", "3", "--max-batch-tokens", "4096"], sleep=3.5)
    yield srv
    srv.stop()


TEXTS = ["hello world", "The quick brown fox jumps over the lazy dog.", "ok",
         "Astronomers detected water vapour in the atmosphere of a planet orbiting a distant star."]


# ------------------------------------------------------------------------------------------- routes
def test_embed_matches_encode(server, encoders):
    status, rows = server.request("POST", "/embed", {"inputs": TEXTS})
    assert status == 200
    np.testing.assert_allclose(np.array(rows, dtype=np.float32), encoders["minilm"].encode(TEXTS), atol=2e-6)
    status, one = server.request("POST", "/embed", {"inputs": "hello world", "normalize": False, "dimensions": 16})
    assert status == 200 and len(one) == 1 and len(one[0]) == 16
    raw = encoders["minilm"].encode("hello world", normalize_embeddings=False)[:16]
    np.testing.assert_allclose(one[0], raw, atol=2e-6)
    status, cut = server.request("POST", "/embed", {"inputs": "hello world", "dimensions": 16})
    np.testing.assert_allclose(cut[0], raw / np.linalg.norm(raw), atol=2e-6)  # Matryoshka: cut, then normalize


def test_two_models_in_one_process(server, encoders):
    status, rows = server.request("POST", "/embed", {"inputs": TEXTS, "model": "cls"})
    assert status == 200
    expected = encoders["cls"].encode(TEXTS)
    np.testing.assert_allclose(np.array(rows, dtype=np.float32), expected, atol=2e-6)
    assert not np.allclose(expected, encoders["minilm"].encode(TEXTS), atol=1e-2)  # really another model
    status, listing = server.request("GET", "/v1/models")
    assert [m["id"] for m in listing["data"]] == ["minilm", "cls"]
    status, body = server.request("POST", "/embed", {"inputs": "x", "model": "nope"})
    assert status == 404 and "'nope'" in body["error"] and "'minilm'" in body["error"]


def test_openai_embeddings(server, encoders):
    status, body = server.request("POST", "/v1/embeddings", {"input": TEXTS[:2], "model": "minilm"})
    assert status == 200 and body["object"] == "list" and body["model"] == "minilm"
    np.testing.assert_allclose([d["embedding"] for d in body["data"]], encoders["minilm"].encode(TEXTS[:2]),
                               atol=2e-6)
    tokens = sum(len(ids) for ids in encoders["minilm"].tokenizer(TEXTS[:2], padding=False,
                                                                  return_tensors=None)["input_ids"])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}  # 4 + 12 with [CLS]/[SEP]
    status, b64 = server.request("POST", "/v1/embeddings", {"input": "hello world", "encoding_format": "base64",
                                                            "dimensions": 8})
    vec = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    raw = encoders["minilm"].encode("hello world")[:8]
    np.testing.assert_allclose(vec, raw / np.linalg.norm(raw), atol=2e-6)
    status, err = server.request("POST", "/v1/embeddings", {"input": 3})
    assert status == 422 and err["error"]["message"].startswith("input:") and err["error"]["code"] == 422


def test_tokenize_info_health_metrics(server):
    status, toks = server.request("POST", "/tokenize", {"inputs": "Hello world"})
    assert status == 200
    assert toks == [[{"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None},
                     {"id": 7592, "text": "hello", "special": False, "start": 0, "stop": 5},
                     {"id": 2088, "text": "world", "special": False, "start": 6, "stop": 11},
                     {"id": 102, "text": "[SEP]", "special": True, "start": None, "stop": None}]]
    status, info = server.request("GET", "/info")
    assert status == 200 and info["model_id"] == "minilm" and info["max_input_length"] == 256
    assert info["model_type"] == {"embedding": {"pooling": "mean"}} and info["max_client_batch_size"] == 8
    assert [m["model_type"] for m in info["models"]][1] == {"embedding": {"pooling": "cls"}}
    assert server.request("GET", "/health", key=None) == (200, {"status": "ok"})
    assert server.health_seen[0] == (503, {"status": "loading"})  # the port opens before the models load
    assert server.metric("bertkit_requests_total", route="/tokenize", status="200") >= 1
    assert server.request("POST", "/embed", {"inputs": "Hello world"})[0] == 200
    assert server.metric("bertkit_tokens_total", model="minilm") >= 4
    for series in ("bertkit_request_duration_seconds_bucket", "bertkit_queue_wait_seconds_count",
                   "bertkit_batch_tokens_count", "bertkit_inference_seconds_count", "bertkit_queue_rows"):
        assert series in server.request("GET", "/metrics")[1]


def test_requests_are_batched_across_clients(server, encoders):
    before = server.metric("bertkit_batch_texts_count", model="minilm")
    texts = [f"sentence number {i} " + "word " * (i % 5) for i in range(24)]
    # One slow row first, so the others queue up behind the running batch and must share later ones.
    out = {}

    def one(i):
        out[i] = server.request("POST", "/embed", {"inputs": texts[i]})

    slow = threading.Thread(target=server.request, args=("POST", "/embed", {"inputs": "tired"}))
    slow.start()
    time.sleep(0.2)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    slow.join()
    assert all(out[i][0] == 200 for i in range(3)), out
    np.testing.assert_allclose([out[i][1][0] for i in range(3)], encoders["minilm"].encode(texts[:3]), atol=2e-6)
    # 4 requests (tired + 3 queued behind it) ran in 2 batches: the 3 waiting ones travelled together.
    assert server.metric("bertkit_batch_texts_count", model="minilm") - before == 2


# ------------------------------------------------------------------------------------------- limits
def test_api_key(server):
    status, body = server.request("POST", "/embed", {"inputs": "x"}, key=None)
    assert status == 401 and "Authorization: Bearer" in body["error"]
    assert server.request("POST", "/embed", {"inputs": "x"}, key="wrong")[0] == 401
    assert server.request("GET", "/metrics", key=None)[0] == 401
    assert server.request("GET", "/health", key=None)[0] == 200  # probes carry no key


def test_validation_errors_name_the_field(server):
    cases = [({"inputs": ["a", 3]}, "inputs: item 1 is a number, expected a string"),
             ({"inputs": []}, "inputs: must not be empty"),
             ({"normalize": True}, "inputs: required field is missing"),
             ({"inputs": "a", "normalize": "yes"}, "normalize: Input should be a valid boolean"),
             ({"inputs": "a", "dimensions": 0}, "dimensions: Input should be greater than 0"),
             ({"inputs": "a", "dimensions": 385}, "dimensions: 385 is more than the model's 384"),
             ([1, 2], "body: expected a JSON object, got a list")]
    for body, message in cases:
        status, answer = server.request("POST", "/embed", body)
        assert (status, answer["error"]) == (422, message)
    status, answer = server.request("POST", "/embed", raw=b'{"inputs": ')
    assert status == 422 and answer["error"].startswith("body: not valid JSON")
    status, answer = server.request("POST", "/tokenize", {"inputs": "a", "model": 5})
    assert (status, answer["error"]) == (422, "model: Input should be a valid string")


def test_size_limits_413(server, encoders):
    status, body = server.request("POST", "/embed", {"inputs": ["a"] * 9})
    assert status == 413 and "9 inputs, more than --max-client-batch-size 8" in body["error"]
    status, body = server.request("POST", "/embed", {"inputs": "a" * 30000})
    assert status == 413 and "--payload-limit 20000" in body["error"]
    long = " ".join(["word"] * 300)
    status, body = server.request("POST", "/embed", {"inputs": ["short", long]})
    assert status == 413 and body["error"].startswith("input 1 has 302 tokens, more than the model's limit of 256")
    status, rows = server.request("POST", "/embed", {"inputs": long, "truncate": True})
    assert status == 200
    np.testing.assert_allclose(rows[0], encoders["minilm"].encode(long), atol=2e-6)  # encode truncates at 256
    assert server.metric("bertkit_rejected_total", reason="input_too_long") >= 1


def test_timeout_504_then_keeps_serving(server):
    start = time.monotonic()
    status, body = server.request("POST", "/embed", {"inputs": "sleepy"})
    assert status == 504 and "--request-timeout 3" in body["error"]
    assert 2.9 < time.monotonic() - start < 4.5
    assert server.request("POST", "/embed", {"inputs": "after"})[0] == 200


def test_failing_batch_500_then_keeps_serving(server):
    status, body = server.request("POST", "/embed", {"inputs": ["fine", "explode"]})
    assert status == 500 and body["error_type"] == "Backend" and "boom" in body["error"]
    assert server.request("POST", "/embed", {"inputs": ["fine"]})[0] == 200
    assert server.metric("bertkit_batch_failures_total", model="minilm") >= 1


def test_too_many_concurrent_requests_429(server):
    threads = [threading.Thread(target=server.request, args=("POST", "/embed", {"inputs": "tired"}))
               for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while server.metric("bertkit_requests_in_flight") < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    status, body = server.request("POST", "/embed", {"inputs": "x"})
    assert status == 429 and "--max-concurrent-requests 4" in body["error"]
    for t in threads:
        t.join()
    assert server.request("POST", "/embed", {"inputs": "x"})[0] == 200


def test_disconnected_client_frees_its_rows(server):
    busy = threading.Thread(target=server.request, args=("POST", "/embed", {"inputs": "sleepy"}))
    busy.start()
    time.sleep(0.3)  # the runner is now inside the sleeping batch
    texts_before = server.metric("bertkit_batch_texts_sum", model="minilm")
    body = json.dumps({"inputs": ["left behind"] * 7}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + 5
    while server.metric("bertkit_queue_rows", model="minilm") < 7 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("bertkit_queue_rows", model="minilm") == 7
    sock.close()  # the client leaves while its 7 rows wait
    busy.join()
    assert server.request("POST", "/embed", {"inputs": "next"})[0] == 200
    assert server.metric("bertkit_rejected_total", reason="client_disconnected") >= 1
    # Batches counted since: the sleeping one (recorded when it ends) and "next"; the 7 rows never ran.
    assert server.metric("bertkit_batch_texts_sum", model="minilm") - texts_before == 2


# ------------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_drains_in_flight_requests_and_exits_0(tmp_path, encoders):
    srv = Server(tmp_path, ["--drain-seconds", "1"], sleep=1.5)
    try:
        answers = {}

        def one(i, text):
            answers[i] = srv.request("POST", "/embed", {"inputs": text}, key=None)

        texts = ["sleepy", "first", "second", "third"]
        threads = [threading.Thread(target=one, args=(i, t)) for i, t in enumerate(texts)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while srv.metric("bertkit_requests_in_flight") < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        assert srv.request("GET", "/health")[0] == 503  # readiness fails first, the port is still open
        for t in threads:
            t.join()
        assert srv.proc.wait(timeout=30) == 0, srv.output()
        assert all(answers[i][0] == 200 for i in range(4)), answers
        np.testing.assert_allclose([answers[i][1][0] for i in range(4)], encoders["minilm"].encode(texts),
                                   atol=2e-6)
        with pytest.raises(OSError):
            srv.request("GET", "/health")
    finally:
        srv.stop()


def test_cli_errors_exit_2_without_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "bertkit", "serve", "--model", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "does not exist" in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_without_the_serve_extra_says_how_to_install_it():
    code = "import sys; sys.modules['starlette'] = None; from bertkit.cli import main; sys.exit(main(['serve']))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "pip install 'bertkit[serve]'" in run.stderr and len(run.stderr.strip().splitlines()) == 1
