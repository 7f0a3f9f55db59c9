"""`mt-serve` as a user meets it: the real server in a subprocess on a free localhost port, serving
the toy checkpoint (toy_support.py), asked over HTTP.

One server process starts for the module; the last test stops it with SIGTERM.
A full queue and a late answer are provoked in-process: the same app on uvicorn in a thread, with
an engine whose decode waits for a signal.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from toy_support import run_translate

from transformer_mt.cli import serve as serve_cli
from transformer_mt.cli.translate import beam_preset
from transformer_mt.config import DecodeConfig, ModelConfig
from transformer_mt.data.corpus import sha256_file
from transformer_mt.data.vocab import BOS, EOS
from transformer_mt.errors import ConfigError
from transformer_mt.inference.translator import Translator
from transformer_mt.model import build_model

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import uvicorn  # noqa: E402

from transformer_mt.serve.app import STATIC, Server  # noqa: E402
from transformer_mt.serve.attention import (  # noqa: E402
    attention_maps,
    hooked_weights,
    join_words,
    word_groups,
    word_label,
)
from transformer_mt.serve.settings import ServeSettings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BOUNDS = ["--max-sentences", "4", "--max-chars", "120", "--max-body-bytes", "2048"]
BOUNDS += ["--attention-max-tokens", "12"]
START_SECONDS = 120  # a loaded machine imports torch and spaCy slowly

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@dataclass
class Client:
    """HTTP calls to a server at `url`, with urllib: what any user's script would do."""

    url: str

    def call(self, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        """(status, JSON answer or text) of GET `path`, or of POST when there is a body."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, payload, kind = response.status, response.read(), response.headers
        except urllib.error.HTTPError as err:
            status, payload, kind = err.code, err.read(), err.headers
        if kind.get_content_type() == "application/json":
            return status, json.loads(payload)
        return status, payload.decode()

    def metric(self, name: str) -> float:
        _, text = self.call("/metrics")
        (value,) = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
        return float(value)


@dataclass
class ServerProcess(Client):
    proc: subprocess.Popen
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(checkpoint: Path, log: Path, *options: str) -> ServerProcess:
    port = free_port()
    command = [sys.executable, str(REPO / "scripts" / "serve.py"), str(checkpoint)]
    with log.open("w") as stderr:  # the server writes to its own copy of the file
        proc = subprocess.Popen(
            [*command, "--port", str(port), "--log-level", "warning", *options],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    return ServerProcess(f"http://127.0.0.1:{port}", proc, log)


def wait_until_up(server: ServerProcess) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"mt-serve exited with {server.proc.returncode}: {server.log.read_text()}")
        try:
            if server.call("/health") == (200, {"status": "ok"}):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"mt-serve did not answer within {START_SECONDS} s")


def stop(server: ServerProcess) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        server.proc.wait(30)


class ModuleServer:
    """The module's one server, started again only if a test has stopped it (the SIGTERM test
    does, last; run alone or first, it would otherwise leave the others without a server)."""

    def __init__(self, checkpoint: Path, folder: Path) -> None:
        self.checkpoint, self.folder = checkpoint, folder
        self.process: ServerProcess | None = None

    def running(self) -> ServerProcess:
        if self.process is None or self.process.proc.poll() is not None:
            log = self.folder / f"server-{time.monotonic_ns()}.log"
            # Requests sent together arrive within a few milliseconds; 100 ms gathers them.
            self.process = start_server(self.checkpoint, log, "--batch-wait-ms", "100", *BOUNDS)
            wait_until_up(self.process)
        return self.process


@pytest.fixture(scope="module")
def module_server(toy, tmp_path_factory) -> Iterator[ModuleServer]:
    holder = ModuleServer(toy.checkpoint, tmp_path_factory.mktemp("serve"))
    try:
        yield holder
    finally:
        if holder.process is not None:
            stop(holder.process)


@pytest.fixture
def server(module_server) -> ServerProcess:
    return module_server.running()


def translate_cli(capsys, checkpoint: Path, *args: str) -> list[str]:
    code, out, err = run_translate(capsys, str(checkpoint), *args)
    assert code == 0, err
    return out.splitlines()


def test_translations_and_scores_equal_mt_translate(server, toy, capsys) -> None:
    sentences = ["Zwei drei vier.", "", "Zehn neun acht.", " ".join(["drei"] * 23) + "."]
    expected = translate_cli(capsys, toy.checkpoint, *sentences)
    status, answer = server.call("/translate", {"text": sentences})
    assert status == 200 and answer["translations"] == expected
    assert len(answer["scores"]) == 4 and answer["scores"][1] == 0.0

    rows = translate_cli(capsys, toy.checkpoint, "--beam", "4", "--nbest", "3", "Acht eins.")
    status, answer = server.call("/translate", {"text": "Acht eins.", "beam_size": 4, "nbest": 3})
    assert status == 200
    assert answer["translations"] == [[row.split("\t")[2] for row in rows]]
    assert [f"{s:.4f}" for s in answer["scores"][0]] == [row.split("\t")[1] for row in rows]


def test_info_describes_the_model_the_checkpoint_and_the_defaults(server, toy) -> None:
    status, info = server.call("/info")
    assert status == 200
    assert (info["source_language"], info["target_language"]) == ("de", "en")
    assert info["vocabulary"] == {"kind": "word", "source_size": 25, "target_size": 25}
    assert info["model"]["parameters"] == sum(p.numel() for p in toy.model.parameters())
    assert info["checkpoint"]["sha256"] == sha256_file(toy.checkpoint)
    preset = beam_preset()  # mt-translate's defaults
    assert info["decode_defaults"]["beam_size"] == preset.beam_size
    assert info["decode_defaults"]["length_penalty"] == preset.length_penalty
    assert info["bounds"]["max_sentences"] == 4 and info["batching"]["enabled"] is True


def test_concurrent_requests_share_one_decode(server, toy, capsys) -> None:
    sentences = ["Eins zwei.", "Drei.", "Vier fünf sechs.", "Sieben.", "Acht neun.", "Zehn."]
    expected = translate_cli(capsys, toy.checkpoint, *sentences)
    before = server.metric("mt_shared_decode_requests_total")
    start = threading.Barrier(len(sentences))

    def ask(sentence: str) -> tuple[int, Any]:
        start.wait()
        return server.call("/translate", {"text": sentence})

    with ThreadPoolExecutor(len(sentences)) as pool:
        answers = list(pool.map(ask, sentences))
    assert [a["translations"] for _, a in answers] == [[line] for line in expected]
    assert server.metric("mt_shared_decode_requests_total") >= before + 2
    assert server.metric("mt_largest_decode_requests") >= 2


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"not json", 400, "the body is not JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b"{}", 422, '"text" is missing'),
        (b'{"text": 3}', 422, "must be a string or a list of strings"),
        (b'{"text": "Eins.", "beam": 5}', 422, 'unknown field "beam"'),
        (b'{"text": "Eins.", "beam_size": "5"}', 422, '"beam_size" must be an integer'),
        (b'{"text": "Eins.", "beam_size": 0}', 422, "beam_size must be > 0"),
        (b'{"text": "Eins.", "beam_size": 2, "nbest": 3}', 422, "nbest=3 exceeds beam_size=2"),
        (b'{"text": "Eins.", "length_penalty": -1}', 422, "length_penalty must be >= 0"),
        (json.dumps({"text": ["Eins."] * 5}).encode(), 413, "5 sentences in one request"),
        (json.dumps({"text": "eins " * 25}).encode(), 413, "sentence 1 has 125 characters"),
        (json.dumps({"text": ["x"] * 600}).encode(), 413, "more than 2048 bytes"),
    ],
)
def test_every_bound_is_a_json_error_and_the_server_goes_on(server, body, status, message) -> None:
    got_status, answer = server.call("/translate", raw=body)
    assert got_status == status and message in answer["error"], answer
    assert server.call("/translate", {"text": "Zwei.", "beam_size": 1}) == (
        200,
        {"translations": ["Two."], "scores": [0.0]},
    )


def test_a_streamed_body_past_the_bound_is_refused(server) -> None:
    chunks = iter([b'{"text": "', b"x" * 4096, b'"}'])  # no Content-Length: sent chunked
    status, answer = server.call("/translate", raw=chunks)  # type: ignore[arg-type]
    assert status == 413 and "more than 2048 bytes" in answer["error"]


def test_unknown_routes_and_methods_are_json_errors(server) -> None:
    assert server.call("/nowhere") == (404, {"error": "GET /nowhere: Not Found"})
    assert server.call("/translate") == (405, {"error": "GET /translate: Method Not Allowed"})


def test_metrics_are_prometheus_text(server) -> None:
    server.call("/translate", {"text": ["Eins.", "Zwei."]})
    status, text = server.call("/metrics")
    assert status == 200
    assert "# TYPE mt_translate_seconds histogram" in text
    assert 'mt_requests_total{route="/translate",status="200"}' in text
    assert server.metric("mt_sentences_total") >= 2
    assert server.metric("mt_queue_depth") == 0
    assert server.metric('mt_translate_seconds_bucket{le="+Inf"}') >= 1


def test_attention_of_every_layer_and_head_for_one_sentence(server, toy) -> None:
    status, maps = server.call("/attention", {"text": "Zwei drei vier."})
    assert status == 200
    assert maps["source"] == ["Zwei", "drei", "vier", ".", "<eos>"]
    assert maps["output"] == ["Two", "three", "four", ".", "<eos>"]
    assert maps["target_in"] == ["<bos>", "Two", "three", "four", "."]
    assert (
        maps["translation"]
        == server.call("/translate", {"text": "Zwei drei vier."})[1]["translations"][0]
    )
    layers, heads = 2, 4  # TOY_MODEL
    shapes = {kind: np.array(maps[kind]).shape for kind in ("encoder", "decoder", "cross")}
    assert shapes == {
        "encoder": (layers, heads, 5, 5),
        "decoder": (layers, heads, 5, 5),
        "cross": (layers, heads, 5, 5),
    }
    assert np.allclose(np.array(maps["cross"]).sum(-1), 1, atol=1e-3)
    long_line = " ".join(["eins"] * 12) + "."
    status, answer = server.call("/attention", {"text": long_line})
    assert status == 413 and "13 tokens; attention is shown for at most 12" in answer["error"]


def test_hooked_weights_are_the_model_s_own(toy) -> None:
    """The hooks read what the model computes: the last layer's mean cross-attention is
    `model.cross_attention`, and decoder self-attention never looks ahead."""
    src = torch.tensor([[5, 6, 7, EOS]])
    tgt_in = torch.tensor([[BOS, 8, 9]])
    with torch.inference_mode():
        found = hooked_weights(toy.model, src, tgt_in)
        expected = toy.model.cross_attention(src, tgt_in)[0]
    assert [len(found[kind]) for kind in ("encoder", "decoder", "cross")] == [2, 2, 2]
    assert np.allclose(found["cross"][-1].mean(axis=0), expected.numpy(), atol=1e-6)
    for weights in found["decoder"]:
        assert np.all(np.triu(weights, k=1) == 0)


def test_attention_maps_need_a_transformer(toy) -> None:
    rnn_cfg = ModelConfig(name="rnn", arch="rnn", d_model=16, enc_layers=1, dec_layers=1)
    rnn = build_model(rnn_cfg, len(toy.src_vocab), len(toy.tgt_vocab))
    translator = Translator(
        rnn, toy.src_vocab, toy.tgt_vocab, "de", "en", False, DecodeConfig(), torch.device("cpu")
    )
    with pytest.raises(ConfigError, match="attention maps need a Transformer checkpoint"):
        attention_maps(translator, [5, 6])


def test_subword_pieces_join_into_words() -> None:
    pieces = ["▁Ein", "▁Rad", "fahr", "er", "▁.", "<eos>"]
    groups = word_groups(pieces, subword=True)
    assert groups == [[0], [1, 2, 3], [4], [5]]
    assert [word_label(pieces, g) for g in groups] == ["Ein", "Radfahrer", ".", "<eos>"]
    rng = np.random.default_rng(0)
    weights = rng.random((2, 3, 6, 6))
    weights /= weights.sum(-1, keepdims=True)
    joined = join_words(weights, groups, groups)
    assert joined.shape == (2, 3, 4, 4)
    assert np.allclose(joined.sum(-1), 1)  # a word's row still sums to 1
    assert np.isclose(joined[0, 0, 1, 0], weights[0, 0, 1:4, 0].mean())


def test_the_page_and_its_files_are_served(server) -> None:
    status, page = server.call("/")
    assert status == 200 and '<script src="/static/app.js">' in page
    for name in ("app.js", "style.css"):
        status, text = server.call(f"/static/{name}")
        assert status == 200 and len(text) > 100
    assert "http" not in page.replace("http-equiv", "")  # no CDN: the page works offline


@pytest.mark.parametrize(
    "options, message",
    [
        (["--max-queue", "0"], "--max-queue must be at least 1 (got 0)"),
        (["--batch-wait-ms", "-1"], "--batch-wait-ms must be in [0, 1000]"),
        (["--timeout", "0"], "--timeout must be > 0 seconds"),
        (["--beam", "0"], "--beam must be at least 1"),  # mt-translate's own check
    ],
)
def test_bad_options_are_one_line_errors(toy, capsys, options, message) -> None:
    with pytest.raises(SystemExit) as done:
        serve_cli.main([str(toy.checkpoint), *options])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.skipif(shutil.which("node") is None, reason="the page check runs its script in node")
def test_the_page_translates_as_you_type_and_draws_the_chosen_attention(server) -> None:
    """The page's script, driven in node with a stand-in DOM (tests/page_driver.js)."""
    driver = [str(REPO / "tests" / "page_driver.js"), server.url, str(STATIC / "app.js")]
    result = subprocess.run(["node", *driver], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["model"].startswith("de → en: transformer")
    source = ["Zwei", "drei", "vier", ".", "<eos>"]
    cross = seen["cross"]
    assert cross["status"] == ""
    (first,), (second,) = cross["translations"]  # score, then translation
    assert first.endswith("Two three four.") and second.endswith("One.")
    assert cross["rows"] == ["Two", "three", "four", ".", "<eos>"] and cross["columns"] == source
    assert np.allclose(np.sum(cross["cells"], axis=1), 1, atol=0.01)  # the mean of the heads
    assert (cross["layers"], cross["heads"]) == (2, ["mean", "0", "1", "2", "3"])
    assert [len(lines) for lines in seen["nbest"]["translations"]] == [2, 2]
    assert seen["encoder"]["rows"] == seen["encoder"]["columns"] == source
    assert seen["words"]["rows"] == source  # a word vocabulary: its tokens are the words


def chromium_executable() -> str | None:
    """Debian's Chromium (`make browser` installs it), or the one $MT_CHROMIUM names."""
    return (
        os.environ.get("MT_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )


def test_a_browser_shows_the_translation_as_you_type_and_the_chosen_head(server, tmp_path) -> None:
    """The page in a real headless Chromium, driven by Playwright: type a sentence, read the
    translation, pick a layer and a head, and find the heat map's cells are that head's weights."""
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed (`make browser` installs it)"
    )
    chromium = chromium_executable()
    if chromium is None:
        pytest.skip("no Chromium to drive (`make browser` installs Debian's package)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('→')")
            page.locator("#source").press_sequentially("Zwei drei vier.", delay=20)
            first = page.locator("#translations li").first
            sync_api.expect(first).to_contain_text("Two three four.", timeout=30_000)
            page.locator("#heatmap td.cell").first.wait_for(timeout=30_000)
            # By index: Playwright matches a value against the labels too, and labels count from 1.
            page.select_option("#layer", index=1)  # layer 2
            page.select_option("#head", index=3)  # head 3 (after "mean of heads")
            assert page.eval_on_selector("#head", "select => select.value") == "2"
            titles = page.locator("#heatmap td.cell").evaluate_all(
                "cells => cells.map(cell => cell.title)"
            )
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    _, maps = server.call("/attention", {"text": "Zwei drei vier."})
    weights = np.array(maps["cross"])[1, 2]  # layer 2, head 3 (the page counts from one)
    assert not np.allclose(weights, np.array(maps["cross"])[0].mean(axis=0), atol=1e-3)
    assert len(titles) == weights.size == 25
    shown = np.array([float(title.rsplit(": ", 1)[1]) for title in titles]).reshape(5, 5)
    assert np.allclose(shown, weights, atol=1e-3)
    assert titles[0] == f"Two → Zwei: {weights[0, 0]:.3f}"
    assert (tmp_path / "page.png").stat().st_size > 10_000


class HeldEngine:
    """An engine whose decode waits until `release` is set: a stand-in for a slow model."""

    def __init__(self) -> None:
        self.defaults = DecodeConfig()
        self.model_thread = ThreadPoolExecutor(1)
        self.text_thread = ThreadPoolExecutor(1)
        self.decoding, self.release = threading.Event(), threading.Event()

    def encode(self, lines):
        return [[4] for _ in lines]

    def decode(self, sources, decode_cfg):
        self.decoding.set()
        self.release.wait(10)
        return [[("done", 0.0)] for _ in sources]

    def close(self) -> None:
        self.release.set()
        self.model_thread.shutdown()
        self.text_thread.shutdown()


def test_a_busy_server_answers_503_and_recovers() -> None:
    """In-process, on a held engine: a full queue and a late answer are 503s, then it serves."""
    engine = HeldEngine()
    settings = ServeSettings(port=free_port(), max_queue=1, timeout_s=0.5, batch_wait_ms=0)
    app = Server(engine, settings).app()  # type: ignore[arg-type]
    server = uvicorn.Server(uvicorn.Config(app, port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run)
    thread.start()
    client = Client(f"http://127.0.0.1:{settings.port}")
    try:
        wait_for(lambda: server.started)
        with ThreadPoolExecutor(2) as pool:
            held = pool.submit(client.call, "/translate", {"text": "eins"})
            assert engine.decoding.wait(10)  # the decode holds the first request
            queued = pool.submit(client.call, "/translate", {"text": "zwei"})
            wait_for(lambda: client.metric("mt_queue_depth") == 1)
            status, answer = client.call("/translate", {"text": "drei"})
            assert status == 503 and "too many requests waiting" in answer["error"]
            for late in (held, queued):  # one held by the decode, one in the queue, past 0.5 s
                status, answer = late.result(10)
                assert status == 503 and "no answer within 0.5 s" in answer["error"]
            engine.release.set()
        assert client.call("/translate", {"text": "vier"}) == (
            200,
            {"translations": ["done"], "scores": [0.0]},
        )
    finally:
        server.should_exit = True
        thread.join(30)


def wait_for(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "waited in vain"
        time.sleep(0.01)


def test_sigterm_answers_the_requests_in_flight_then_exits(server) -> None:
    """Last in the module, as it stops the server. A request whose body is still arriving is
    surely in flight when the signal comes; it is answered, then the server exits."""
    body = json.dumps({"text": "Zwei drei."}).encode()
    head = f"POST /translate HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n\r\n"
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head.encode() + body[:5])
        wait_for(lambda: server.metric("mt_in_flight_requests") == 1)
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: refuses_connections(server))  # it takes no new request
        sock.sendall(body[5:])
        answer = b"".join(iter(lambda: sock.recv(65536), b""))  # until the server closes
    status, _, payload = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 200 OK"
    assert b'{"translations":["Two three."]' in payload
    # uvicorn (0.29 on) ends by raising the signal it caught again, once everything is answered.
    assert server.proc.wait(30) in (0, -signal.SIGTERM)


def refuses_connections(server: Client) -> bool:
    try:
        server.call("/health")
    except OSError:
        return True
    return False
