"""The covariance pass's Grams: the float64 XᵀX of each group's real input, summed over upper
column blocks only and mirrored."""
import pytest
import torch

from swiftsvd_export import covariance
from swiftsvd_export.architectures import spec_for
from swiftsvd_export.covariance import add_gram, calibrate, mirror_gram

from .conftest import make_tiny_llama


def test_add_gram_sums_only_the_upper_blocks_and_mirror_completes_them(monkeypatch):
    monkeypatch.setattr(covariance, "GRAM_BLOCK", 16)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(50, 53, generator=g) for _ in range(3)]  # 53 columns: 3 blocks of 17-18
    acc = torch.zeros(53, 53, dtype=torch.float64)
    for x in batches:
        add_gram(acc, x)
    edges = covariance._gram_edges(53)
    assert len(edges) == 4
    assert acc[edges[1]:, :edges[1]].abs().sum() == 0  # the lower blocks were never computed
    mirror_gram(acc)
    ref = sum(x.double().T @ x.double() for x in batches)
    torch.testing.assert_close(acc, ref, rtol=1e-6, atol=1e-5)
    assert torch.equal(acc, acc.T)


@pytest.mark.parametrize("block", [16, 288])
def test_calibrate_grams_are_the_inputs_xtx(monkeypatch, block):
    """Every group's Gram is XᵀX of the input its first linear sees, blocked (16) or not (288)."""
    monkeypatch.setattr(covariance, "GRAM_BLOCK", block)
    model = make_tiny_llama(layers=2)
    spec = spec_for(model.config)
    ids = torch.randint(3, 512, (3, 24), generator=torch.Generator().manual_seed(1))
    seen: dict[tuple[int, str], torch.Tensor] = {}
    for i, layer in enumerate(spec.layers(model)):
        for group in spec.groups:
            def hook(_m, args, key=(i, group.name)):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                seen[key] = seen.get(key, 0) + x.T @ x
            layer.get_submodule(group.linears[0]).register_forward_pre_hook(hook)
    grams = {}
    calibrate(model, spec, ids, batch_size=2, progress=False,
              on_block=lambda _layer, st: grams.update({(st.index, n): g.clone() for n, g in st.grams.items()}))
    assert set(grams) == set(seen)
    for key, G in grams.items():
        torch.testing.assert_close(G, seen[key], rtol=1e-5, atol=1e-4 * seen[key].abs().max().item())
        assert torch.equal(G, G.T)
