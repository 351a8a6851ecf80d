"""`vgen stream` over a real uvicorn server on 127.0.0.1 with a tiny random video model: frames in order with their
headers, prompt switches, 4 concurrent viewers and the refusal of a fifth, disconnects that free their session and
memory (20 connect/disconnect cycles), malformed and oversized messages, the page, the protocol and the CLI. Every
receive has a timeout and every loop a bound."""

import gc
import io
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from stream_server import running_server
from test_video_pipeline import PROMPT, tiny_pipeline

from websockets.exceptions import ConnectionClosed  # noqa: E402  (after the skip in stream_server)
from websockets.sync.client import connect  # noqa: E402

from vgen.stream.app import GenerationWorker, Session, SessionManager, StreamSettings, create_app  # noqa: E402
from vgen.stream.protocol import Limits, ProtocolError, pack, parse_client_message, unpack  # noqa: E402

TIMEOUT = 20.0  # seconds for any one message


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def server(pipe):
    app = create_app(pipe, StreamSettings(max_sessions=6))
    with running_server(app) as url:
        yield app, url


def ws_url(url):
    return url.replace("http://", "ws://") + "/ws"


def receive(ws, timeout=TIMEOUT):
    return unpack(ws.recv(timeout=timeout))


def receive_until(ws, kind, limit=200):
    """Messages up to and including the first of type ``kind`` (bounded)."""
    seen = []
    for _ in range(limit):
        header, payload = receive(ws)
        seen.append((header, payload))
        if header["type"] == kind:
            return seen
    raise AssertionError(f"no {kind!r} message in {limit}")


def frames(ws, count):
    """The next ``count`` frame messages (other types in between are skipped; bounded)."""
    out = []
    for _ in range(count * 4 + 20):
        header, payload = receive(ws)
        if header["type"] == "frame":
            out.append((header, payload))
            if len(out) == count:
                return out
        assert header["type"] != "error", header
    raise AssertionError(f"got {len(out)} of {count} frames")


def hello(ws):
    header, payload = receive(ws)
    assert header["type"] == "hello" and payload == b""
    return header


def start(ws, **fields):
    ws.send(json.dumps({"type": "start", "prompt": PROMPT, "cache_mode": "sink_window", **fields}))


