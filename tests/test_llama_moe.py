"""The top-k MoE projection against a per-token loop, and the ParameterNet LLaMA as a transformers model."""

import math

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from parameternet.errors import ParameterNetError
from parameternet.layers import moe as moe_module
from parameternet.layers.moe import TopKMoELinear, load_balancing_loss, route, router_z_loss
from parameternet.models.llama_moe import (
    ParameterNetLlamaConfig,
    ParameterNetLlamaForCausalLM,
    ParameterNetLlamaModel,
    llama_1b_config,
    router_losses,
)

TINY = dict(
    vocab_size=101,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)


def tiny_config(**overrides) -> ParameterNetLlamaConfig:
    return ParameterNetLlamaConfig(**{**TINY, "num_experts": 4, **overrides})


def tiny_model(seed: int = 0, **overrides) -> ParameterNetLlamaForCausalLM:
    torch.manual_seed(seed)
    return ParameterNetLlamaForCausalLM(tiny_config(**overrides))


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))


# --- the layer -----------------------------------------------------------------------------------------------


def reference_moe(layer: TopKMoELinear, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax over the router logits, the top-k experts by logit, each output scaled by its
    probability; with a capacity, first choices before second choices, earlier tokens first."""
    flat = x.reshape(-1, layer.in_features)
    n, k, m = flat.shape[0], layer.top_k, layer.num_experts
    capacity = math.inf if layer.capacity_factor is None else math.ceil(layer.capacity_factor * n * k / m)
    used = [0] * m
    rows = [torch.zeros(layer.out_features) for _ in range(n)]
    for choice in range(k):
        for t in range(n):
            logits = layer.router.weight @ flat[t]
            probs = torch.softmax(logits, dim=-1)
            e = int(logits.topk(k).indices[choice]) if k > 1 else int(logits.argmax())
            if used[e] >= capacity:
                continue
            used[e] += 1
            b = 0 if layer.bias is None else layer.bias[e]
            rows[t] = rows[t] + probs[e] * (layer.weight[e] @ flat[t] + b)
    return torch.stack(rows).view(*x.shape[:-1], layer.out_features)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped_mm", "loop"])
@pytest.mark.parametrize(
    "top_k,capacity_factor,bias", [(1, None, False), (1, None, True), (2, None, True), (1, 0.5, True), (2, 0.6, False)]
)
def test_dispatch_matches_per_token_reference(monkeypatch, grouped, top_k, capacity_factor, bias):
    calls = []
    if grouped:  # the path must really run: torch >= 2.8 has grouped_mm (constraints.txt pins a newer one)
        real = torch.nn.functional.grouped_mm
        monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    else:
        monkeypatch.setattr(moe_module, "_grouped_mm_ok", lambda x, w: False)
    torch.manual_seed(0)
    layer = TopKMoELinear(8, 12, bias=bias, num_experts=4, top_k=top_k, capacity_factor=capacity_factor)
    x = torch.randn(3, 7, 8, requires_grad=True)
    grad_out = torch.randn(3, 7, 12)
    params = [x, *layer.parameters()]

    y = layer(x)
    grads = torch.autograd.grad(y, params, grad_out)
    y_ref = reference_moe(layer, x)
    grads_ref = torch.autograd.grad(y_ref, params, grad_out)

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    assert y.shape == (3, 7, 12)
    assert bool(calls) == grouped, "grouped_mm ran" if calls else "grouped_mm did not run"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("top_k,capacity_factor", [(1, None), (1, 0.5), (2, 0.6)])
def test_dispatch_compiles_whole_and_reads_nothing_on_the_host(monkeypatch, dtype, top_k, capacity_factor):
    """fullgraph=True fails on any host read (.tolist(), int(tensor), a data-dependent shape): the dispatch compiles
    as one graph in fp32 (every expert, gathered) and bf16 (grouped_mm), forward and backward, and matches eager."""
    for name in ("bincount", "nonzero"):  # host reads on CUDA: the dispatch must not call them
        monkeypatch.setattr(torch, name, lambda *a, _name=name, **k: pytest.fail(f"the dispatch called torch.{_name}"))
    torch.manual_seed(0)
    layer = TopKMoELinear(16, 32, bias=True, num_experts=4, top_k=top_k, capacity_factor=capacity_factor).to(dtype)
    x = torch.randn(2, 9, 16, dtype=dtype)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_eager, y_comp = layer(x1), compiled(x2)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y_comp, y_eager, **tol)
    g = torch.randn_like(y_eager)
    torch.testing.assert_close(torch.autograd.grad(y_comp, x2, g)[0], torch.autograd.grad(y_eager, x1, g)[0], **tol)


def test_capacity_drops_tokens_and_none_drops_nothing():
    torch.manual_seed(0)
    layer = TopKMoELinear(8, 8, num_experts=4, capacity_factor=0.25)  # one token per expert at most
    x = torch.randn(16, 8)
    zero_rows = (layer(x).abs().sum(-1) == 0).sum().item()
    assert zero_rows >= 16 - 4
    layer.capacity_factor = None
    assert (layer(x).abs().sum(-1) > 0).all()


def test_from_linear_is_exact_and_spreads_tokens():
    torch.manual_seed(0)
    dense = torch.nn.Linear(16, 24, bias=True)
    x = torch.randn(400, 16) * 4
    for num_experts, top_k in [(4, 1), (8, 1), (3, 1), (4, 2)]:
        layer = TopKMoELinear.from_linear(dense, num_experts=num_experts, top_k=top_k)
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-6)
        chosen = route(layer.router(x), top_k)[2].flatten()
        assert torch.bincount(chosen, minlength=num_experts).min() > 0  # every expert already gets tokens


def test_load_balancing_and_z_loss_formulas():
    n, m = 64, 4
    uniform = torch.zeros(n, m)  # every expert equally likely; argmax ties go to expert 0
    assert load_balancing_loss(uniform).item() == pytest.approx(1.0)  # f = (1,0,0,0), P = 1/4 -> 4 * 1/4
    collapsed = torch.zeros(n, m)
    collapsed[:, 2] = 100.0
    assert load_balancing_loss(collapsed).item() == pytest.approx(m, rel=1e-4)
    balanced = torch.full((n, m), -100.0)
    balanced[torch.arange(n), torch.arange(n) % m] = 100.0
    assert load_balancing_loss(balanced).item() == pytest.approx(1.0, rel=1e-4)

    logits = torch.randn(n, m)
    probs = torch.softmax(logits, -1)
    f = torch.bincount(logits.argmax(-1), minlength=m).float() / n
    assert load_balancing_loss(logits).item() == pytest.approx((m**2 * (f * probs.mean(0)).mean()).item(), rel=1e-5)
    assert router_z_loss(logits).item() == pytest.approx(torch.logsumexp(logits, -1).square().mean().item())

    mask = torch.ones(n)
    mask[::3] = 0
    keep = mask.bool()
    assert load_balancing_loss(logits, 1, mask).item() == pytest.approx(load_balancing_loss(logits[keep]).item())
    assert router_z_loss(logits, mask).item() == pytest.approx(router_z_loss(logits[keep]).item())


def test_layer_bad_input():
    with pytest.raises(ParameterNetError, match="top_k"):
        TopKMoELinear(8, 8, num_experts=2, top_k=3)
    with pytest.raises(ParameterNetError, match="num_experts"):
        TopKMoELinear(8, 8, num_experts=0)
    with pytest.raises(ParameterNetError, match="capacity_factor"):
        TopKMoELinear(8, 8, num_experts=2, capacity_factor=0)
    with pytest.raises(ParameterNetError, match=r"\(\.\.\., 8\)"):
        TopKMoELinear(8, 8, num_experts=2)(torch.randn(3, 5))


# --- the transformers model ---------------------------------------------------------------------------------


def test_auto_classes_and_save_load_round_trip(tmp_path, ids):
    model = tiny_model(moe_projections=["up_proj", "down_proj"]).eval()
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "parameternet_llama"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is ParameterNetLlamaForCausalLM
    assert loaded.config.moe_projections == ["up_proj", "down_proj"] and loaded.config.num_experts == 4
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is ParameterNetLlamaModel
    assert type(AutoModelForCausalLM.from_config(tiny_config())) is ParameterNetLlamaForCausalLM


def test_a_saved_model_loads_in_a_program_that_never_imported_parameternet(tmp_path, ids):
    import subprocess
    import sys

    model = tiny_model(moe_projections=["down_proj"]).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "parameternet_llama.py").is_file()
    torch.save(model(ids).logits, tmp_path / "expected.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
except ValueError as e:
    assert "trust_remote_code" in str(e), e
else:
    raise SystemExit("loaded custom code without trust_remote_code")
assert "parameternet" not in sys.modules
model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
assert type(model).__name__ == "ParameterNetLlamaForCausalLM", type(model)
ids = torch.tensor({ids.tolist()})
torch.testing.assert_close(model(ids).logits, torch.load({str(tmp_path / "expected.pt")!r}), rtol=1e-5, atol=1e-6)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_generate_with_and_without_cache_agree(ids):
    model = tiny_model().eval()
    prompt = ids[:, :4]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (2, 10)
    torch.testing.assert_close(cached, uncached)


def test_loss_includes_weighted_router_losses(ids):
    model = tiny_model(router_aux_loss_coef=0.0, router_z_loss_coef=0.0).eval()
    plain = model(ids, labels=ids)
    assert plain.aux_loss is not None and plain.z_loss is not None and plain.router_logits is None
    assert plain.aux_loss.item() >= 1.0 - 1e-6  # Switch's loss is 1 at best
    model.config.router_aux_loss_coef, model.config.router_z_loss_coef = 0.5, 0.25
    weighted = model(ids, labels=ids)
    expected = plain.loss + 0.5 * plain.aux_loss + 0.25 * plain.z_loss
    torch.testing.assert_close(weighted.loss, expected)
    weighted.loss.backward()
    assert model.model.layers[0].mlp.down_proj.router.weight.grad.abs().sum() > 0


def test_router_logits_only_when_asked(ids):
    model = tiny_model(moe_projections=["gate_proj", "down_proj"]).eval()
    out = model(ids, output_router_logits=True)
    assert len(out.router_logits) == 2 * 2  # two layers, two converted projections each
    assert all(r.shape == (ids.numel(), 4) for r in out.router_logits)
    assert out.aux_loss is not None
    quiet = model(ids)
    assert quiet.router_logits is None and quiet.aux_loss is None and quiet.loss is None
    model.train()
    assert model(ids).aux_loss is not None  # training collects them for the aux loss


def test_router_losses_leave_padding_out():
    logits = (torch.randn(6, 4), torch.randn(6, 4))
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    aux, z = router_losses(logits, 1, mask)
    keep = mask.flatten().bool()
    assert aux.item() == pytest.approx(sum(load_balancing_loss(r[keep]) for r in logits).item() / 2)
    assert z.item() == pytest.approx(sum(router_z_loss(r[keep]) for r in logits).item() / 2)


def test_gradient_checkpointing_keeps_router_gradient(ids):
    model = tiny_model().train()
    model.activation_checkpointing_enable()  # non-reentrant: the captured router logits keep their graph
    model(ids, labels=ids).aux_loss.backward()
    assert model.model.layers[1].mlp.down_proj.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("projection", ["gate_proj", "up_proj", "down_proj"])
@pytest.mark.parametrize("num_experts", [4, 8])
def test_from_dense_reproduces_dense_logits(projection, num_experts, ids):
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    model = ParameterNetLlamaForCausalLM.from_dense(dense, num_experts=num_experts, moe_projections=[projection])
    assert model.config.moe_projections == [projection] and not model.training
    ref = dense(ids).logits
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    routed = torch.cat([r.argmax(-1) for r in model(ids, output_router_logits=True).router_logits])
    assert torch.unique(routed).numel() > 1  # tokens already go to different experts: symmetry is broken

    # One training step later the experts differ: they were fed different tokens.
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(ids, labels=ids).loss.backward()
    opt.step()
    experts = model.model.layers[0].mlp.get_submodule(projection).weight
    assert not torch.equal(experts[0], experts[1])


def test_from_dense_upcycles_the_model_inside_torch_compile(ids):
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    model = ParameterNetLlamaForCausalLM.from_dense(torch.compile(dense, backend="eager"), num_experts=4)
    ref = dense(ids).logits
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_from_dense_takes_a_loaded_llama_not_a_path(tmp_path):
    with pytest.raises(ParameterNetError, match=r"from_dense takes a loaded model, not str 'some/path'; load it first"):
        ParameterNetLlamaForCausalLM.from_dense("some/path", num_experts=4)
    with pytest.raises(ParameterNetError, match="takes a loaded model, not PosixPath"):
        ParameterNetLlamaForCausalLM.from_dense(tmp_path, num_experts=4)
    with pytest.raises(ParameterNetError, match="needs a LLaMA causal LM, not a Linear"):
        linear = torch.nn.Linear(2, 2)
        linear.config = object()
        ParameterNetLlamaForCausalLM.from_dense(linear, num_experts=4)


def test_from_dense_rejects_a_converted_model():
    with pytest.raises(ParameterNetError, match="already has experts"):
        ParameterNetLlamaForCausalLM.from_dense(tiny_model(), num_experts=4)


@pytest.mark.parametrize("projection", ["gate_proj", "up_proj", "down_proj"])
def test_llama_1b_parameter_counts_match_the_paper(projection):
    """Table 7 (docs/lm.md, "Parameters at the paper's size"): 4 experts 1.5409B, 8 experts 2.3467B with expert
    biases."""
    with torch.device("meta"):
        dense = ParameterNetLlamaForCausalLM(llama_1b_config(moe_projections=[])).num_parameters()
        assert dense == pytest.approx(0.9366e9, rel=5e-3)
        for num_experts, paper in [(4, 1.5409e9), (8, 2.3467e9)]:
            config = llama_1b_config(num_experts=num_experts, moe_projections=[projection])
            assert ParameterNetLlamaForCausalLM(config).num_parameters() == pytest.approx(paper, rel=5e-3)
            # With a bias on every expert (the release's nn.Linear experts) the count is the paper's to the digit.
            config = llama_1b_config(num_experts=num_experts, moe_projections=[projection], expert_bias=True)
            assert ParameterNetLlamaForCausalLM(config).num_parameters() == pytest.approx(paper, abs=0.5e5)


def test_config_bad_input():
    with pytest.raises(ParameterNetError, match="'mlp_proj'.*gate_proj, up_proj, down_proj"):
        tiny_config(moe_projections=["mlp_proj"])
    with pytest.raises(ParameterNetError, match="num_experts_per_tok=3"):
        tiny_config(num_experts=2, num_experts_per_tok=3)
    with pytest.raises(ParameterNetError, match="capacity_factor"):
        tiny_config(capacity_factor=-1.0)
    assert tiny_config(moe_projections="up_proj").moe_projections == ["up_proj"]
    assert tiny_config(moe_projections=["down_proj", "gate_proj"]).moe_projections == ["gate_proj", "down_proj"]


# --- the sequence classifier (Table 7's fine-tuned SST-2 column) ---------------------------------------------


def test_sequence_classifier_auto_class_round_trip_and_router_loss(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from parameternet.models.llama_moe import ParameterNetLlamaForSequenceClassification

    torch.manual_seed(0)
    config = tiny_config(num_labels=3, pad_token_id=0, router_aux_loss_coef=0.5)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    assert type(model) is ParameterNetLlamaForSequenceClassification
    assert type(model.model) is ParameterNetLlamaModel and model.score.out_features == 3
    ids = torch.randint(1, TINY["vocab_size"], (3, 7), generator=torch.Generator().manual_seed(2))
    ids[0, 5:] = 0  # right padding: the first sequence ends at position 4
    labels = torch.tensor([0, 2, 1])
    out = model(ids, labels=labels)
    assert out.logits.shape == (3, 3) and out.aux_loss is not None
    # the logits are the head on the last non-padding token; the loss adds the weighted aux loss
    hidden = model.model(ids).last_hidden_state
    torch.testing.assert_close(out.logits[0], model.score(hidden[0, 4]))
    torch.testing.assert_close(out.logits[1], model.score(hidden[1, -1]))
    ce = torch.nn.functional.cross_entropy(out.logits, labels)
    torch.testing.assert_close(out.loss, ce + 0.5 * out.aux_loss)
    out.loss.backward()
    assert model.model.layers[0].mlp.down_proj.router.weight.grad.abs().sum() > 0

    model.save_pretrained(tmp_path / "cls")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls").eval()
    assert type(loaded) is ParameterNetLlamaForSequenceClassification and loaded.config.num_labels == 3
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_sequence_classifier_from_a_causal_lm_keeps_the_body(tmp_path):
    from transformers import AutoModelForSequenceClassification

    lm = tiny_model(pad_token_id=0).eval()
    lm.save_pretrained(tmp_path / "lm")
    cls = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=2).eval()
    ids = torch.randint(1, TINY["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(cls.model(ids).last_hidden_state, lm.model(ids).last_hidden_state)
    assert cls(ids).logits.shape == (2, 2)
    dense = tiny_model(moe_projections=[], pad_token_id=0)
    dense.save_pretrained(tmp_path / "dense")
    quiet = AutoModelForSequenceClassification.from_pretrained(tmp_path / "dense", num_labels=2)
    assert quiet(ids, labels=torch.tensor([0, 1])).aux_loss is None  # no experts, no router loss


def test_routers_decide_in_float32_under_autocast():
    """Selective precision: under bf16 autocast every router's logits are the float32 ones, so no token changes
    expert and no sample changes coefficients for the autocast alone."""
    from parameternet.layers import DynamicConv2d, DynamicLinear

    torch.manual_seed(0)
    moe = TopKMoELinear(64, 32, num_experts=8)
    x = torch.randn(512, 64)
    with torch.autocast("cpu", torch.bfloat16):
        logits_bf16 = moe.router(x)
    assert logits_bf16.dtype == torch.float32
    torch.testing.assert_close(logits_bf16, moe.router(x), rtol=0, atol=0)
    conv, lin = DynamicConv2d(16, 16, 3, padding=1), DynamicLinear(16, 8, router="mlp-softmax")
    xc, xl = torch.randn(4, 16, 8, 8), torch.randn(4, 5, 16)
    captured = {}
    conv.router.register_forward_hook(lambda m, a, out: captured.setdefault("conv", out))  # the module path
    with torch.autocast("cpu", torch.bfloat16):
        from parameternet.layers.kernels import route_mean

        fast = route_mean(conv.router, xc, (2, 3))
        lin(xl)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, conv.router(xc.mean((2, 3))), rtol=1e-6, atol=1e-7)
    with torch.autocast("cpu", torch.bfloat16):
        out = lin.router(xl.mean(1))
    torch.testing.assert_close(out, lin.router(xl.mean(1)), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_from_linear_breaks_symmetry_in_every_dtype(dtype):
    """A float16 router cannot hold 1e-12: the noise is raised to what the dtype keeps, tokens still spread over
    the experts, and the upcycled layer still computes the dense one to the dtype's rounding."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 48).to(dtype)
    layer = TopKMoELinear.from_linear(dense, num_experts=4)
    assert (layer.router.weight != 0).float().mean() > 0.9  # a few draws near zero may round to it
    x = torch.randn(256, 64).to(dtype)
    chosen = layer.router(x).argmax(-1)
    assert chosen.unique().numel() == 4
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(layer(x).float(), dense(x).float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("top_k", [1, 2])
def test_padding_never_takes_capacity_from_real_tokens(top_k):
    """With a capacity, masked pads anywhere in the batch leave every real token's output as it is without them:
    they neither count towards the capacity nor take a slot (the dispatch and the transform path alike)."""
    torch.manual_seed(0)
    layer = TopKMoELinear(8, 12, bias=True, num_experts=4, top_k=top_k, capacity_factor=0.5)
    with torch.no_grad():
        layer.router.weight.mul_(5.0)  # uneven routing: capacity binds
    real = torch.randn(10, 8)
    mixed = torch.cat([torch.randn(3, 8), real[:6], torch.randn(2, 8), real[6:]])
    mask = torch.tensor([0] * 3 + [1] * 6 + [0] * 2 + [1] * 4)
    alone = layer(real)
    got = layer(mixed, token_mask=mask)[mask.bool()]
    torch.testing.assert_close(got, alone)
    assert not torch.allclose(layer(mixed)[mask.bool()], alone)  # unmasked, the pads did take slots
    dense_path = torch.func.vmap(lambda t: layer(t, token_mask=mask), randomness="same")(mixed.unsqueeze(0))[0]
    torch.testing.assert_close(dense_path[mask.bool()], alone)
    with pytest.raises(ParameterNetError, match="the token mask has 5 entries"):
        layer(mixed, token_mask=torch.ones(5))


def test_llama_moe_right_padding_leaves_real_tokens_alone_with_a_capacity(ids):
    model = tiny_model(capacity_factor=0.5).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TopKMoELinear):
                m.router.weight.normal_(0.0, 1.0)  # uneven routing: capacity binds
        short = ids[:1, :6]
        alone = model(short, attention_mask=torch.ones(1, 6, dtype=torch.long)).logits
        padded = torch.cat([short, ids[1:, :5]], 1)
        mask = torch.tensor([[1] * 6 + [0] * 5])
        got = model(padded, attention_mask=mask).logits[:, :6]
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
    assert all(m.token_mask is None for m in model.modules() if isinstance(m, TopKMoELinear))  # cleared after
