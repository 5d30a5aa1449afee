"""Recipes: YAML into typed dataclasses, validated overrides, and the paper's Table 1 numbers."""

from pathlib import Path

import pytest

from parameternet.errors import ParameterNetError
from parameternet.train.config import TrainConfig, apply_overrides, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_overrides_are_typed():
    cfg = apply_overrides(
        TrainConfig(),
        ["optim.lr=5e-4", "batch_size=64", "ema=0.999", "ema=null", "progress=false", "data.mean=[0.5]",
         "aug.scale=0.5,1", "model_kwargs.num_experts=8", "data.train=folder:/x:y/train"],
    )  # fmt: skip
    assert cfg.optim.lr == 5e-4 and cfg.batch_size == 64 and cfg.ema is None and cfg.progress is False
    assert cfg.data.mean == [0.5] and cfg.aug.scale == [0.5, 1.0] and cfg.model_kwargs == {"num_experts": 8}
    assert cfg.data.train == "folder:/x:y/train"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown recipe key 'optim.lrr' in the overrides; did you mean 'optim.lr'?"),
        ("batchsize=4", "did you mean 'batch_size'?"),
        ("warmup_epochs=3", "did you mean 'schedule.warmup_epochs'?"),
        ("batch_size=abc", "batch_size='abc' has the wrong type; it must be an integer"),
        ("optim.lr=fast", "it must be a number"),
        ("progress=maybe", "it must be true or false"),
        ("optim=adamw", "names a section"),
        ("lr", "is not key=value"),
        ("=5", "override '=5' is not key=value"),
        ("data.train=imagenet:train", "unknown source"),
        ("amp=fp8", "amp='fp8' is invalid"),
        ("eval_batch_size=0", "eval_batch_size=0 is invalid"),
        ("eval_every_epochs=-1", "eval_every_epochs=-1 is invalid"),
        ("eval_every_steps=-1", "eval_every_steps=-1 is invalid"),
        ("data.num_workers=-1", "data.num_workers=-1 is invalid"),
        ("aug.hflip=2", "aug.hflip=2.0 is invalid; it must be a probability in [0, 1]"),
        ("aug.label_smoothing=1", "aug.label_smoothing=1.0 is invalid"),
        ("schedule.warmup_steps=-1", "schedule.warmup_steps=-1 is invalid"),
    ],
)
def test_bad_overrides_say_one_thing(override, message):
    with pytest.raises(ParameterNetError) as e:
        load_config(CONFIGS / "smoke.yaml", [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_yaml_key_names_the_file_and_the_nearest_key(tmp_path):
    (tmp_path / "r.yaml").write_text("optim:\n  weight_decy: 0.1\n")
    with pytest.raises(ParameterNetError, match=r"'optim.weight_decy' in .*r.yaml; did you mean 'optim.weight_decay'"):
        load_config(tmp_path / "r.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ParameterNetError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ParameterNetError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("lm-")))
def test_every_shipped_vision_recipe_loads(name):  # lm-*.yaml are language-model recipes, loaded by lm train
    load_config(CONFIGS / name)


def test_paper_recipes_follow_table_1():
    rows = {  # epochs, batch, lr, layer decay, warmup epochs, weight decay, label smoothing, erasing, EMA
        "in1k.yaml": (300, 1024, 1e-3, None, 20, 0.05, 0.1, 0.25, 0.9999),
        "in22k-pretrain.yaml": (90, 4096, 4e-3, None, 5, 0.05, 0.1, 0.25, 0.9999),
        "in1k-finetune.yaml": (30, 512, 5e-4, 0.5, 0, 1e-8, 0.1, 0.0, None),
    }
    for name, want in rows.items():
        c = load_config(CONFIGS / name)
        got = (c.epochs, c.batch_size, c.optim.lr, c.optim.layer_decay, c.schedule.warmup_epochs,
               c.optim.weight_decay, c.aug.label_smoothing, c.aug.random_erasing, c.ema)  # fmt: skip
        assert got == want, name
        assert c.optim.name == "adamw" and c.schedule.name == "cosine" and c.aug.randaugment, name


def test_router_param_groups_scale_the_routers_lr_and_weight_decay():
    import timm
    import torch
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    import parameternet.models  # noqa: F401
    from parameternet.errors import ParameterNetError
    from parameternet.train.image_build import router_param_groups

    model = timm.create_model("parameternet_mini", width=0.25, head_chs=64)
    groups = router_param_groups(model, 5e-4, router_lr_scale=10.0, router_weight_decay=0.0)
    routers = {id(p) for n, p in model.named_parameters() if ".router." in n}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for g in groups:
        is_router = {id(p) in routers for p in g["params"]}
        assert len(is_router) == 1
        if is_router.pop():
            assert g["lr_scale"] == 10.0 and g["weight_decay"] == 0.0
        else:
            assert g["lr_scale"] == 1.0 and g["weight_decay"] in (0.0, 5e-4)
            assert g["weight_decay"] == 0.0 or all(p.ndim > 1 for p in g["params"])
    opt = create_optimizer_v2(model, opt="sgd", lr=0.1, param_group_fn=lambda m: groups)
    sched, _ = create_scheduler_v2(
        opt, sched="cosine", num_epochs=10, warmup_epochs=0, step_on_epochs=False, updates_per_epoch=1
    )
    sched.step_update(0)
    assert sorted({round(g["lr"], 6) for g in opt.param_groups}) == [0.1, 1.0]
    with pytest.raises(ParameterNetError, match="router_lr_scale=0"):
        router_param_groups(model, 5e-4, router_lr_scale=0)
    assert torch.is_tensor(groups[0]["params"][0])
