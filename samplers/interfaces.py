"""The small step interfaces through which the sampling layer drives generators.

A generation loop, CFG, seeding and the speculative algorithms are written once against these Protocols; a model
family implements the step(s) it can take. The loop never touches a model's modules, only these methods.

Conventions shared by every interface:

- **Conditioning is opaque.** A model turns user input (class labels, prompts) into its own condition object; the
  loop only asks the model to concatenate a conditional and an unconditional one (``concat_conditions``) when CFG is
  on, giving a doubled batch with the conditional half first. CFG itself (:mod:`vgen.samplers.guidance`) then splits
  any per-step prediction (logits or velocities) in two and combines the halves.
- **State is an object** returned by ``prefill`` that holds at least a :class:`StepKVCache` (``state.cache``) plus
  whatever the model needs across steps (AdaLN conditions, text context). The loop passes it back unchanged.
- **Randomness belongs to the loop**: models are deterministic functions of their inputs; sampling draws from
  per-sample generators (:mod:`vgen.samplers.logits`).

Families and the interface each implements:

=========================  ===========================  ==================================================
family                     interface                    step
=========================  ===========================  ==================================================
VAR, NFIG (next-scale)     :class:`NextScaleModel`      logits for every token of scale ``si``
raster AR, Token-Shuffle   :class:`NextTokenModel`      logits for n positions after a prefix (verify n
                                                        drafted tokens in one pass: speculative decoding)
FlowAR, xAR, video blocks  :class:`VelocityModel`       condition for unit ``k`` (KV cache), then velocity
                                                        ``v(x_t, t | condition)`` for the integrator
=========================  ===========================  ==================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class StepKVCache(Protocol):
    """The one KV-cache protocol every family's step uses (implemented by :mod:`vgen.kv_cache`: full, sink +
    rolling window, Forcing-KV compressed). A model's attention layers hand each step's queries/keys/values to
    ``attend``; the step's tokens stay tentative until the loop calls ``commit`` (all of them, or the first
    ``keep_B[b]`` of row b: what speculative verification accepts) or ``rollback``. ``truncate`` rolls back
    committed tokens per row; ``select`` keeps, reorders or repeats batch rows."""

    def attend(self, layer: int, q_BHlc: torch.Tensor, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor, *,
               store: bool = True, causal: bool = False, scale: float | None = None) -> torch.Tensor:
        """Attention (B, H, l, c) of the step's queries over the cached history plus the step's own keys/values."""
        ...

    def commit(self, keep_B: torch.Tensor | Sequence[int] | None = None) -> None: ...

    def rollback(self) -> None: ...

    def select(self, index_B: torch.Tensor) -> None: ...

    def clone(self) -> StepKVCache: ...


class StepState(Protocol):
    """What ``prefill`` returns: at least the cache; the rest is model-private."""

    cache: StepKVCache


@runtime_checkable
class NextScaleModel(Protocol):
    """Next-scale prediction (VAR, NFIG): scale ``si`` is predicted in one pass from scales ``< si``.

    The loop in :mod:`vgen.samplers.next_scale` calls, for a batch of B images (2B rows when CFG is on)::

        state, x_BlC = model.prefill(cond)                     # start tokens of scale 0
        for si in range(len(model.patch_nums)):
            logits_BlV = model.logits_for_scale(si, x_BlC, state)   # KV cache holds scales < si
            state.cache.commit()                                    # scale si joins the history
            ... CFG, filtering, sampling, tokenizer update ...
            x_BlC = model.embed_scale_input(si + 1, next_input_BCvhh)
    """

    @property
    def patch_nums(self) -> Sequence[int]:
        """Side length of each scale's token map, coarse to fine (VAR: 1, 2, 3, 4, 5, 6, 8, 10, 13, 16)."""
        ...

    def concat_conditions(self, cond: Any, uncond: Any) -> Any:
        """One condition for the doubled batch: conditional rows first, then unconditional ones."""
        ...

    def null_condition(self, batch_size: int) -> Any:
        """The unconditional condition (null class, empty prompt) for ``batch_size`` rows."""
        ...

    def prefill(self, cond: Any) -> tuple[StepState, torch.Tensor]:
        """Start a generation: a fresh state (empty KV cache) and the first scale's input tokens (B, pn0^2, C)."""
        ...

    def logits_for_scale(self, si: int, token_map_BlC: torch.Tensor, state: StepState) -> torch.Tensor:
        """Logits (B, pn_si^2, V) in float32 for every token of scale ``si``; this scale's keys/values go to the cache
        tentatively (the loop commits them)."""
        ...

    def embed_scale_input(self, si: int, next_input_BCvhw: torch.Tensor) -> torch.Tensor:
        """Embed the tokenizer's input for scale ``si`` (B, Cvae, pn_si, pn_si) into model tokens (B, pn^2, C)."""
        ...


