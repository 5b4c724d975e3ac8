"""The `llamette` command: run.c's flags and output, and one-line errors for bad input."""

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import llamette
from conftest import expected_rows, read_jsonl, shared_path
from llamette.cli import main


def run_cli(capsys, argv):
    """Run `llamette ARGV` in this process: (exit status, stdout, stderr)."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def with_paths(argv):
    """A recorded run.c argv with its model and tokenizer paths under ../shared/models."""
    models = shared_path("models")
    argv = list(argv)
    argv[0] = models / argv[0]
    argv[argv.index("-z") + 1] = models / argv[argv.index("-z") + 1]
    return argv


def prints_a_non_ascii_byte(row):
    """run.c drops the bytes of byte pieces <0x80>..<0xFF> (ids 131..258); llamette prints UTF-8."""
    return any(0x80 + 3 <= t <= 0xFF + 3 for t in row["ids"])


@pytest.mark.parametrize(
    "row",
    expected_rows(
        "generate.jsonl", keep=lambda r: r["ids"] is not None and not prints_a_non_ascii_byte(r)
    ),
)
def test_stdout_equals_run_c(capsys, row):
    status, out, _ = run_cli(capsys, ["run", *with_paths(row["argv"]), "--exact"])
    assert status == 0
    assert out.encode() == base64.b64decode(row["stdout_b64"])


@pytest.mark.parametrize("row", expected_rows("generate.jsonl", keep=lambda r: "-m" in r["argv"]))
def test_chat_stdout_equals_run_c(capsys, monkeypatch, row):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # run.c's chat ran with stdin closed
    status, out, _ = run_cli(capsys, ["run", *with_paths(row["argv"]), "--exact"])
    assert status == 0
    assert out.encode() == base64.b64decode(row["stdout_b64"])


def test_json_reports_tokens_text_and_speeds(capsys):
    row = next(
        r
        for r in read_jsonl("expected", "generate.jsonl")
        if r["case"] == "stories260K.bin:once:t08p0s7"
    )
    status, out, err = run_cli(capsys, ["run", *with_paths(row["argv"]), "--json"])
    result = json.loads(out)
    assert status == 0 and out.count("\n") == 1
    assert result["prompt_tokens"] == row["prompt_ids"]
    assert result["tokens"] == row["ids"][len(row["prompt_ids"]) - 1 :]
    assert row["stdout_text"] == "Once upon a time" + result["text"] + "\n"
    assert result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0
    assert "prefill" in err and "decode" in err


def test_finds_the_tokenizer_beside_the_model(capsys):
    models = shared_path("models")
    # stories260K.bin sits beside tokenizer.bin (32000 pieces, does not fit) and tok512.bin (fits)
    status, out, _ = run_cli(capsys, ["run", models / "stories260K.bin", "-t", "0", "-n", "30"])
    assert status == 0 and out.startswith("Once upon a time, there was a little girl named Lily.")


def test_says_when_no_tokenizer_fits(capsys, tmp_path):
    shutil.copy(shared_path("models", "stories260K.bin"), tmp_path / "m.bin")
    shutil.copy(shared_path("models", "tokenizer.bin"), tmp_path / "tokenizer.bin")
    status, _, err = run_cli(capsys, ["run", tmp_path / "m.bin"])
    assert status == 2
    assert "no tokenizer for its 512-token vocabulary" in err and "tokenizer.bin has 32000" in err
    assert "-z" in err


def test_a_chat_that_fills_the_context_says_so(capsys, monkeypatch):
    """A random-weight model never samples EOS here (greedy): its answer runs into the end of
    the context, and the chat says it cannot go on."""
    models = shared_path("models")
    monkeypatch.setattr(sys, "stdin", io.StringIO("and then?\n"))
    argv = ["run", models / "rand-gqa.v0.bin", "-z", models / "tokenizer.bin", "-m", "chat",
            "-t", "0", "-n", "0", "-i", "Hello"]  # fmt: skip
    status, out, err = run_cli(capsys, argv)
    assert status == 0 and "Assistant: " in out
    assert "the model's context of 256 tokens is full; the conversation cannot go on" in err


def test_a_chat_ended_before_its_first_turn_reports_no_speed(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # Ctrl-D at the first prompt
    status, out, err = run_cli(capsys, ["run", "-m", "chat"])
    assert status == 0 and "tok/s" not in err


class CtrlC(io.StringIO):
    """A terminal whose user presses Ctrl-C at the prompt."""

    def readline(self, *args):
        raise KeyboardInterrupt


def test_ctrl_c_ends_the_line_and_exits_130(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", CtrlC())
    status, out, err = run_cli(capsys, ["run", "-m", "chat"])
    assert status == 130 and err.endswith("\n")


def test_version_and_usage(capsys):
    status, out, _ = run_cli(capsys, ["--version"])
    assert status == 0 and out == f"llamette {llamette.__version__}\n"
    status, out, err = run_cli(capsys, [])
    assert status == 2 and out == "" and err.startswith("usage: llamette")
    assert all(command in err for command in ("run", "convert", "quantize", "serve"))


def test_steps_beyond_the_context_are_clamped_with_a_note(capsys):
    models = shared_path("models")
    argv = ["run", models / "aidreams260K" / "model.bin", "-t", "0", "-n", "1000", "--json"]
    status, out, err = run_cli(capsys, argv)
    assert status == 0
    assert "-n/--steps: 1000 is beyond the model's context of 128; using 128" in err
    result = json.loads(out)
    assert len(result["prompt_tokens"]) + len(result["tokens"]) - 1 <= 128


@pytest.mark.parametrize(
    "flags, message",
    [
        (["-t", "-0.5"], "-t/--temperature: -0.5 is not 0 or more"),
        (["-t", "hot"], "argument -t/--temperature: invalid float value: 'hot'"),
        (["-p", "1.5"], "-p/--top-p: 1.5 is outside [0, 1]"),
        (["--top-p", "-0.1"], "-p/--top-p: -0.1 is outside [0, 1]"),
        (["-k", "-3"], "-k/--top-k: -3 is negative"),
        (["--min-p", "1.5"], "--min-p: 1.5 is outside [0, 1]"),
        (["--repeat-penalty", "0"], "--repeat-penalty: 0.0 is not above 0"),
        (["--repeat-last-n", "-4"], "--repeat-last-n: -4 is below -1"),
        (["--presence-penalty", "9"], "--presence-penalty: 9.0 is outside [-2, 2]"),
        (["-n", "many"], "argument -n/--steps: invalid int value: 'many'"),
        (["-n", "-5"], "-n/--steps: -5 is negative (0 means the whole context)"),
        (["--temp", "0"], "unrecognized arguments: --temp"),  # no guessing at abbreviations
        (["-s", "1.5"], "argument -s/--seed: invalid int value: '1.5'"),
        (["-m", "poem"], "argument -m/--mode: invalid choice: 'poem'"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["-m", "chat", "--json"], "--json: works with -m generate only"),
        (["-m", "chat", "--stop", "x"], "--stop: works with -m generate only"),
        (["-l", "5"], "--logit-bias: '5' is not TOKEN_ID+BIAS or TOKEN_ID-BIAS"),
        (["-l", "512+1"], "--logit-bias: 512 is not a token id within 0..511"),
        (["--stop-token-id", "600"], "--stop-token-id: 600 is not a token id within 0..511"),
        (["--cache-type", "q4_0"], "argument --cache-type: invalid choice: 'q4_0'"),
        (["--exact", "--cache-type", "f16"], "--cache-type f16: --exact keeps run.c's float32"),
        (["--cache-type", "q8_0"], "--cache-type q8_0: heads of 8 values are not whole blocks"),
        (
            ["-z", "tokenizer.bin"],
            "tokenizer.bin: has 32000 pieces but stories260K.bin has a vocabulary of 512",
        ),
        (["-z", "nowhere.bin"], "nowhere.bin: no such file"),
        (
            ["-i", "Once upon a time " * 200],
            r"prompt: \d+ tokens do not fit the model's context of 512",
        ),
    ],
)
def test_bad_flags_end_in_one_line_and_status_2(capsys, flags, message):
    models = shared_path("models")
    if "-z" in flags:
        flags = ["-z", models / flags[1]]
    status, out, err = run_cli(capsys, ["run", models / "stories260K.bin", *flags])
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("llamette: error: ")
    assert re.search(message if message.startswith("prompt") else re.escape(message), err)


@pytest.mark.parametrize(
    "model, message",
    [
        ("missing.bin", "missing.bin: no such file"),
        ("tok512.bin", "tok512.bin: not a llama2.c checkpoint"),
        ("hf-mha", "hf-mha: is a folder; convert it first"),
    ],
)
def test_bad_model_files_end_in_one_line_and_status_2(capsys, model, message):
    status, _, err = run_cli(capsys, ["run", shared_path("models") / ".." / "models" / model])
    assert status == 2 and err.count("\n") == 1 and message in err


def test_truncated_model_through_the_real_command(tmp_path):
    cut = tmp_path / "cut.bin"
    cut.write_bytes(shared_path("models", "stories260K.bin").read_bytes()[:500_000])
    done = subprocess.run(
        [sys.executable, "-m", "llamette", "run", cut, "-z", shared_path("models", "tok512.bin")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        done.stderr
        == f"llamette: error: {cut}: truncated: its header describes 1056540 bytes, the file has 500000\n"
    )


def test_no_command_is_an_error(capsys):
    status, _, err = run_cli(capsys, [])
    assert status == 2 and "COMMAND" in err


def test_threads_flag_and_environment(capsys, monkeypatch):
    import numba

    model = shared_path("models", "stories260K.bin")
    status, out, _ = run_cli(capsys, ["run", model, "-t", "0", "-n", "20", "--threads", "1"])
    assert status == 0 and numba.get_num_threads() == 1 and out.startswith("Once upon a time")
    monkeypatch.setenv("LLAMETTE_THREADS", "many")
    status, _, err = run_cli(capsys, ["run", model])
    assert (
        status == 2
        and err == "llamette: error: LLAMETTE_THREADS: 'many' is not a number of threads\n"
    )
    too_many = numba.config.NUMBA_NUM_THREADS + 1
    status, _, err = run_cli(capsys, ["run", model, "--threads", str(too_many)])
    assert status == 2 and f"--threads: {too_many} threads" in err
    monkeypatch.delenv("LLAMETTE_THREADS")
    run_cli(capsys, ["run", model, "-n", "2"])  # back to every core
    assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS


def test_profile_shows_where_a_decode_step_went(capsys):
    argv = ["run", shared_path("models", "stories260K.bin"), "-t", "0", "-n", "40", "--profile"]
    status, _, err = run_cli(capsys, argv)
    assert status == 0
    assert "profile of 39 decode steps" in err
    for part in ("q k v", "attention", "w1 w3", "classifier", "by kind: matmul"):
        assert part in err
    shares = [
        float(line.split("%")[0].split()[-1])
        for line in err.splitlines()
        if "us " in line and "%" in line
    ]
    assert abs(sum(shares) - 100) < 1.5  # the parts account for the whole step


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ctx", "100000"], "--ctx"),
        (["--port", "70000"], "--port"),
        (["--max-batch", "0"], "--max-batch"),
        (["--threads", "0"], "--threads"),
        (["--host", "256.1.1.1"], "--host"),
        (["--kv-budget", "10"], "--kv-budget"),
        (["--max-body", "0"], "--max-body"),
        (["--api-key", " "], "--api-key"),
        (["--request-timeout", "30"], "--request-timeout: goes with --replicas"),
    ],
)
def test_serve_bad_flags_end_in_one_line_and_status_2(capsys, flags, message):
    port = [] if "--port" in flags else ["--port", "0"]  # any free port: 8000 may be taken
    status, _, err = run_cli(capsys, ["serve", *port, *flags])
    assert status == 2 and message in err and err.count("\n") == 1


def test_serve_starts_answers_and_stops_on_ctrl_c():
    import signal
    import socket

    httpx = pytest.importorskip(
        "httpx", reason="httpx is a test dependency (pip install -e .[test])"
    )
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "llamette", "serve", "--port", str(port), "--max-batch", "2"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        banner = server.stderr.readline()
        assert f"http://127.0.0.1:{port}/v1" in banner and "llama-2" in banner
        deadline = time.monotonic() + 600  # a cold kernel cache compiles first
        while time.monotonic() < deadline:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health")
                if response.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        health = response.json()
        assert health["slots"] == 2
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": health["model"], "messages": [{"role": "user", "content": "Hi"}],
                  "max_tokens": 8, "temperature": 0},
        ).json()  # fmt: skip
        assert answer["usage"]["completion_tokens"] > 0
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0


def test_serve_on_a_cold_cache_answers_503_at_once_and_stops_on_sigterm(tmp_path):
    """While the kernels compile, connections are taken and answered 503 with Retry-After;
    SIGTERM ends the server within 2 s, compile or not, with exit status 0."""
    import signal
    import socket

    httpx = pytest.importorskip(
        "httpx", reason="httpx is a test dependency (pip install -e .[test])"
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    server = subprocess.Popen(
        [sys.executable, "-m", "llamette", "serve", "--port", str(port), "--max-batch", "2"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "LLAMETTE_CACHE_DIR": str(tmp_path)},
    )  # fmt: skip
    try:
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health")
                break
            except httpx.TransportError:
                assert time.monotonic() - started < 10, "no connection 10 s after the start"
                time.sleep(0.05)
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert response.json()["error"]["code"] == "warming_up"
        request = {"model": "x", "messages": [{"role": "user", "content": "Hi"}]}
        assert (
            httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=request).status_code
            == 503
        )
        stopping = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0  # asked to stop, and stopped: not killed by it
        assert time.monotonic() - stopping < 2
    finally:
        server.kill()
        server.wait()


def test_penalties_change_a_greedy_story(capsys):
    argv = ["run", "-t", "0", "-n", "60", "-i", "Once upon a time"]
    plain = run_cli(capsys, argv)[1]
    status, penalized, _ = run_cli(
        capsys, [*argv, "--repeat-penalty", "1.5", "--frequency-penalty", "1"]
    )
    assert status == 0 and penalized != plain and penalized.startswith("Once upon a time")


def test_logit_bias_stop_strings_and_stop_tokens_shape_a_greedy_story(capsys):
    """llama.cpp's --logit-bias form; --stop cuts the text before its first stop string;
    --stop-token-id ends it at that token."""
    tokenizer = llamette.Tokenizer.load(
        Path(llamette.__file__).parent / "bundled" / "tokenizer.bin"
    )
    argv = ["run", "-t", "0", "-n", "60", "-i", "Once upon a time", "--json"]
    plain = json.loads(run_cli(capsys, argv)[1])
    stopped = json.loads(run_cli(capsys, [*argv, "--stop", ","])[1])
    assert "," in plain["text"] and stopped["text"] == plain["text"][: plain["text"].index(",")]
    third = plain["tokens"][2]
    at_token = json.loads(run_cli(capsys, [*argv, "--stop-token-id", str(third)])[1])
    assert at_token["tokens"] == plain["tokens"][:3]
    dog = tokenizer.encode(" dog", bos=False)[-1]
    forced = json.loads(run_cli(capsys, [*argv, "-l", f"{dog}+100", "-l", f"{third}-inf"])[1])
    assert set(forced["tokens"]) == {dog}


def test_replicas_without_ray_say_how_to_install_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    status, _, err = run_cli(capsys, ["serve", "--replicas", "2"])
    assert status == 2 and err.count("\n") == 1
    assert "--replicas: needs Ray Serve: pip install 'llamette[ray]'" in err
