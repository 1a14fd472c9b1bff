"""Ray Serve deployment and Ray Data path on a local Ray instance (one ray.init for the module, 2 CPUs)."""

from __future__ import annotations

import http.client
import json
import socket

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

from bertkit.encoder import SentenceEncoder  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ray.data.context warns about itself

TEXTS = ["hello world", "The quick brown fox jumps over the lazy dog.", "ok", "a b c d e f g",
         "Astronomers detected water vapour in the atmosphere of a planet orbiting a distant star."]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder.from_pretrained(None, device="cpu")


def test_ray_data_embeds_sharded_files(local_ray, encoder, tmp_path):
    from bertkit.serving.ray import embed_files

    shards = []
    for i, part in enumerate((TEXTS[:3], TEXTS[3:])):
        shards.append(tmp_path / f"part-{i}.txt")
        shards[-1].write_text("\n".join(part) + "\n")
    embed_files([str(s) for s in shards], str(tmp_path / "out"), batch_size=2, threads=1, num_cpus=1)
    table = ray.data.read_parquet(str(tmp_path / "out")).to_pandas()
    assert sorted(table["text"]) == sorted(TEXTS)
    got = np.stack(table["embedding"].to_numpy())
    expected = encoder.encode(list(table["text"]))
    np.testing.assert_allclose(got, expected, atol=2e-6)


def test_ray_serve_deployment_answers_the_bertkit_routes(local_ray, encoder):
    from ray import serve

    from bertkit.serving import ServeConfig
    from bertkit.serving.ray import deployment

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(deployment([None], ServeConfig(max_client_batch_size=4), threads=1,
                             ray_actor_options={"num_cpus": 1}), route_prefix="/")

        def post(path, body):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())

        status, rows = post("/embed", {"inputs": TEXTS[:4]})
        assert status == 200
        np.testing.assert_allclose(np.array(rows, dtype=np.float32), encoder.encode(TEXTS[:4]), atol=2e-6)
        status, body = post("/v1/embeddings", {"input": TEXTS[4]})
        assert status == 200
        np.testing.assert_allclose(body["data"][0]["embedding"], encoder.encode(TEXTS[4]), atol=2e-6)
        status, body = post("/embed", {"inputs": TEXTS})  # the replica's own limits hold
        assert status == 413 and "--max-client-batch-size 4" in body["error"]
    finally:
        serve.shutdown()
