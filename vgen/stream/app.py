"""The ``vgen stream`` server: a FastAPI app that streams a video pipeline's blocks to browsers over a websocket.

    from vgen.stream.app import StreamSettings, create_app
    app = create_app(pipe, StreamSettings(max_sessions=4))          # then: uvicorn.run(app, host="127.0.0.1")

Pieces:

* :class:`SessionManager`: one :class:`Session` per websocket (up to ``max_sessions``; the next viewer gets an
  ``error`` frame with code ``full`` and the socket closes with 1013, "try again later").
* :class:`GenerationWorker`: the one thread that touches the pipeline. Client commands reach it through a bounded
  queue (a full queue answers ``busy``); it runs the streams of all sessions round robin, one block at a time, and
  only for a session whose viewer has taken its earlier blocks (at most ``max_pending_blocks`` in flight), so a slow
  viewer slows itself, not the others, and memory stays bounded. Frames are JPEG-encoded in the worker and handed to
  the event loop, which sends them.
* Disconnects: the session leaves the manager at once; the worker drops its stream (KV cache included) when it next
  looks at it, and nothing else refers to it, so a closed session's memory is freed (``/api/status`` counts the live
  streams).

The protocol (message layout, client and server messages) is in :mod:`vgen.stream.protocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import math
import queue
import threading
import time
import traceback
import uuid
import weakref
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image

from vgen.errors import UserError
from vgen.stream.protocol import Limits, ProtocolError, StartRequest, error_message, pack, parse_client_message

STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}


@dataclass
class StreamSettings:
    """Server settings.

    Args:
        max_sessions: viewers served at once; one more is refused.
        max_pending_blocks: blocks generated for a viewer and not yet sent to it (the per-viewer bound).
        command_queue_size: client commands waiting for the worker; past it a command is answered ``busy``.
        full_cache_frames: length of a stream on the full cache (it grows with the video); default 4x the model's
            training length. The sink-window and Forcing-KV caches stream without end.
        max_stream_frames: an upper bound for every stream (None: endless where the cache allows).
        jpeg_quality: of the frames sent.
        draft_steps: SDVG's drafter is the model itself with this many steps per block.
        scorer: SDVG's frame scorer (a callable, see :mod:`vgen.samplers.sdvg`); None: the Moving Shapes scorer.
        default_tau: the page's initial SDVG threshold.
        max_message_bytes, max_prompt_chars: what a client message may hold.
    """

    max_sessions: int = 4
    max_pending_blocks: int = 2
    command_queue_size: int = 64
    full_cache_frames: int | None = None
    max_stream_frames: int | None = None
    jpeg_quality: int = 90
    draft_steps: int = 1
    scorer: Any = None
    default_tau: float = 0.3
    max_message_bytes: int = 4096
    max_prompt_chars: int = 300

    def __post_init__(self):
        for name in ("max_sessions", "max_pending_blocks", "command_queue_size", "draft_steps", "max_message_bytes",
                     "max_prompt_chars"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise UserError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if not math.isfinite(self.default_tau):
            raise UserError(f"the default SDVG threshold must be finite, got {self.default_tau}")


def encode_jpeg(frame_HW3: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame_HW3).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


class GenerationJob:
    """One running stream of a session: the pipeline's :class:`~vgen.pipelines.video.VideoStream` and its counters.
    Only the worker thread touches it."""

    def __init__(self, number: int, request: StartRequest, stream, max_frames: int | None):
        self.number, self.request, self.stream, self.max_frames = number, request, stream, max_frames
        self.prompt = request.prompt
        self.frames = 0
        self.diffusion_seconds = 0.0
        self.started = time.perf_counter()


@dataclass(eq=False)
class Session:
    """One viewer: its websocket's outbox (filled by the worker through the event loop) and its job."""

    id: str
    loop: asyncio.AbstractEventLoop
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    job: GenerationJob | None = None
    pending_blocks: int = 0  # generated, not yet sent (the worker adds, the sender takes away: two threads)
    closed: bool = False
    streams_started: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_pending(self, delta: int) -> None:
        with self._lock:
            self.pending_blocks += delta

    def post(self, message: bytes, ends_block: bool = False) -> None:
        """Queue ``message`` for sending (from any thread); ``ends_block``: the last frame of a block."""
        if self.closed:
            return
        with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown)
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, (message, ends_block))


class SessionManager:
    """The sessions, up to ``max_sessions``."""

    def __init__(self, max_sessions: int):
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def open(self, loop: asyncio.AbstractEventLoop) -> Session | None:
        """A new session, or None when ``max_sessions`` are open."""
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                return None
            session = Session(uuid.uuid4().hex[:12], loop)
            self._sessions[session.id] = session
            return session

    def close(self, session: Session) -> None:
        session.closed = True
        with self._lock:
            self._sessions.pop(session.id, None)

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


