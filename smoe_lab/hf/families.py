"""One adapter table per Hugging Face MoE family (REAP's idea): where a model keeps its MoE blocks, routers and
experts, how the experts are laid out, how tokens are routed and which config fields count experts.

Everything else in smoe_lab.hf reads these tables; nothing outside this file branches on `model_type`. Paths are
dotted attribute paths (an integer picks from a ModuleList, -1 the last). The layouts are those of transformers 5.x,
read from its modeling files:

    switch_transformers  SwitchTransformersForConditionalGeneration: `encoder.block[i].layer[-1].mlp` is a
                         SwitchTransformersSparseMLP in every other block (`router.classifier`: Linear(d_model, E),
                         top-1 with a per-sequence `expert_capacity`; `experts.expert_{e}.wi/wo`: bias-free ReLU FFNs)
    olmoe, qwen2_moe,    *ForCausalLM: `model.layers[i].mlp` is a *SparseMoeBlock (`gate`: a TopKRouter holding
    qwen3_moe, mixtral   `weight` [E, d_model], softmax -> top-k, optionally renormalised; `experts`: fused SwiGLU
                         `gate_up_proj` [E, 2f, d_model] (gate rows, then up rows) and `down_proj` [E, d_model, f]).
                         Qwen2-MoE's `shared_expert` / `shared_expert_gate` and dense (mlp_only) layers pass through.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]  # model classes with an LM head that the adapter drives (first: the default)
    seq2seq: bool  # encoder-decoder (the decoder scores answers) or causal decoder
    stacks: tuple[str, ...]  # block lists in depth order, e.g. ("encoder.block", "decoder.block")
    moe: str  # from a block to its FFN, which is an MoE block when it has `router` and `experts`
    router: str  # from the MoE block to the routing linear map (its `.weight` is [E, d_model])
    router_module: str  # from the MoE block to the module rebuilt with D rows ("router" holds the classifier)
    experts: str  # from the MoE block to the expert container
    layout: str  # "t5": ModuleDict expert_{e}.wi/.wo (bias-free) | "fused_swiglu": gate_up_proj / down_proj
    count_fields: tuple[str, ...]  # config fields holding the expert count (aliases resolve via attribute_map)
    top_k_field: str | None  # config field of k (None: top-1)
    norm_topk: str | bool  # config field "renormalise the top-k weights", or a constant
    capacity_field: str | None  # tokens an expert may take per sequence (Switch), None: no token dropping
    aux_coef_field: str  # load-balancing loss coefficient
    z_coef_field: str | None  # router z-loss coefficient (Switch)
    act_field: str  # the experts' activation
    max_length_field: str | None  # longest input; None: default_max_length (T5's relative positions have none)
    default_max_length: int
    prepend_bos: bool  # the tokenizer starts sequences with BOS (Llama/Mistral): the adapter adds it
    shared: tuple[str, ...] = ()  # parts of the MoE block that pass through a reduction untouched


SWITCH = Family(
    name="switch",
    model_types=("switch_transformers",),
    architectures=("SwitchTransformersForConditionalGeneration",),
    seq2seq=True,
    stacks=("encoder.block", "decoder.block"),
    moe="layer.-1.mlp",
    router="router.classifier",
    router_module="router",
    experts="experts",
    layout="t5",
    count_fields=("num_experts",),
    top_k_field=None,
    norm_topk=False,
    capacity_field="expert_capacity",
    aux_coef_field="router_aux_loss_coef",
    z_coef_field="router_z_loss_coef",
    act_field="dense_act_fn",
    max_length_field=None,
    default_max_length=512,
    prepend_bos=False,
)


def _decoder(name: str, model_type: str, architecture: str, **kw) -> Family:
    base = dict(
        name=name,
        model_types=(model_type,),
        architectures=(architecture,),
        seq2seq=False,
        stacks=("model.layers",),
        moe="mlp",
        router="gate",
        router_module="gate",
        experts="experts",
        layout="fused_swiglu",
        count_fields=("num_experts",),
        top_k_field="num_experts_per_tok",
        norm_topk="norm_topk_prob",
        capacity_field=None,
        aux_coef_field="router_aux_loss_coef",
        z_coef_field=None,
        act_field="hidden_act",
        max_length_field="max_position_embeddings",
        default_max_length=2048,
        prepend_bos=False,
    )
    return Family(**{**base, **kw})


OLMOE = _decoder("olmoe", "olmoe", "OlmoeForCausalLM")
QWEN2_MOE = _decoder("qwen2_moe", "qwen2_moe", "Qwen2MoeForCausalLM", shared=("shared_expert", "shared_expert_gate"))
QWEN3_MOE = _decoder("qwen3_moe", "qwen3_moe", "Qwen3MoeForCausalLM")
MIXTRAL = _decoder(
    "mixtral", "mixtral", "MixtralForCausalLM", count_fields=("num_local_experts",), norm_topk=True, prepend_bos=True
)

FAMILIES: tuple[Family, ...] = (SWITCH, OLMOE, QWEN2_MOE, QWEN3_MOE, MIXTRAL)


def family_for(config) -> Family:
    """The family of a transformers config (by model_type); ValueError naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"unsupported Hugging Face model_type {model_type!r}: smoe_lab.hf knows {known}")


# -- reading the tables ------------------------------------------------------------------------------------------
def get_path(obj, path: str):
    """obj.a.b[-1].c for path 'a.b.-1.c' (integers index ModuleLists)."""
    for part in path.split("."):
        obj = obj[int(part)] if part.lstrip("-").isdigit() else getattr(obj, part)
    return obj


def set_path(obj, path: str, value) -> None:
    *head, last = path.split(".")
    setattr(get_path(obj, ".".join(head)) if head else obj, last, value)


def has_path(obj, path: str) -> bool:
    try:
        get_path(obj, path)
    except (AttributeError, IndexError, KeyError):
        return False
    return True


def moe_blocks(fam: Family, model: nn.Module) -> list[tuple[str, int, nn.Module]]:
    """(stack, block index within the stack, MoE block) for every MoE block, in depth order (encoder first)."""
    out = []
    for stack in fam.stacks:
        for i, block in enumerate(get_path(model, stack)):
            if has_path(block, fam.moe):
                ffn = get_path(block, fam.moe)
                if has_path(ffn, fam.router) and has_path(ffn, fam.experts):
                    out.append((stack, i, ffn))
    return out


def num_blocks(fam: Family, model: nn.Module) -> dict[str, int]:
    return {stack: len(get_path(model, stack)) for stack in fam.stacks}


def top_k(fam: Family, config) -> int:
    return 1 if fam.top_k_field is None else int(getattr(config, fam.top_k_field))


def norm_topk(fam: Family, config) -> bool:
    return fam.norm_topk if isinstance(fam.norm_topk, bool) else bool(getattr(config, fam.norm_topk, False))


def max_length(fam: Family, config) -> int:
    if fam.max_length_field is None:
        return fam.default_max_length
    return int(getattr(config, fam.max_length_field, None) or fam.default_max_length)


def set_expert_count(fam: Family, config, num_experts: int, k: int | None = None, lower_top_k: bool = True) -> None:
    """Write D into a config, and top-k k (default: the config's) lowered to at most D."""
    for field in fam.count_fields:
        setattr(config, field, int(num_experts))
    if fam.top_k_field is not None:
        k = top_k(fam, config) if k is None else k
        setattr(config, fam.top_k_field, int(min(k, num_experts) if lower_top_k else k))
