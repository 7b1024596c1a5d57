import json

import pytest
import torch

from vlm_peft import VLMConfig
from vlm_peft.model.projector import (
    CrossAttentionProjector,
    MLPProjector,
    SlotCrossAttentionProjector,
    build_projector,
    sincos_2d,
)

VISION, HIDDEN, PATCHES, N = 24, 32, 16, 4


def make(kind="cross_attention", n=N, open_gates=True, **kw):
    cfg = VLMConfig(
        vision_config={}, projector=kind, num_image_tokens=n, projector_heads=4, projector_dropout=0.0, **kw
    )
    torch.manual_seed(0)
    proj = build_projector(cfg, VISION, HIDDEN, PATCHES).eval()
    if open_gates:  # as after training: the attention blocks contribute
        with torch.no_grad():
            for name, p in proj.named_parameters():
                if name.endswith(("gate_attn", "gate_ffn")):
                    p.fill_(0.5)
    return proj


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


def test_starts_as_an_mlp_per_patch_with_closed_gates():
    """Revision 2 at init: LLaVA's MLP on each patch (+ its patch embedding), then the merge Linear over
    each token's r x r group (+ the token's embedding); the gated attention adds nothing until training
    opens the gates."""
    for n in (PATCHES, PATCHES // 4):
        proj = make(n=n, open_gates=False)
        assert isinstance(proj, CrossAttentionProjector)
        gates = [p for name, p in proj.named_parameters() if "gate" in name]
        assert len(gates) == 4 and all(g.item() == 0 for g in gates)
        features, queries = inputs(n=n)
        out = proj(features, queries)
        mlp = MLPProjector(VISION, HIDDEN)
        mlp.fc_in.load_state_dict(proj.content[0].state_dict())
        mlp.fc_out.load_state_dict(proj.content[2].state_dict())
        per_patch = mlp(features, queries) + proj.patch_embed
        if n == PATCHES:
            torch.testing.assert_close(out, proj.merge_proj(per_patch) + proj.slot_embed)
        else:
            # 2x2 merge of the 4x4 grid: token 0 is patches 0, 1, 4, 5 side by side, and only those.
            cells = per_patch.reshape(3, 2, 2, 2, 2, HIDDEN).permute(0, 1, 3, 2, 4, 5).reshape(3, n, 4 * HIDDEN)
            torch.testing.assert_close(out, proj.merge_proj(cells) + proj.slot_embed)
            for patch in range(PATCHES):
                changed = features.clone()
                changed[0, patch] += 1.0
                moved = (proj(changed, queries)[0] - out[0]).abs().sum(-1) > 0
                row, col = divmod(patch, 4)
                assert moved.tolist() == [i == (row // 2) * 2 + col // 2 for i in range(n)], patch
    weight = proj.key_proj.weight
    std = VISION**-0.5  # unit gain from the vision side: content starts at the positions' scale
    assert weight.abs().max() <= 2 * std + 1e-6 and 0.8 * std < weight.std() < 0.95 * std  # 2-std cut: 0.88
    inner = proj.layers[0].attn.to_q.weight
    assert inner.abs().max() <= 0.04 + 1e-6 and 0.01 < inner.std() < 0.03


def test_open_gates_let_every_token_read_every_patch():
    proj = make(n=PATCHES)
    features, queries = inputs(n=PATCHES)
    base = proj(features, queries)
    changed = features.clone()
    changed[0, 0] += 1.0
    assert ((proj(changed, queries)[0] - base[0]).abs().sum(-1) > 0).all()


def test_token_counts_off_the_grid_average_runs_of_patches_with_a_warning():
    with pytest.warns(UserWarning, match="not the tower's 16 patches merged in square groups"):
        proj = make(n=6, open_gates=False)
    features, queries = inputs(n=6)
    per_patch = proj.content(features) + proj.patch_embed
    runs = torch.nn.functional.adaptive_avg_pool1d(per_patch.transpose(1, 2), 6).transpose(1, 2)
    torch.testing.assert_close(proj(features, queries), proj.merge_proj(runs) + proj.slot_embed)


def test_more_tokens_than_patches_is_refused():
    with pytest.raises(ValueError, match="more than the vision tower's 16 patches"):
        make(n=PATCHES + 1)


def test_revision_1_loads_from_configs_saved_before_revision_2(tmp_path):
    cfg = VLMConfig(vision_config={}, num_image_tokens=N, projector_heads=4)
    assert cfg.projector_revision == 2 and VLMConfig.from_dict(cfg.to_dict()).projector_revision == 2
    data = cfg.to_dict()
    del data["projector_revision"]  # what a vlm_config.json from before revision 2 holds
    (tmp_path / "vlm_config.json").write_text(json.dumps(data))
    old = VLMConfig.from_pretrained(tmp_path)
    assert old.projector_revision == 1
    proj = build_projector(old, VISION, HIDDEN, PATCHES).eval()
    assert isinstance(proj, SlotCrossAttentionProjector)
    assert {"vision_adapter.weight", "output_norm.weight", "layers.0.attn.to_q.weight"} <= set(proj.state_dict())
    assert not any("gate" in k for k in proj.state_dict())
    proj.match_output_scale(0.05)
    features, queries = inputs()
    out = proj(features, queries)
    assert out.pow(2).mean().sqrt().item() == pytest.approx(0.05, rel=0.05)
    cfg.save_pretrained(tmp_path)
    assert VLMConfig.from_pretrained(tmp_path).projector_revision == 2
    for bad in (3, True, 2.0):
        with pytest.raises(ValueError, match="projector_revision"):
            VLMConfig(vision_config={}, projector_revision=bad)


def test_merging_more_than_4x4_patches_into_a_token_is_refused():
    with pytest.raises(ValueError, match=r"each token of 8x8 patches: .* 2,048 inputs. Use at least 4 tokens"):
        build_projector(VLMConfig(vision_config={}, num_image_tokens=1, projector_heads=4), 8, HIDDEN, 64)
    # Revision 1 takes any count.
    cfg = VLMConfig(vision_config={}, num_image_tokens=1, projector_heads=4, projector_revision=1)
    assert isinstance(build_projector(cfg, 8, HIDDEN, 64), SlotCrossAttentionProjector)


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
        build_projector(VLMConfig(vision_config={}, num_image_tokens=N, projector_heads=5), VISION, HIDDEN, PATCHES)
    with pytest.raises(ValueError, match="unknown VLMConfig keys"):
        VLMConfig.from_dict({"vision_config": {}, "projector_layer": 2})


@pytest.mark.parametrize("open_gates", [False, True])
def test_gradients_reach_every_parameter(open_gates):
    proj = make(open_gates=open_gates)
    proj.train()
    features, queries = inputs()
    proj(features, queries).square().mean().backward()
    missing = [n for n, p in proj.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    if open_gates:
        assert not missing
    else:  # closed gates: only the gates themselves learn in the blocks at first
        assert missing and all(n.startswith(("layers.", "key_proj.")) and "gate" not in n for n in missing)