def wait_for(predicate, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def live_sessions():
    gc.collect()
    return sum(type(o) is Session for o in gc.get_objects())


def test_frames_arrive_in_order_with_headers_and_jpeg_payloads(server):
    app, url = server
    with connect(ws_url(url)) as ws:
        info = hello(ws)
        assert info["model"] == {"frames_per_block": 2, "height": 32, "width": 32, "training_frames": 8,
                                 "default_cache_mode": "sink_window"}
        assert info["cache_modes"] == ["full", "sink_window", "forcing_kv"]
        start(ws, seed=3)
        started, _ = receive(ws)
        assert started["type"] == "started" and started["prompt"] == PROMPT and started["max_frames"] is None
        got = frames(ws, 8)
        assert [h["frame"] for h, _ in got] == list(range(8))
        assert [h["block"] for h, _ in got] == [0, 0, 1, 1, 2, 2, 3, 3]
        assert [h["frame_in_block"] for h, _ in got] == [0, 1] * 4
        for header, payload in got:
            assert header["stream"] == started["stream"] and header["prompt"] == PROMPT
            assert set(header["timings"]) == {"denoise", "commit", "decode"} and header["timings"]["denoise"] > 0
            assert header["generation_fps"] > 0 and header["sdvg"] is None and header["cache_mode"] == "sink_window"
            image = Image.open(io.BytesIO(payload))
            assert image.format == "JPEG" and image.size == (32, 32)
        assert got[-1][0]["elapsed"] >= got[0][0]["elapsed"]
        ws.send(json.dumps({"type": "stop"}))
        stopped = receive_until(ws, "stopped")[-1][0]
        assert stopped["reason"] == "stop" and stopped["frames"] >= 8


def test_set_prompt_switches_the_caption_of_the_following_blocks(server):
    app, url = server
    with connect(ws_url(url)) as ws:
        hello(ws)
        start(ws)
        frames(ws, 2)
        ws.send(json.dumps({"type": "set_prompt", "prompt": "a blue  square moving up"}))
        switched = receive_until(ws, "prompt")
        note = switched[-1][0]
        assert note["prompt"] == "a blue square moving up" and note["from_block"] >= 1
        later = frames(ws, 4)
        assert all(h["prompt"] == "a blue square moving up" for h, _ in later if h["block"] >= note["from_block"])
        assert later[-1][0]["block"] >= note["from_block"]


def test_sdvg_stream_reports_its_routing(server):
    app, url = server
    with connect(ws_url(url)) as ws:
        hello(ws)
        start(ws, sdvg=True, tau=-5.0)  # every frame scores >= 0 > tau: every draft after the first is kept
        got = frames(ws, 6)
        assert [h["sdvg"]["drafted"] for h, _ in got] == [False, False, True, True, True, True]
        assert all(h["sdvg"]["accepted"] for h, _ in got[2:]) and got[-1][0]["sdvg"]["acceptance_rate"] == 1.0
        assert {"draft", "target", "score"} <= set(got[-1][0]["timings"])


def test_four_concurrent_viewers_each_get_their_frames_and_a_fifth_is_refused(pipe):
    app = create_app(pipe, StreamSettings(max_sessions=4))
    with running_server(app) as url:
        results, errors = {}, []
        ready = threading.Barrier(5, timeout=TIMEOUT)

        def viewer(i):
            try:
                with connect(ws_url(url)) as ws:
                    hello(ws)
                    ready.wait()
                    start(ws, seed=i)
                    got = frames(ws, 6)
                    results[i] = [h["frame"] for h, _ in got]
                    ready.wait()  # stay connected until the fifth viewer was refused
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(repr(err))

        threads = [threading.Thread(target=viewer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        ready.wait()
        assert wait_for(lambda: len(app.state.sessions) == 4)
        with connect(ws_url(url)) as fifth:
            refusal, _ = receive(fifth)
            assert refusal["type"] == "error" and refusal["code"] == "full" and "at most 4 viewers" in refusal["message"]
            with pytest.raises(ConnectionClosed) as closed:
                fifth.recv(timeout=TIMEOUT)
            assert closed.value.rcvd.code == 1013
        ready.wait()
        for t in threads:
            t.join(TIMEOUT)
        assert not errors and results == {i: list(range(6)) for i in range(4)}


def test_a_disconnect_mid_stream_frees_its_session_and_the_others_go_on(server):
    app, url = server
    worker = app.state.worker
    assert wait_for(lambda: len(app.state.sessions) == 0)
    with connect(ws_url(url)) as stayer:
        hello(stayer)
        start(stayer)
        frames(stayer, 2)
        baseline = live_sessions()
        for cycle in range(20):
            with connect(ws_url(url)) as ws:
                hello(ws)
                start(ws, seed=cycle)
                if cycle % 2:
                    frames(ws, 1)  # half of them leave mid-stream, half right after asking
        got = frames(stayer, 6)  # the stayer still streams, in order
        numbers = [h["frame"] for h, _ in got]
        assert numbers == list(range(numbers[0], numbers[0] + 6))
        assert wait_for(lambda: len(app.state.sessions) == 1)
        assert wait_for(lambda: len(worker.live_streams) <= 1 and live_sessions() <= baseline)
        assert len(worker.live_streams) == 1  # the stayer's stream alone is held
        assert worker.alive and worker.errors == 0
    assert wait_for(lambda: len(app.state.sessions) == 0 and len(worker.live_streams) == 0)
    status = json.loads(urllib.request.urlopen(url + "/api/status", timeout=TIMEOUT).read())
    assert status["sessions"] == 0 and status["live_streams"] == 0 and status["worker_alive"]


@pytest.mark.parametrize("message, code, words", [
    ("not json", "malformed", "not valid JSON"),
    ("[1, 2]", "malformed", "JSON object"),
    (b"\x00\x01binary", "malformed", "JSON text"),
    ('{"type": "dance"}', "unknown_type", "unknown message type 'dance'"),
    ('{"type": "start", "prompt": "' + "a" * 10000 + '"}', "too_large", "at most 4096"),
    ('{"type": "start"}', "bad_value", "prompt must be a non-empty string"),
    ('{"type": "start", "prompt": "a red circle", "cache_mode": "huge"}', "bad_value", "cache_mode must be one of"),
    ('{"type": "start", "prompt": "a red circle", "tau": "high"}', "bad_value", "tau must be a finite number"),
    ('{"type": "start", "prompt": "a red circle", "seed": -1}', "bad_value", "seed must be an integer"),
    ('{"type": "start", "prompt": "a purple elephant dancing"}', "bad_value", "elephant"),
    ('{"type": "set_prompt", "prompt": "a red circle"}', "bad_value", "no stream is running"),
])
def test_malformed_messages_get_an_error_frame_and_the_server_keeps_serving(server, message, code, words):
    app, url = server
    with connect(ws_url(url)) as ws:
        hello(ws)
        ws.send(message)
        header, payload = receive(ws)
        assert header["type"] == "error" and header["code"] == code and words in header["message"], header
        assert payload == b""
        start(ws)  # the same connection still works
        assert receive_until(ws, "frame")[-1][0]["frame"] == 0
    assert app.state.worker.alive and app.state.worker.errors == 0


def test_full_cache_streams_end_at_their_frame_limit(pipe):
    app = create_app(pipe, StreamSettings(full_cache_frames=6))
    with running_server(app) as url, connect(ws_url(url)) as ws:
        hello(ws)
        start(ws, cache_mode="full")
        started = receive_until(ws, "started")[-1][0]
        assert started["max_frames"] == 6
        seen = receive_until(ws, "stopped")
        assert [h["frame"] for h, _ in seen if h["type"] == "frame"] == list(range(6))
        assert seen[-1][0]["reason"] == "end" and seen[-1][0]["frames"] == 6


def test_page_and_static_files_load_nothing_from_the_network(server):
    app, url = server
    page = urllib.request.urlopen(url + "/", timeout=TIMEOUT).read().decode()
    for element in ('id="prompt"', 'id="start"', 'id="stop"', 'id="canvas"', 'id="cache"', 'id="sdvg"', 'id="tau"',
                    'id="gen-fps"', 'id="delivered-fps"', 'id="latency"', "/static/app.js", "/static/style.css"):
        assert element in page
    script = urllib.request.urlopen(url + "/static/app.js", timeout=TIMEOUT).read().decode()
    style = urllib.request.urlopen(url + "/static/style.css", timeout=TIMEOUT).read().decode()
    assert "getUint32(0, false)" in script and "set_prompt" in script and "canvas" in style
    for text in (page, script, style):
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url + "/static/../app.py", timeout=TIMEOUT)
    assert err.value.code == 404


# -- pieces without a server -----------------------------------------------------------------------------------------


def test_protocol_packs_and_parses():
    header, payload = unpack(pack({"type": "frame", "frame": 3}, b"\xff\xd8jpeg"))
    assert header == {"type": "frame", "frame": 3} and payload == b"\xff\xd8jpeg"
    with pytest.raises(ValueError, match="header says"):
        unpack(pack({"type": "x"})[:-2])
    limits = Limits(cache_modes=("full", "sink_window"))
    kind, request = parse_client_message('{"type": "start", "prompt": " a red  circle ", "sdvg": true, "tau": 1}',
                                         limits)
    assert kind == "start" and request.prompt == "a red circle" and request.cache_mode == "sink_window"
    assert request.sdvg is True and request.tau == 1.0 and request.seed == 0
    assert parse_client_message('{"type": "stop"}', limits) == ("stop", None)
    with pytest.raises(ProtocolError, match="forcing_kv") as err:
        parse_client_message('{"type": "start", "prompt": "a", "cache_mode": "forcing_kv"}', limits)
    assert err.value.code == "bad_value"
    with pytest.raises(ProtocolError, match="sdvg must be true or false"):
        parse_client_message('{"type": "start", "prompt": "a", "sdvg": "yes"}', limits)
    with pytest.raises(ProtocolError, match="at most 300"):
        parse_client_message(json.dumps({"type": "set_prompt", "prompt": "a " * 200}), limits)


def test_a_full_command_queue_answers_busy(pipe):
    manager = SessionManager(2)
    worker = GenerationWorker(pipe, StreamSettings(command_queue_size=1), manager)  # not started: nothing drains
    session = Session("s", loop=None)
    assert worker.submit(session, "stop") is True
    assert worker.submit(session, "stop") is False
    with pytest.raises(Exception, match="max_sessions must be >= 1"):
        StreamSettings(max_sessions=0)


def test_cli_stream_needs_the_extra_and_checks_its_flags(monkeypatch, capsys):
    import importlib.util

    from vgen.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["stream"]) == 2
    assert "pip install 'vgen[stream]'" in capsys.readouterr().err
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert main(["stream", "--port", "0"]) == 2
    assert "--port must be in 1..65535" in capsys.readouterr().err
    out = subprocess.run([sys.executable, "-m", "vgen", "stream", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--host" in out.stdout and "127.0.0.1" in out.stdout
