"""Per-architecture mapping from canonical sites to the real HF modules: one short table each.

The token embedding (W_E) and the unembedding (W_U, the `logits` site) come from HF's own
`get_input_embeddings()` / `get_output_embeddings()`, so they need no row.
Paths are attribute paths on the `...ForCausalLM` model (model-level) or on one block (block-level).
Everything else (what a site means, how hooks attach) is shared; adding a family is adding a row.
Weights: `linear_layout` says how projection weights are stored, "linear" = nn.Linear [out, in],
"conv1d" = GPT-2's Conv1D [in, out].
"""

from __future__ import annotations

from dataclasses import dataclass

from tdb_server.errors import InvalidArgument


@dataclass(frozen=True)
class ArchSpec:
    family: str
    # model-level
    embed: str            # module whose output is the `embed` site (sum of token + position embeddings)
    blocks: str           # ModuleList of blocks
    final_norm: str
    # block-level
    attn: str             # attention module; output[0] is attn.out
    attn_out_proj: str    # its input is attn.z
    mlp: str              # MLP module; output is mlp.out
    mlp_in: str           # output is mlp.pre (gated: the gate projection)
    mlp_out_proj: str     # input is mlp.post (down projection)
    # layout
    linear_layout: str = "linear"   # "linear" | "conv1d"
    norm: str = "layernorm"         # "layernorm" | "rmsnorm"
    gated_mlp: bool = False
    parallel_attr: str | None = None  # config flag that makes blocks parallel (attn and MLP both read resid_pre)


GPT2 = ArchSpec(
    family="gpt2", embed="transformer.drop", blocks="transformer.h",
    final_norm="transformer.ln_f",
    attn="attn", attn_out_proj="attn.c_proj", mlp="mlp", mlp_in="mlp.c_fc", mlp_out_proj="mlp.c_proj",
    linear_layout="conv1d", norm="layernorm",
)

LLAMA = ArchSpec(  # also Mistral, Qwen2, Qwen3: RoPE, GQA, gated MLP, RMSNorm
    family="llama", embed="model.embed_tokens", blocks="model.layers",
    final_norm="model.norm",
    attn="self_attn", attn_out_proj="self_attn.o_proj", mlp="mlp", mlp_in="mlp.gate_proj",
    mlp_out_proj="mlp.down_proj", norm="rmsnorm", gated_mlp=True,
)

GPT_NEOX = ArchSpec(
    family="gpt_neox", embed="gpt_neox.emb_dropout", blocks="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm",
    attn="attention", attn_out_proj="attention.dense", mlp="mlp", mlp_in="mlp.dense_h_to_4h",
    mlp_out_proj="mlp.dense_4h_to_h", norm="layernorm", parallel_attr="use_parallel_residual",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": GPT2,
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "gpt_neox": GPT_NEOX,
}


class UnsupportedArchitecture(InvalidArgument):
    reason = "UNSUPPORTED_ARCHITECTURE"


def arch_for(model_type: str) -> ArchSpec:
    """The mapping for a `config.model_type`; raises UnsupportedArchitecture naming the supported ones."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitecture(
            f"architecture {model_type!r} is not supported; supported model_type values: "
            f"{', '.join(sorted(ARCHITECTURES))}") from None


def get_path(root, path: str):
    """`root.a.b.c` for path "a.b.c" (ModuleList indices included)."""
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj
