"""parameternet.io: one safetensors metadata schema, written by save / convert / train; foreign files read as plain,
other parameternet schemas refused."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

import parameternet
from parameternet import ParameterNetError, parameterize
from parameternet.io import FORMAT, load_source_model, load_weights, read_metadata, read_recipe, save_weights


@pytest.fixture(scope="module")
def converted():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5).eval()
    return parameterize(model, 2, example_input=(1, 3, 32, 32), count_macs=False).eval()


def _tensors(model):
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def _recipe(model) -> dict:
    report = model.parameterize_report
    return dict(
        model="resnet10t",
        model_kwargs={"num_classes": 5, "in_chans": 3},
        parameterize=[*report.history, report.recipe()],
    )


def _same_outputs(a, b):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x))


def test_save_writes_the_one_schema(converted, tmp_path):
    path = parameternet.save(converted, tmp_path / "m.safetensors")
    meta = read_metadata(path)
    assert meta["format"] == FORMAT and "parameternet" not in meta
    assert meta["kind"] == "convert" and meta["model"] == "resnet10t"
    assert meta["num_classes"] == 5 and meta["in_chans"] == 3
    assert meta["model_kwargs"] == {"num_classes": 5, "in_chans": 3}
    assert meta["parameterize"] == [converted.parameterize_report.recipe()]
    assert meta["config"] is None and meta["img_size"] is None
    assert read_recipe(path) == _recipe(converted)
    _same_outputs(parameternet.load(path), converted)


def _my_net(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4),
    )  # fmt: skip


def test_any_module_saves_and_loads_into_the_model_it_was_built_as(tmp_path):
    mine = parameterize(_my_net(), 3, init="random", example_input=(1, 3, 16, 16), count_macs=False).eval()
    path = parameternet.save(mine, tmp_path / "mine.safetensors")  # no model_name: timm did not build it
    meta = read_metadata(path)
    assert meta["model"] is None and meta["parameterize"] == [mine.parameterize_report.recipe()]
    with pytest.raises(ParameterNetError, match=r"does not name its model; .*parameternet.load\(path, model=\.\.\.\)"):
        parameternet.load(path)
    _same_outputs(parameternet.load(path, model=_my_net(1)), mine)  # the conversion is redone on the dense model
    again = parameterize(_my_net(1), 3, init="random", example_input=(1, 3, 16, 16), count_macs=False)
    _same_outputs(parameternet.load(path, model=again), mine)  # ... or not, when it was already done
    other = parameterize(_my_net(), 2, example_input=(1, 3, 16, 16), count_macs=False)
    with pytest.raises(ParameterNetError, match="was converted with other steps than"):
        parameternet.load(path, model=other)
    dense = parameternet.save(_my_net(), tmp_path / "dense.safetensors")  # never converted: loaded as it is
    _same_outputs(parameternet.load(dense, model=_my_net(1)), _my_net())


def test_foreign_files_read_as_plain(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    meta = read_metadata(path)
    assert meta["kind"] == "plain" and meta["model"] is None and meta["parameterize"] == []
    assert read_recipe(path) is None
    with pytest.raises(ParameterNetError, match="does not name its model"):
        parameternet.load(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ParameterNetError, match="is not a readable safetensors checkpoint"):
        read_metadata(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("fmt", ["parameternet-checkpoint-1"])
def test_another_parameternet_schema_is_refused(converted, tmp_path, fmt):
    """A file of another parameternet schema (a newer version's, or one this 0.1.0 never published) is refused in one
    sentence rather than read as something else."""
    path = tmp_path / "other.safetensors"
    save_file(_tensors(converted), str(path), metadata={"format": fmt, "model": json.dumps("resnet10t")})
    with pytest.raises(ParameterNetError, match=f"has metadata format '{fmt}', which this version of parameternet "
                                                "does not read"):  # fmt: skip
        read_metadata(path)


def test_metadata_that_is_not_json_is_refused(tmp_path):
    with pytest.raises(ParameterNetError, match="must be JSON values"):
        save_weights(tmp_path / "x.safetensors", {"w": torch.zeros(1)}, {"model_kwargs": {"f": object()}})


def test_save_and_load_refuse_what_is_not_a_module(tmp_path):
    with pytest.raises(ParameterNetError, match="save\\(\\) takes an nn.Module, got dict"):
        parameternet.save({"a": 1}, tmp_path / "d.safetensors")
    with pytest.raises(ParameterNetError, match="got the class Linear; pass an instance, Linear\\(\\)"):
        parameternet.load(tmp_path / "d.safetensors", model=torch.nn.Linear)
    with pytest.raises(ParameterNetError, match="got int; pass the nn.Module as you built it"):
        parameternet.load(tmp_path / "d.safetensors", model=3)


# ---------------------------------------------------------------------------------------------------------------
# Wrapped models: torch.compile, DDP / DataParallel, FSDP2


def _exactly(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_compiled_model_saves_under_its_own_names_and_loads_back_exactly(converted, tmp_path):
    compiled = torch.compile(converted, backend="eager")  # never run: only its state dict's names matter
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    path = parameternet.save(compiled, tmp_path / "c.safetensors")
    state, meta = load_weights(path)
    assert state.keys() == converted.state_dict().keys()  # no _orig_mod.
    assert meta["model"] == "resnet10t" and meta["parameterize"] == [converted.parameterize_report.recipe()]
    _exactly(parameternet.load(path), converted)
    # nested wrappers, and a wrapped model passed as model=: the model inside it is loaded and returned
    mine = parameterize(_my_net(), 3, init="random", example_input=(1, 3, 16, 16), count_macs=False).eval()
    path = parameternet.save(torch.compile(torch.nn.DataParallel(mine), backend="eager"), tmp_path / "n.safetensors")
    loaded = parameternet.load(path, model=torch.compile(_my_net(1), backend="eager"))
    assert not isinstance(loaded, torch._dynamo.eval_frame.OptimizedModule)
    _exactly(loaded, mine)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod.", "_orig_mod.module._orig_mod.", "module.module."])
def test_weights_saved_from_a_wrapped_model_load(converted, tmp_path, prefix):
    path = tmp_path / "w.safetensors"
    meta = {"kind": "convert", "model": "resnet10t", "parameterize": [converted.parameterize_report.recipe()]}
    save_weights(path, {prefix + k: v for k, v in converted.state_dict().items()}, {**meta, "num_classes": 5})
    _exactly(parameternet.load(path), converted)
    model, name, _ = load_source_model(str(path))
    assert name == "resnet10t"
    _exactly(model, converted)


def test_a_model_whose_child_is_called_module_keeps_its_names(tmp_path):
    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.module = torch.nn.Linear(3, 2)

    torch.manual_seed(0)
    holder = Holder()
    path = parameternet.save(torch.compile(holder, backend="eager"), tmp_path / "h.safetensors")
    assert set(load_weights(path)[0]) == {"module.weight", "module.bias"}
    _exactly(parameternet.load(path, model=Holder()), holder)
    both = {"fc.weight": torch.zeros(1), "module.fc.weight": torch.zeros(1)}
    with pytest.raises(ParameterNetError, match="holds both 'fc.weight' and 'module.fc.weight'"):
        load_source_model(_torch_file(tmp_path, both), arch="resnet10t")


def _torch_file(tmp_path, state):
    path = tmp_path / "sd.pth"
    torch.save(state, path)
    return str(path)


def test_an_fsdp2_model_saves_whole(tmp_path):
    """fully_shard on a one-process gloo group: save gathers the DTensor shards into plain tensors."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mine = _my_net()
        reference = {k: v.clone() for k, v in mine.state_dict().items()}
        fully_shard(mine, mesh=init_device_mesh("cpu", (1,)))
        assert type(next(iter(mine.state_dict().values()))).__name__ == "DTensor"
        path = parameternet.save(mine, tmp_path / "f.safetensors")
    finally:
        dist.destroy_process_group()
    state, _ = load_weights(path)
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


# ---------------------------------------------------------------------------------------------------------------
# Metadata this version does not know: a newer format, a conversion step it cannot redo


def _convert_cli(path, tmp_path, capsys):
    from parameternet.cli import main

    assert main(["convert", str(path), "--experts", "2", "-o", str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_an_unknown_format_version_is_refused(converted, tmp_path, capsys):
    path = tmp_path / "newer.safetensors"
    parameternet.save(converted, path)
    raw = dict(__import__("safetensors").safe_open(str(path), "pt").metadata())
    save_file(_tensors(converted), str(path), metadata={**raw, "format": json.dumps("parameternet-3")})
    message = (
        r"has metadata format 'parameternet-3', which this version of parameternet does not read .*; use the version"
    )
    with pytest.raises(ParameterNetError, match=message):
        read_metadata(path)
    with pytest.raises(ParameterNetError, match=message):
        parameternet.load(path)
    assert "metadata format 'parameternet-3'" in _convert_cli(path, tmp_path, capsys)


_DROP = object()  # a key the step leaves out


@pytest.mark.parametrize(
    "change, found",
    [
        ({"method": "prune"}, "the method 'prune'; this version knows dynamic, repconv"),
        ({"router": "hash"}, "the router 'hash'"),
        ({"sparsity": 0.5}, "the key 'sparsity'"),
        ({"modules": _DROP}, "no 'modules'"),
        ("lowrank", "'lowrank', not a recipe dict"),
    ],
)
def test_an_unknown_conversion_step_is_refused(converted, tmp_path, capsys, change, found):
    step = converted.parameterize_report.recipe()
    if isinstance(change, dict):
        step = {k: v for k, v in {**step, **change}.items() if v is not _DROP}
    else:
        step = change
    path = tmp_path / "step.safetensors"
    raw = {"format": json.dumps(FORMAT), "kind": json.dumps("convert"), "model": json.dumps("resnet10t")}
    save_file(_tensors(converted), str(path), metadata={**raw, "parameterize": json.dumps([step])})
    message = f"records a conversion step this version of parameternet cannot redo (step 1: {found}"
    with pytest.raises(ParameterNetError) as e:
        parameternet.load(path)
    assert message in str(e.value) and "upgrade parameternet" in str(e.value)
    assert message in _convert_cli(path, tmp_path, capsys)
