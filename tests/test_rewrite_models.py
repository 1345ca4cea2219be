"""The rewrite on a model nobody here wrote: transformers' MiniMax, whose lightning-attention
layers run the chunked block loop in plain PyTorch next to softmax-attention layers. Skipped
when transformers is not installed (``pip install transformers``)."""

import pytest
import torch

import lightning_op
from lightning_op.rewrite import clear_report, make_backend, report

transformers = pytest.importorskip("transformers")


def _tiny_minimax():
    config = transformers.MiniMaxConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, block_size=16, num_local_experts=2, num_experts_per_tok=1,
        layer_types=["linear_attention", "full_attention"], max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return transformers.MiniMaxForCausalLM(config).eval()


@pytest.mark.parametrize("entry", ["dynamo", "export"])
def test_minimax_block_loop_is_rewritten_and_softmax_layer_is_not(entry):
    torch._dynamo.reset()
    clear_report()
    model = _tiny_minimax()
    ids = torch.randint(0, 128, (2, 50))
    graphs = []  # what runs: the graphs the rewrite hands to aot_eager, or the program it returns

    def keep(gm, example_inputs, **kwargs):
        compiled = torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs, **kwargs)
        graphs.append(gm)  # once compiled: a graph whose compile makes dynamo trace again never runs
        return compiled

    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        if entry == "dynamo":
            got = torch.compile(model, backend=make_backend(keep))(ids, use_cache=False).logits
        else:
            ep = lightning_op.rewrite(torch.export.export(model, (ids,), {"use_cache": False}, strict=False))
            graphs.append(ep.graph_module)
            got = ep.module()(ids, use_cache=False).logits
    calls = sum(node.target is torch.ops.lightning.attn.default for gm in graphs for node in gm.graph.nodes)
    assert calls == 1, report()  # the linear-attention layer only
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    done = [r for r in report() if r.rewritten]
    assert len(done) == 1, report()  # the linear-attention layer only
    assert done[0].form == "chunked" and "layers.0" in done[0].location
    slopes = lightning_op.slopes(4) * (1 + 1e-5)  # MiniMax's per-layer factor for layer 0
    torch.testing.assert_close(torch.tensor(done[0].decay), slopes, rtol=1e-4, atol=1e-7)
