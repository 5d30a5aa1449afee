"""parameterize() on sequence models: a model that keeps positions apart (causal attention, a padding mask, a
position-wise network) keeps them apart once converted: its linears route every position on its own (a top-1
mixture of experts, as the paper's language models), its output head stays static."""

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import parameternet
from parameternet.layers import DynamicLinear, TopKMoELinear


def randomize_routers(model: nn.Module, seed: int = 0) -> None:
    """Routers as training leaves them: far from the upcycled start, so a leak between positions would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TopKMoELinear):
                m.router.weight.copy_(torch.randn(m.router.weight.shape, generator=g))
                m.weight.add_(torch.randn(m.weight.shape, generator=g) * m.weight.std())
            elif isinstance(m, DynamicLinear):
                for p in m.router.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def test_causal_lm_routes_per_token_keeps_its_head_and_never_reads_the_future():
    dense = tiny_llama()
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(1))
    model = parameternet.parameterize(copy.deepcopy(dense), 4, example_input={"input_ids": ids}, count_macs=False)
    report = model.parameterize_report
    assert report.static == {"lm_head": "output head: its output is the model's output (the logits)"}
    assert len(report.converted) == 14 and report.token_routed == report.converted
    assert all(isinstance(model.get_submodule(n), TopKMoELinear) for n in report.converted)
    assert "does not depend on later positions" in report.positions
    with torch.no_grad():  # upcycled: the dense function
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
    # a few training steps move the routers; the future still never reaches the past
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(10):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    randomize_routers(model)
    with torch.no_grad():
        later = ids.clone()
        later[:, 7:] = (later[:, 7:] + 3) % 61
        torch.testing.assert_close(model(later).logits[:, :7], model(ids).logits[:, :7], atol=1e-5, rtol=1e-5)
        # cached generation equals the model's own full forward at every generated position
        out = model.generate(
            ids[:, :5],
            attention_mask=torch.ones(2, 5, dtype=torch.long),
            max_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        full = model(out.sequences).logits
        for step, logits in enumerate(out.logits):
            torch.testing.assert_close(logits, full[:, 4 + step], atol=1e-4, rtol=1e-4)


def test_save_and_load_rebuild_the_token_routed_layers(tmp_path):
    ids = torch.randint(0, 61, (1, 8), generator=torch.Generator().manual_seed(1))
    model = parameternet.parameterize(tiny_llama(), 4, example_input={"input_ids": ids}, count_macs=False)
    randomize_routers(model)
    path = tmp_path / "m.safetensors"
    parameternet.save(model, path)
    loaded = parameternet.load(path, model=tiny_llama())
    assert loaded.parameterize_report.token_routed == model.parameterize_report.token_routed
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)  # fmt: skip
    return BertModel(cfg, add_pooling_layer=False).eval()


def test_bert_with_padding_routes_per_token_so_pads_change_no_real_token():
    dense = tiny_bert()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 50, (2, 10), generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    example = {"input_ids": ids, "attention_mask": mask}
    model = parameternet.parameterize(copy.deepcopy(dense), 4, example_input=example, count_macs=False)
    report = model.parameterize_report
    assert report.token_routed == report.converted and len(report.converted) == 12, report.static
    assert "mask 'attention_mask' marks as padding" in report.positions
    randomize_routers(model)
    with torch.no_grad():
        short = model(input_ids=ids[:1, :6], attention_mask=torch.ones(1, 6, dtype=torch.long)).last_hidden_state
        pads = torch.randint(1, 50, (1, 4), generator=g)
        padded = model(input_ids=torch.cat([ids[:1, :6], pads], 1),
                       attention_mask=torch.tensor([[1] * 6 + [0] * 4])).last_hidden_state  # fmt: skip
    torch.testing.assert_close(padded[:, :6], short, atol=1e-5, rtol=1e-5)


def test_transformer_encoder_with_a_key_padding_mask_routes_per_token():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    dense = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 8, 16)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[0, 6:] = True
    model = parameternet.parameterize(copy.deepcopy(dense), 4, example_input={"src": x, "src_key_padding_mask": pad},
                                      count_macs=False)  # fmt: skip
    report = model.parameterize_report
    assert report.token_routed == report.converted and "(True)" in report.positions
    randomize_routers(model)
    model.eval()
    with torch.no_grad():
        alone = model(x[:1, :5], src_key_padding_mask=torch.zeros(1, 5, dtype=torch.bool))
        noise = torch.randn(1, 3, 16)
        pad1 = torch.tensor([[False] * 5 + [True] * 3])
        padded = model(torch.cat([x[:1, :5], noise], 1), src_key_padding_mask=pad1)
    torch.testing.assert_close(padded[:, :5], alone, atol=1e-5, rtol=1e-5)


def test_a_bidirectional_encoder_without_a_mask_still_routes_per_sample():
    """Positions that see each other (no mask, no causality): pooling over them leaks nothing the model kept apart."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    dense = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    model = parameternet.parameterize(dense, 4, example_input=torch.randn(2, 6, 16), count_macs=False)
    assert model.parameterize_report.token_routed == [] and model.parameterize_report.positions is None
    assert isinstance(model.layers[0].linear1, DynamicLinear)


@pytest.mark.parametrize("init", ["upcycle", "random"])
def test_a_position_wise_network_and_its_convs(init):
    """A per-position MLP keeps positions apart too; a conv in such a model stays static, with the reason."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.fc1 = nn.Linear(4, 8)
            self.fc2 = nn.Linear(8, 3)

        def forward(self, x):  # x (B, T, 4): every position through a 1x1 conv and an MLP on its own
            h = self.conv(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
            return self.fc2(self.fc1(h).relu())

    model = parameternet.parameterize(Mixed(), 4, init=init, example_input=torch.randn(2, 6, 4), count_macs=False)
    report = model.parameterize_report
    assert report.token_routed == ["fc1"] and "positions kept apart" in report.static["conv"]
    assert report.static["fc2"].startswith("output head")