class GenerationWorker:
    """The generation thread (see the module doc)."""

    def __init__(self, pipe, settings: StreamSettings, manager: SessionManager):
        self.pipe, self.settings, self.manager = pipe, settings, manager
        self.commands: queue.Queue = queue.Queue(maxsize=settings.command_queue_size)
        self.live_streams: weakref.WeakSet = weakref.WeakSet()  # diagnostics: streams not yet freed
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vgen-stream-worker", daemon=True)
        self._turn = itertools.count()
        self.errors = 0
        self._scorer = settings.scorer
        training = pipe.transformer.config.max_frames
        self.full_cache_frames = settings.full_cache_frames or 4 * training

    # -- the event loop's side -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, session: Session, kind: str, value: Any = None) -> bool:
        """Queue a command for the worker; False when the queue is full."""
        try:
            self.commands.put_nowait((session, kind, value))
        except queue.Full:
            return False
        self._wake.set()
        return True

    def wake(self) -> None:
        self._wake.set()

    # -- the worker thread -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            self._drain_commands()
            session = self._next_session()
            if session is None:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self._generate_block(session)

    def _drain_commands(self) -> None:
        while True:
            try:
                session, kind, value = self.commands.get_nowait()
            except queue.Empty:
                return
            if session.closed:
                session.job = None
                continue
            try:
                if kind == "start":
                    self._start(session, value)
                elif kind == "set_prompt":
                    self._set_prompt(session, value)
                elif kind == "stop":
                    self._finish(session, "stop")
            except UserError as err:
                session.post(error_message("bad_value", str(err)))
            except Exception as err:  # never let one viewer's request stop the worker
                self.errors += 1
                traceback.print_exc()
                session.post(error_message("generation", f"{kind} failed: {type(err).__name__}: {err}"))
                session.job = None

    def scorer(self):
        """SDVG's frame scorer: the settings' or the Moving Shapes one, built once (its detector takes a moment)."""
        if self._scorer is None:
            from vgen.eval.video_scorers import MovingShapesFrameScorer

            self._scorer = MovingShapesFrameScorer()
        return self._scorer

    def _start(self, session: Session, request: StartRequest) -> None:
        from vgen.pipelines.video import SDVGOptions

        if session.job is not None:
            self._finish(session, "stop")
        max_frames = self.settings.max_stream_frames
        if request.cache_mode == "full":
            max_frames = min(max_frames or self.full_cache_frames, self.full_cache_frames)
        if max_frames is not None:
            block = self.pipe.frames_per_block
            max_frames = max(block, max_frames // block * block)
        sdvg = None
        if request.sdvg:
            sdvg = SDVGOptions(tau=request.tau, draft_steps=self.settings.draft_steps, scorer=self.scorer())
        stream = self.pipe.stream(request.prompt, num_frames=max_frames,
                                  generator=torch.Generator().manual_seed(request.seed), cache=request.cache_mode,
                                  sdvg=sdvg)
        session.streams_started += 1
        job = GenerationJob(session.streams_started, request, stream, max_frames)
        self.live_streams.add(stream)
        session.job = job
        session.post(pack({"type": "started", "stream": job.number, "prompt": request.prompt,
                           "cache_mode": request.cache_mode, "sdvg": request.sdvg, "tau": request.tau,
                           "seed": request.seed, "max_frames": max_frames}))

    def _set_prompt(self, session: Session, prompt: str) -> None:
        job = session.job
        if job is None:
            session.post(error_message("bad_value", "no stream is running; send 'start' first"))
            return
        job.stream.set_prompt(prompt)
        job.prompt = prompt
        next_block = job.frames // self.pipe.frames_per_block
        session.post(pack({"type": "prompt", "stream": job.number, "prompt": prompt, "from_block": next_block}))

    def _finish(self, session: Session, reason: str) -> None:
        job, session.job = session.job, None
        if job is not None:
            session.post(pack({"type": "stopped", "stream": job.number, "reason": reason, "frames": job.frames}))

    def _next_session(self) -> Session | None:
        """Round robin over the sessions with a job and room for another block."""
        sessions = self.manager.sessions()
        if not sessions:
            return None
        offset = next(self._turn) % len(sessions)
        for session in sessions[offset:] + sessions[:offset]:
            if session.job is not None and session.pending_blocks < self.settings.max_pending_blocks:
                return session
        return None

    def _generate_block(self, session: Session) -> None:
        job = session.job
        try:
            block = next(job.stream)
        except StopIteration:
            self._finish(session, "end")
            return
        except UserError as err:
            session.post(error_message("generation", str(err)))
            self._finish(session, "error")
            return
        except Exception as err:  # a bug must not stop the server for the other viewers
            self.errors += 1
            traceback.print_exc()
            session.post(error_message("generation", f"generation failed: {type(err).__name__}: {err}"))
            self._finish(session, "error")
            return
        if session.closed or session.job is not job:
            return
        job.diffusion_seconds += block.timings.total
        f = block.frames.shape[1]
        timings = {"denoise": block.timings.denoise, "commit": block.timings.commit, "decode": block.decode_seconds}
        sdvg = None
        if block.sdvg is not None:
            t = block.timings
            timings.update(draft=t.draft, target=t.target, score=t.score + t.draft_decode)
            score = block.sdvg.score_B[0] if block.sdvg.score_B else None
            sdvg = {"drafted": block.sdvg.drafted, "accepted": block.sdvg.accepted_B[0],
                    "score": score if score is None or math.isfinite(score) else None,
                    "acceptance_rate": _finite_or_none(job.stream.sdvg.stats.acceptance_rate)}
        generation_fps = (job.frames + f) / job.diffusion_seconds if job.diffusion_seconds > 0 else None
        session.add_pending(1)
        for i in range(f):
            frame = block.frames[0, i]
            header = {"type": "frame", "stream": job.number, "frame": job.frames + i, "block": block.index,
                      "frame_in_block": i, "frames_per_block": f, "width": int(frame.shape[1]),
                      "height": int(frame.shape[0]), "prompt": job.prompt, "timings": timings,
                      "generation_fps": generation_fps, "elapsed": time.perf_counter() - job.started,
                      "cache_mode": job.request.cache_mode, "sdvg": sdvg}
            session.post(pack(header, encode_jpeg(frame, self.settings.jpeg_quality)), ends_block=i == f - 1)
        job.frames += f


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _hello(session: Session, pipe, settings: StreamSettings, limits: Limits) -> bytes:
    H = pipe.autoencoder.downsample * pipe.transformer.config.latent_height
    W = pipe.autoencoder.downsample * pipe.transformer.config.latent_width
    return pack({
        "type": "hello", "session": session.id,
        "model": {"frames_per_block": pipe.frames_per_block, "height": H, "width": W,
                  "training_frames": pipe.transformer.config.max_frames,
                  "default_cache_mode": limits.default_cache_mode},
        "cache_modes": list(limits.cache_modes),
        "sdvg": {"available": True, "default_tau": settings.default_tau, "draft_steps": settings.draft_steps,
                 "target_steps": pipe.resolve_sampling()["num_steps"]},
        "limits": {"max_message_bytes": limits.max_message_bytes, "max_prompt_chars": limits.max_prompt_chars,
                   "max_sessions": settings.max_sessions},
    })


def create_app(pipe, settings: StreamSettings | None = None) -> FastAPI:
    """The app for ``pipe`` (a :class:`~vgen.pipelines.video.VideoPipeline`): ``GET /`` (the page), ``GET
    /static/<file>``, ``GET /api/status`` and the websocket ``/ws``. The worker runs while the app is served
    (its lifespan); ``app.state.worker`` / ``app.state.sessions`` are there for tests and operators."""
    settings = settings or StreamSettings()
    modes = ("full", "sink_window") + (("forcing_kv",) if pipe.head_profile is not None else ())
    saved_mode = pipe.resolve_sampling()["cache"]
    default_mode = saved_mode if saved_mode in modes and saved_mode != "full" else "sink_window"
    limits = Limits(settings.max_message_bytes, settings.max_prompt_chars, modes, default_mode, settings.default_tau)
    manager = SessionManager(settings.max_sessions)
    worker = GenerationWorker(pipe, settings, manager)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="vgen stream", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.sessions, app.state.settings, app.state.limits = worker, manager, settings, limits

    def static(name: str) -> bytes:
        return resources.files("vgen.stream").joinpath("static", name).read_bytes()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> Response:
        return Response(static("index.html"), media_type=STATIC_FILES["index.html"])

    @app.get("/static/{name}")
    async def static_file(name: str) -> Response:
        if name not in STATIC_FILES:
            return JSONResponse({"error": f"no static file {name!r}"}, status_code=404)
        return Response(static(name), media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})

    @app.get("/api/status")
    async def status() -> JSONResponse:
        return JSONResponse({"sessions": len(manager), "max_sessions": settings.max_sessions,
                             "live_streams": len(worker.live_streams), "worker_alive": worker.alive,
                             "pending_commands": worker.commands.qsize(), "worker_errors": worker.errors,
                             "settings": {k: v for k, v in asdict(settings).items() if k != "scorer"}})

    @app.websocket("/ws")
    async def websocket_endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        session = manager.open(asyncio.get_running_loop())
        if session is None:
            await websocket.send_bytes(error_message(
                "full", f"this server streams to at most {settings.max_sessions} viewers at once; try again later"))
            await websocket.close(code=1013)
            return
        sender = asyncio.create_task(_send_loop(websocket, session, worker))
        try:
            await websocket.send_bytes(_hello(session, pipe, settings, limits))
            await _receive_loop(websocket, session, worker, limits)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            manager.close(session)
            worker.wake()
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
            session.job = None  # the worker drops it too; nothing else holds the stream

    return app


async def _receive_loop(websocket: WebSocket, session: Session, worker: GenerationWorker, limits: Limits) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        raw = message.get("text")
        if raw is None:
            raw = message.get("bytes")
        try:
            kind, value = parse_client_message(raw, limits)
        except ProtocolError as err:
            session.post(error_message(err.code, str(err)))
            continue
        if not worker.submit(session, kind, value):
            session.post(error_message("busy", "the generator has too many commands waiting; send it again shortly"))


async def _send_loop(websocket: WebSocket, session: Session, worker: GenerationWorker) -> None:
    while True:
        message, ends_block = await session.outbox.get()
        try:
            await websocket.send_bytes(message)
        finally:
            if ends_block:
                session.add_pending(-1)
                worker.wake()
