"""Resume a forward pass at block L from a cached residual stream, and read a target from few rows.

A patch at layer L cannot change anything computed before block L, and a target at position P reads
one row of the final residual stream. So a patching sweep need not re-run the embedding and blocks
0..L-1, nor project every position onto the whole vocabulary:

* `recording_blocks(adapter)` records, during one ordinary forward of the model, the arguments each
  HF block was called with (the residual stream entering it, the attention mask, rotary position
  embeddings, position ids, ...), through forward pre-hooks removed in `finally`.
* `BlockCalls.block(L, hidden)` calls the real HF block L on a new batch of hidden states
  [B, T, D] with the recorded other arguments (batch-1 masks and position embeddings broadcast over
  the batch). Hooks live on the modules, so `adapter.running(handler)` sites fire and patch inside
  it exactly as in a full forward.
* `read_target(adapter, target, resid)` applies the final norm module to rows [N, D] of the final
  residual stream and multiplies by the unembedding columns the target reads (all of them only for
  log-probabilities); `direction` targets read the residual rows directly.

Exactness: the same modules run on the same inputs in the same order as in the full forward; only
the batch size differs (and, for logit targets, the unembedding is a column slice of the same
matrix). Results equal the full model's up to float rounding: 0 to ~1e-6 in fp32 on CPU, checked to
<= 1e-5 against a serial full-model reference in tests/sweeps/. This assumes, as in every supported
family (GPT-2, Llama/Mistral/Qwen, GPT-NeoX), that logits are `final_norm(resid) @ W_U + b_U` with
no extra scaling or soft-capping.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .inputs import Target


@dataclass
class BlockCalls:
    """What each block was called with in one recorded forward (batch 1)."""

    resid_pre: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [1, T, D], detached
    args: dict[int, tuple] = field(default_factory=dict)               # layer -> positional args after hidden
    kwargs: dict[int, dict] = field(default_factory=dict)              # layer -> keyword args
    blocks: list = field(default_factory=list)

    def block(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run HF block `layer` on hidden [B, T, D] -> resid_post [B, T, D]."""
        out = self.blocks[layer](hidden, *self.args[layer], **self.kwargs[layer])
        return out[0] if isinstance(out, tuple) else out


@contextmanager
def recording_blocks(adapter) -> Iterator[BlockCalls]:
    """Record block calls of forwards run in this thread inside the block; hooks removed in `finally`."""
    calls = BlockCalls(blocks=list(adapter.blocks))
    me = threading.get_ident()

    def recorder(layer: int):
        def pre(module, args, kwargs):
            if threading.get_ident() != me:    # another session's forward on the shared model
                return None
            if args:
                hidden, rest, kw = args[0], tuple(args[1:]), dict(kwargs)
            else:
                kw = dict(kwargs)
                hidden, rest = kw.pop("hidden_states"), ()
            calls.resid_pre[layer] = hidden.detach()
            calls.args[layer], calls.kwargs[layer] = rest, kw
            return None
        return pre

    handles = [b.register_forward_pre_hook(recorder(layer), with_kwargs=True)
               for layer, b in enumerate(calls.blocks)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def read_target(adapter, target: Target, resid: torch.Tensor) -> torch.Tensor:
    """resid [N, D] (rows of the final residual stream, the input of the final norm) -> target [N], fp32."""
    if target.kind == "direction":
        return resid.float() @ target.direction.to(resid.device)
    normed = adapter.final_norm(resid)                                   # [N, D]
    if target.kind == "logprob":
        return target.read_rows(adapter.model.get_output_embeddings()(normed))
    cols = list(target.token_ids) + list(target.distractor_ids)
    W = adapter.W_U[:, cols]                                             # [D, C]
    logits = (normed @ W + adapter.b_U[cols]).float()                    # [N, C]
    value = logits[:, :len(target.token_ids)].mean(-1)
    if target.distractor_ids:
        value = value - logits[:, len(target.token_ids):].mean(-1)
    return value