@runtime_checkable
class ResidualQuantizer(Protocol):
    """The tokenizer side of next-scale decoding (VAR's ``VectorQuantizer2``; NFIG's frequency-band quantizer)."""

    embedding: torch.nn.Embedding  # codebook (V, Cvae)

    def get_next_autoregressive_input(
        self, si: int, SN: int, f_hat: torch.Tensor, h_BChw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add scale ``si``'s embeddings ``h_BChw`` to ``f_hat``; return ``(f_hat, next scale's input)``."""
        ...


@runtime_checkable
class NextTokenModel(Protocol):
    """Raster-order AR (LlamaGen-style, Token-Shuffle windows): logits for positions after a prefix.

    ``decode`` scores ``n >= 1`` new tokens in one pass (logits for each of them and the one after), which is
    exactly what a speculative verifier needs; the loop then commits what it accepts per row
    (``state.cache.commit(keep_B)``), and ``state.cache.truncate`` rolls back committed tokens per row.
    """

    def concat_conditions(self, cond: Any, uncond: Any) -> Any: ...

    def null_condition(self, batch_size: int) -> Any: ...

    def prefill(self, cond: Any) -> tuple[StepState, torch.Tensor]:
        """State after the condition prefix and logits (B, V) for the first image token."""
        ...

    def decode(self, tokens_Bn: torch.Tensor, state: StepState) -> torch.Tensor:
        """Append ``tokens_Bn`` and return logits (B, n, V): entry j predicts the token after ``tokens_Bn[:, j]``."""
        ...


@runtime_checkable
class VelocityModel(Protocol):
    """Continuous-token families (FlowAR scales, xAR cells, block-causal video): per AR unit ``k``, the model
    builds a condition from the clean units before it (KV cache), then an ODE/SDE integrator queries velocities.
    The loop (:func:`vgen.samplers.flow_units.generate_flow_units`) calls::

        state, unit_cond = model.prefill(cond)            # R = B rows, or 2B under CFG (conditional rows first)
        for k in range(len(model.unit_shapes)):
            ... integrate x from noise (t = 1) to data (t = 0) with v = model.velocity(k, x_t, t, unit_cond) ...
            if k + 1 < len(model.unit_shapes):
                unit_cond = model.commit(k, x_clean, state)

    Conventions (official FlowAR / xAR): ``x_t = (1 - t) x0 + t eps``, velocity ``eps - x0``.
    """

    @property
    def unit_shapes(self) -> Sequence[tuple[int, ...]]:
        """One image's unit k without the batch dimension, for k = 0..K-1: FlowAR ``(s_k^2, C)``, xAR
        ``(cell tokens, C)``, video ``(frames, C, h, w)``."""
        ...

    @property
    def device(self) -> torch.device: ...

    def concat_conditions(self, cond: Any, uncond: Any) -> Any: ...

    def null_condition(self, batch_size: int) -> Any: ...

    def prefill(self, cond: Any) -> tuple[StepState, Any]:
        """State (a fresh KV cache) plus the AR condition for unit 0."""
        ...

    def velocity(self, k: int, x_t: torch.Tensor, t: torch.Tensor, unit_cond: Any) -> torch.Tensor:
        """Velocity for unit ``k``: ``x_t`` (R, *unit_shapes[k]) float32, ``t`` (R,) float32 (1 = noise); returns
        ``x_t``'s shape. Leaves the cache unchanged (attends with ``store=False``)."""
        ...

    def commit(self, k: int, x_clean: torch.Tensor, state: StepState) -> Any:
        """Store the finished unit ``k`` (``x_clean`` (R, ...) float32; under CFG the conditional result repeated for
        both halves) in the cache and commit it (``state.cache.commit()``: the loop never touches the cache);
        return the AR condition for unit ``k + 1``. Not called after the last unit."""
        ...
