"""The websocket protocol of ``vgen stream`` (the page in ``static/`` speaks it; so can any client).

**Server -> client**: every message is one binary websocket message::

    [4 bytes: N, big-endian unsigned] [N bytes: a JSON header, UTF-8] [the rest: payload]

The header's ``type`` says what it is; only ``frame`` carries a payload (the frame as a JPEG):

* ``hello``: on connect: ``session``, ``model`` (frames per block, frame size, training length), ``cache_modes``,
  ``sdvg`` (available, default ``tau``, ``draft_steps``), ``limits`` (message bytes, prompt characters, viewers).
* ``started``: a stream began: ``stream`` (a number per start, in every later header of that stream), ``prompt``,
  ``cache_mode``, ``sdvg``, ``tau``, ``seed``, ``max_frames`` (null: endless).
* ``frame``: ``stream``, ``frame`` (index in the stream), ``block``, ``frame_in_block``, ``frames_per_block``,
  ``width``, ``height``, ``prompt`` (the one the block followed), ``timings`` (the block's seconds: ``denoise``,
  ``commit``, ``decode``, and with SDVG ``draft``, ``target``, ``score``), ``generation_fps`` (frames generated over
  the diffusion seconds so far: the decoder excluded, as Self-Forcing and Forcing-KV count), ``elapsed`` (server
  seconds since the start message), ``cache_mode``, ``sdvg`` (null, or ``drafted``, ``accepted``, ``score``,
  ``acceptance_rate``).
* ``prompt``: a ``set_prompt`` took effect: ``stream``, ``prompt``, ``from_block`` (the first block that follows it).
* ``stopped``: ``stream``, ``reason`` (``stop``: asked; ``end``: the stream's frame limit; ``error``), ``frames``.
* ``error``: ``code`` (``malformed``, ``too_large``, ``unknown_type``, ``bad_value``, ``busy``, ``full``,
  ``generation``) and a one-line ``message``. The connection stays open, except after ``full`` (the viewer limit).

**Client -> server**: JSON text messages of at most ``max_message_bytes`` (default 4096):

* ``{"type": "start", "prompt": "a red circle moving right", "cache_mode": "sink_window", "sdvg": false,
  "tau": 0.3, "seed": 0}``: only ``prompt`` is required; a start while streaming restarts.
* ``{"type": "set_prompt", "prompt": "a red circle moving left"}``: the following blocks follow the new prompt.
* ``{"type": "stop"}``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

HEADER_LENGTH = struct.Struct(">I")
CLIENT_TYPES = ("start", "set_prompt", "stop")


class ProtocolError(ValueError):
    """A client message that breaks the protocol: ``code`` (see the module doc) and a one-line message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def pack(header: dict[str, Any], payload: bytes = b"") -> bytes:
    """One server message: length-prefixed JSON header + payload."""
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return HEADER_LENGTH.pack(len(head)) + head + payload


def unpack(message: bytes) -> tuple[dict[str, Any], bytes]:
    """The inverse of :func:`pack`: ``(header, payload)``."""
    if len(message) < HEADER_LENGTH.size:
        raise ValueError(f"a server message has at least {HEADER_LENGTH.size} bytes, got {len(message)}")
    (n,) = HEADER_LENGTH.unpack_from(message)
    if len(message) < HEADER_LENGTH.size + n:
        raise ValueError(f"the header says {n} bytes but the message has {len(message) - HEADER_LENGTH.size}")
    header = json.loads(message[HEADER_LENGTH.size:HEADER_LENGTH.size + n])
    return header, message[HEADER_LENGTH.size + n:]


def error_message(code: str, message: str) -> bytes:
    return pack({"type": "error", "code": code, "message": message})


@dataclass
class StartRequest:
    """A validated ``start`` message."""

    prompt: str
    cache_mode: str
    sdvg: bool
    tau: float
    seed: int


@dataclass
class Limits:
    """What a client message may hold: its bytes, a prompt's characters, the cache modes the model has."""

    max_message_bytes: int = 4096
    max_prompt_chars: int = 300
    cache_modes: tuple[str, ...] = ("full", "sink_window", "forcing_kv")
    default_cache_mode: str = "sink_window"
    default_tau: float = 0.3


def _prompt(value: Any, limits: Limits) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ProtocolError("bad_value", "prompt must be a non-empty string")
    if len(value) > limits.max_prompt_chars:
        raise ProtocolError("bad_value", f"prompt is {len(value)} characters; at most {limits.max_prompt_chars}")
    return " ".join(value.split())


def parse_client_message(raw: str | bytes | None, limits: Limits) -> tuple[str, Any]:
    """Validate one client message: ``("start", StartRequest)``, ``("set_prompt", prompt)`` or ``("stop", None)``;
    anything else raises :class:`ProtocolError` with the code the error frame carries."""
    if raw is None or isinstance(raw, (bytes, bytearray)):
        raise ProtocolError("malformed", "send JSON text messages (see the protocol in vgen.stream)")
    size = len(raw.encode("utf-8", "surrogatepass"))
    if size > limits.max_message_bytes:
        raise ProtocolError("too_large", f"message of {size} bytes; at most {limits.max_message_bytes}")
    try:
        message = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise ProtocolError("malformed", "the message is not valid JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("malformed", "a message is a JSON object with a 'type'")
    kind = message.get("type")
    if kind not in CLIENT_TYPES:
        raise ProtocolError("unknown_type", f"unknown message type {kind!r}; known: {', '.join(CLIENT_TYPES)}")
    if kind == "stop":
        return kind, None
    if kind == "set_prompt":
        return kind, _prompt(message.get("prompt"), limits)
    cache_mode = message.get("cache_mode", limits.default_cache_mode)
    if cache_mode not in limits.cache_modes:
        raise ProtocolError("bad_value", f"cache_mode must be one of {', '.join(limits.cache_modes)}, got "
                            f"{cache_mode!r}")
    sdvg = message.get("sdvg", False)
    if not isinstance(sdvg, bool):
        raise ProtocolError("bad_value", f"sdvg must be true or false, got {sdvg!r}")
    tau = message.get("tau", limits.default_tau)
    if tau is None:
        tau = limits.default_tau
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau):
        raise ProtocolError("bad_value", f"tau must be a finite number, got {tau!r}")
    seed = message.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ProtocolError("bad_value", f"seed must be an integer in [0, 2**63), got {seed!r}")
    return kind, StartRequest(_prompt(message.get("prompt"), limits), cache_mode, sdvg, float(tau), seed)
