"""llamette.ray on a Ray cluster that the tests start on this machine: two replicas of the
bundled model (1 CPU and 1 kernel thread each) behind Ray Serve, answering as `llamette serve`."""

import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import llamette
from conftest import serving
from llamette.server import ServedModel

ray = pytest.importorskip("ray", reason="Ray is the ray extra's (pip install -e .[test])")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx", reason="httpx is a test dependency")
openai = pytest.importorskip("openai", reason="openai is a test dependency")

BUNDLED = Path(llamette.__file__).parent / "bundled" / "model.bin"
REQUEST_TIMEOUT = 60  # seconds Ray Serve's proxy gives a request (llamette serve --request-timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cluster_url():
    """Ray Serve's address, two replicas ready; the cluster stopped after the module."""
    from llamette.ray import app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port,
                                  "request_timeout_s": REQUEST_TIMEOUT})  # fmt: skip
        options = {
            "model": str(BUNDLED),
            "replicas": "2",
            "threads": "1",
            "name": "llamette-stories",
        }
        serve.run(app(options),
                  name="llamette", route_prefix="/")  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while httpx.get(f"{url}/health", timeout=60).status_code != 200:
            assert time.monotonic() < deadline, "the replicas did not get ready"
            time.sleep(0.5)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_openai_client_completes_streams_and_chats(cluster_url):
    client = openai.OpenAI(base_url=f"{cluster_url}/v1", api_key="none")
    model = client.models.list().data[0].id
    plain = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12,
                                      temperature=0)  # fmt: skip
    streamed = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12,
                                         temperature=0, stream=True)  # fmt: skip
    assert "".join(chunk.choices[0].text for chunk in streamed) == plain.choices[0].text
    chat = client.chat.completions.create(model=model, max_tokens=12,
                                          messages=[{"role": "user", "content": "Tell a story"}])  # fmt: skip
    assert plain.choices[0].text and chat.choices[0].message.content


def body(index: int) -> dict:
    return {"model": "llamette-stories", "prompt": f"Lily and the dog number {index}",
            "max_tokens": 24, "temperature": 0.8, "seed": index}  # fmt: skip


def test_concurrent_seeded_requests_get_llamette_serves_tokens_from_both_replicas(cluster_url):
    def ask(url: str, index: int) -> tuple[str, str | None]:
        answer = httpx.post(f"{url}/v1/completions", json=body(index), timeout=300)
        assert answer.status_code == 200, answer.text
        return answer.json()["choices"][0]["text"], answer.headers.get("x-llamette-replica")

    with ThreadPoolExecutor(32) as pool:
        on_ray = list(pool.map(lambda i: ask(cluster_url, i), range(32)))
    with serving(ServedModel.load(str(BUNDLED), name="llamette-stories")) as url:
        alone = [ask(url, i)[0] for i in range(32)]
    assert [text for text, _ in on_ray] == alone
    assert len({replica for _, replica in on_ray}) == 2


def test_a_killed_replica_is_replaced_and_no_request_hangs(cluster_url):
    """One replica's actor killed during a load: every request ends within its timeout,
    answered or (at most the 16 the victim held) failed by Ray's proxy, the other replica goes
    on answering, and Ray starts a new replica."""

    def ask(index: int) -> tuple[int, str | None]:
        try:
            answer = httpx.post(f"{cluster_url}/v1/completions", json=body(index),
                                timeout=2 * REQUEST_TIMEOUT)  # fmt: skip
        except httpx.TimeoutException:
            return -1, f"no answer in {2 * REQUEST_TIMEOUT} s"  # a hang
        if answer.status_code != 200:
            return answer.status_code, answer.text
        return answer.status_code, answer.headers.get("x-llamette-replica")

    # sequential requests to idle replicas may all go to one (Ray routes to the least loaded),
    # so the two replicas' names come from concurrent requests, asked again until both answer
    before: set[str | None] = set()
    deadline = time.monotonic() + 120
    while len(before) < 2:
        assert time.monotonic() < deadline, f"only {before} answered"
        with ThreadPoolExecutor(8) as pool:
            before |= {replica for status, replica in pool.map(ask, range(8)) if status == 200}
    assert len(before) == 2
    victim = sorted(before)[0]
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(ask, i) for i in range(48)]
        time.sleep(1.0)
        ray.kill(ray.get_actor(f"SERVE_REPLICA::llamette#Replica#{victim}", namespace="serve"),
                 no_restart=True)  # fmt: skip
        during = [future.result(timeout=300) for future in futures]
    # the status Ray's proxy gives a request lost with its replica is Ray's: 500 where the
    # actor's death reaches it, 408 after the request's timeout where it does not (seen in CI,
    # 1 request of 48); what must hold is that each ends, and only those the victim held
    failed = [(status, text) for status, text in during if status != 200]
    assert all(status >= 400 for status, _ in failed) and len(failed) <= 16, failed
    assert any(status == 200 and replica != victim for status, replica in during)
    deadline = time.monotonic() + 300
    while not {replica for status, replica in map(ask, range(8)) if status == 200} - before:
        assert time.monotonic() < deadline, "no new replica"
        time.sleep(1)  # until a replica Ray started since answers


def test_app_arguments_are_checked():
    from llamette.ray import app

    with pytest.raises(llamette.LlametteError, match="model=PATH is needed"):
        app({"replicas": "2"})
    with pytest.raises(llamette.LlametteError, match="unknown arguments colour"):
        app({"model": str(BUNDLED), "colour": "red"})
    with pytest.raises(llamette.LlametteError, match="replicas='two' is not valid"):
        app({"model": str(BUNDLED), "replicas": "two"})


def llamette_serve(*flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "llamette", "serve", "--replicas", "1", *flags]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_command_serves_until_sigterm_and_says_why_replicas_fail():
    port = free_port()
    server = llamette_serve("--port", str(port), "--request-timeout", "600")
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, server.stderr.read()
            time.sleep(0.5)
        time.sleep(1)  # the command waits for the deployment before it takes signals
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=120)
        assert server.returncode == 0 and "llamette: stopped" in err
    finally:
        server.kill()
    failing = llamette_serve("--port", str(free_port()), "--ctx", "100000")
    _, err = failing.communicate(timeout=300)
    assert failing.returncode == 2
    assert ("llamette: error: --replicas: the replicas did not start: --ctx: 100000 is outside "
            "2..256") in err  # fmt: skip
    nonsense = llamette_serve("--request-timeout", "0")
    _, err = nonsense.communicate(timeout=120)
    assert nonsense.returncode == 2 and "--request-timeout: 0.0 is not a positive time" in err
