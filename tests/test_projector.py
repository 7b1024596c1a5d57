import pytest
import torch

from vlm_peft import VLMConfig
from vlm_peft.model.projector import CrossAttentionProjector, build_projector, sincos_2d

VISION, HIDDEN, PATCHES, N = 24, 32, 16, 6


def make(kind="cross_attention", n=N, **kw):
    cfg = VLMConfig(
        vision_config={}, projector=kind, num_image_tokens=n, projector_heads=4, projector_dropout=0.0, **kw
    )
    torch.manual_seed(0)
    return build_projector(cfg, VISION, HIDDEN, PATCHES).eval()


def inputs(images=3, n=N):
    torch.manual_seed(1)
    features = torch.randn(images, PATCHES, VISION)
    # Identical placeholder embeddings, as the LLM gives them.
    queries = torch.randn(HIDDEN).expand(images, n, HIDDEN).clone()
    return features, queries


def test_output_shape_and_distinct_slots():
    proj = make()
    features, queries = inputs()
    out = proj(features, queries)
    assert out.shape == (3, N, HIDDEN)
    # Seed flaw 2: identical queries without slot embeddings give identical outputs.
    distances = torch.cdist(out[0], out[0])
    assert distances[~torch.eye(N, dtype=torch.bool)].min() > 1e-3


def test_each_image_attends_to_all_of_its_own_patches():
    proj = make()
    features, queries = inputs()
    base = proj(features, queries)
    for patch in (0, PATCHES // 2, PATCHES - 1):
        changed = features.clone()
        changed[1, patch] += 1.0
        out = proj(changed, queries)
        assert not torch.allclose(out[1], base[1]), f"patch {patch} of image 1 is ignored"
        torch.testing.assert_close(out[0], base[0], rtol=0, atol=0)
        torch.testing.assert_close(out[2], base[2], rtol=0, atol=0)


def test_batched_equals_one_image_at_a_time():
    proj = make()
    features, queries = inputs(images=4)
    batched = proj(features, queries)
    single = torch.cat([proj(features[i : i + 1], queries[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_residual_adds_block_input_not_original_query():
    proj = make()
    block = proj.layers[1]
    x, kv = torch.randn(2, N, HIDDEN), torch.randn(2, PATCHES, HIDDEN)
    with torch.no_grad():
        for p in list(block.attn.parameters()) + list(block.ffn.parameters()):
            p.zero_()
    torch.testing.assert_close(block(x, kv), x)


def test_key_positions_are_2d_and_not_saved():
    pos = sincos_2d(16, 32)
    assert pos.shape == (16, 32)
    assert torch.unique(pos, dim=0).shape[0] == 16
    proj = make()
    assert "key_pos" not in proj.state_dict()


def test_init_and_output_scale():
    torch.manual_seed(0)
    proj = make()
    assert isinstance(proj, CrossAttentionProjector)
    weight = proj.vision_adapter.weight
    std = VISION**-0.5  # unit gain from the vision side: content starts at the positions' scale
    assert weight.abs().max() <= 2 * std + 1e-6 and 0.8 * std < weight.std() < 0.95 * std  # 2-std cut: 0.88
    # Far-apart widths so a fan-out (hidden) init could not pass for a fan-in one.
    wide = build_projector(VLMConfig(vision_config={}, num_image_tokens=N, projector_heads=4), 8, 128, PATCHES)
    assert 0.8 * 8**-0.5 < wide.vision_adapter.weight.std() < 0.95 * 8**-0.5
    inner = proj.layers[0].attn.to_q.weight
    assert inner.abs().max() <= 0.04 + 1e-6 and 0.01 < inner.std() < 0.03
    proj.match_output_scale(0.05)
    features, queries = inputs()
    out = proj(features, queries)
    assert out.pow(2).mean().sqrt().item() == pytest.approx(0.05, rel=0.05)


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_per_patch_projectors(kind):
    proj = make(kind, n=PATCHES)
    features, queries = inputs(n=PATCHES)
    assert proj(features, queries).shape == (3, PATCHES, HIDDEN)
    with pytest.raises(ValueError, match="num_image_tokens must equal"):
        make(kind, n=N)


def test_config_errors():
    with pytest.raises(ValueError, match="projector kind"):
        VLMConfig(vision_config={}, projector="perceiver")
    with pytest.raises(ValueError, match="num_image_tokens"):
        VLMConfig(vision_config={}, num_image_tokens=0)
    with pytest.raises(ValueError, match="vision tower"):
        VLMConfig(vision_model=None)
    with pytest.raises(ValueError, match="not divisible"):
        build_projector(VLMConfig(vision_config={}, projector_heads=5), VISION, HIDDEN, PATCHES)
    with pytest.raises(ValueError, match="unknown VLMConfig keys"):
        VLMConfig.from_dict({"vision_config": {}, "projector_layer": 2})


def test_gradients_reach_every_parameter():
    proj = make()
    proj.train()
    features, queries = inputs()
    proj(features, queries).square().mean().backward()
    missing = [n for n, p in proj.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
