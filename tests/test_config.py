import pytest

from smoe_lab.config import ModelConfig, PretrainParams, TrainConfig, parse_overrides


def test_presets_match_paper_shapes():
    c = ModelConfig.preset("gpt2-354m", num_experts=32)
    assert (c.d_model, c.d_ff, c.n_head, c.n_layer, c.vocab_size) == (1024, 4096, 16, 24, 50257)
    assert (c.capacity_factor_train, c.capacity_factor_eval, c.min_capacity, c.drop_tokens, c.aux_loss_coef) == (
        1.2,
        1.0,
        4,
        True,
        0.01,
    )
    assert c.moe_block_indices == list(range(0, 24, 2)) and c.experts_per_layer == [32] * 12
    assert ModelConfig.preset("gpt2-124m").d_model == 768


@pytest.mark.parametrize(
    "field,value",
    [
        ("n_layer", 0),
        ("d_model", 130),  # not divisible by n_head=4
        ("capacity_factor_train", 0.0),
        ("capacity_factor_eval", float("nan")),
        ("min_capacity", -1),
        ("num_experts", 0),
        ("num_experts", [8, 8, 8]),  # tiny has 2 MoE layers
        ("aux_loss_coef", -0.1),
        ("dropout", 1.5),
        ("drop_tokens", "yes"),
    ],
)
def test_bad_model_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig.preset("tiny", **{field: value})


@pytest.mark.parametrize("field,value", [("lr", 0.0), ("batch_size", 10), ("device", "tpu"), ("beta2", 1.5)])
def test_bad_train_values_name_the_field(field, value):
    kw = {field: value}
    if field == "batch_size":
        kw["micro_batch_size"] = 4
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kw)


def test_unknown_keys_and_presets_fail_loudly():
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({"n_layers": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("gpt5")
    with pytest.raises(ValueError, match="lr"):
        PretrainParams(train={"lr": -1})


def test_overrides_parse_nested_yaml_values():
    assert parse_overrides(["train.lr=1e-3", "num_experts=[4, 2]", "resume=true"]) == {
        "train": {"lr": 1e-3},
        "num_experts": [4, 2],
        "resume": True,
    }


def test_per_layer_expert_lists_and_labels():
    c = ModelConfig.preset("tiny", num_experts=[8, 4])
    assert c.is_moe and c.experts_per_layer == [8, 4] and c.label() == "[8,4]e"
    assert ModelConfig.preset("tiny", num_experts=1).label() == "dense"
    assert ModelConfig.preset("tiny", num_experts=8).label() == "8e"


def test_router_options_validate_and_default_to_the_paper():
    m, t = ModelConfig(), TrainConfig()
    assert (m.router_init_std, m.router_z_loss_coef, m.router_jitter) == (0.02, 0.0, 0.0)
    assert (t.router_lr_mult, t.router_weight_decay) == (1.0, None)
    for kw, field in [
        ({"router_init_std": 0.0}, "router_init_std"),
        ({"router_z_loss_coef": -1e-3}, "router_z_loss_coef"),
        ({"router_jitter": 1.0}, "router_jitter"),
        ({"router_jitter": 0.01, "moe_impl": "deepspeed"}, "router_jitter.*native-only"),
        ({"router_z_loss_coef": 1e-3, "moe_impl": "deepspeed"}, "router_z_loss_coef.*native-only"),
    ]:
        with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
            ModelConfig(**kw)
    for kw in ({"router_lr_mult": 0.0}, {"router_lr_mult": "10"}, {"router_weight_decay": -0.1}):
        with pytest.raises(ValueError, match=f"TrainConfig.{next(iter(kw))}"):
            TrainConfig(**kw)


def test_router_recipe_of_the_pretraining_notebook():
    from smoe_lab.notebook_params import PretrainNotebook

    p = PretrainNotebook(router_recipe={"router_lr_mult": 30.0, "router_weight_decay": 0.0, "router_jitter": 0.01})
    assert p.model_config(8).router_jitter == 0.01 and p.model_config(8).num_experts == 8
    assert (p.train_config().router_lr_mult, p.train_config().router_weight_decay) == (30.0, 0.0)
    with pytest.raises(ValueError, match="router_recipe.*unknown option.*router_lr"):
        PretrainNotebook(router_recipe={"router_lr": 30.0})
    with pytest.raises(ValueError, match="TrainConfig.router_lr_mult"):
        PretrainNotebook(router_recipe={"router_lr_mult": -1.0})
