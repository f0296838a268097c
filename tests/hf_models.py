"""Tiny random Hugging Face MoE models of every supported family, and a tiny offline tokenizer (no hub)."""

import torch

VOCAB = 96
Z = 4  # experts per MoE layer
WORDS = (
    "is it an animal ? yes no cat dog horse sheep goat mouse tiger lion whale otter camel zebra hammer saw drill "
    "chisel wrench spanner pliers shovel rake ladder needle axe the a of and to in question passage answer true "
    "false premise hypothesis"
).split()
FAMILIES = ("switch", "olmoe", "qwen2_moe", "qwen3_moe", "mixtral")


def hf_config(family: str, num_experts: int = Z, top_k: int = 2):
    """A tiny config (d_model 16, 2 blocks per stack, Z experts) with the special-token ids of the tokenizer below."""
    import transformers as tf

    ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    common = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if family == "switch":
        return tf.SwitchTransformersConfig(
            vocab_size=VOCAB,
            d_model=16,
            d_kv=4,
            d_ff=32,
            num_layers=2,
            num_decoder_layers=2,
            num_sparse_encoder_layers=1,
            num_sparse_decoder_layers=1,
            num_heads=4,
            num_experts=num_experts,
            expert_capacity=64,
            dropout_rate=0.0,
            router_jitter_noise=0.0,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    if family == "olmoe":
        return tf.OlmoeConfig(**common, intermediate_size=32, num_experts=num_experts, num_experts_per_tok=top_k, **ids)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **common,
            intermediate_size=32,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=16,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            **ids,
        )
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **common,
            head_dim=4,
            intermediate_size=32,
            moe_intermediate_size=24,
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            norm_topk_prob=True,
            **ids,
        )
    if family == "mixtral":
        return tf.MixtralConfig(
            **common, intermediate_size=32, num_local_experts=num_experts, num_experts_per_tok=top_k, **ids
        )
    raise ValueError(family)


def hf_model(family: str, seed: int = 0, **kw):
    """A random transformers model of the family (eval mode), weights drawn with `seed`."""
    import transformers as tf

    cls = {
        "switch": tf.SwitchTransformersForConditionalGeneration,
        "olmoe": tf.OlmoeForCausalLM,
        "qwen2_moe": tf.Qwen2MoeForCausalLM,
        "qwen3_moe": tf.Qwen3MoeForCausalLM,
        "mixtral": tf.MixtralForCausalLM,
    }[family]
    torch.manual_seed(seed)
    model = cls(hf_config(family, **kw))
    with torch.no_grad():  # fused experts and routers start as torch.empty / zeros: give every tensor values
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "norm" in name or "layer_norm" in name:
                continue
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def tokenizer():
    """A WordLevel PreTrainedTokenizerFast over WORDS with <pad>=0, </s>=1, <s>=2, <unk>=3 (lower-cases input)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )


def save_folder(family: str, path, seed: int = 0, **kw):
    """A transformers folder (model + tokenizer) written with save_pretrained; returns the path."""
    model = hf_model(family, seed, **kw)
    model.save_pretrained(str(path))
    tokenizer().save_pretrained(str(path))
    return path


def batches(n: int = 3, b: int = 4, t: int = 12, seed: int = 0):
    """(idx [B, T], mask [B, T]) calibration batches with ragged right padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(4, VOCAB, (b, t), generator=g)
        lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
        mask = torch.arange(t)[None, :] < lengths[:, None]
        out.append((idx * mask, mask))
    return out
