"""`export`: a vlm-peft model as a standard transformers LLaVA checkpoint, the layout vLLM and SGLang load.

LLaVA's model is fixed: frozen CLIP/SigLIP tower -> one hidden state (`vision_feature_layer`), CLS dropped or
not (`vision_feature_select_strategy`) -> Linear-act-Linear -> written over the image tokens. Only the `mlp`
projector computes exactly that; anything else is refused, with the merged dir (`--format vlm-peft`) named as
the alternative. Everything the export relies on is checked on the model itself before a file is written:
the projector's layers and activation, the tower's features against LLaVA's selection, the image size the
image processor produces, the image token being one token.

The image token stays vlm-peft's own (`<|image_pad|>` by default): the ids, the embedding table and the
rendered prompts stay exactly ours, and vLLM's LLaVA takes the token from `image_token_index`. The chat
template is ours with a header that keeps its rendering (see `llava_chat_template`).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from PIL import Image
from torch import nn
from transformers import LlavaConfig, LlavaProcessor, PreTrainedModel

from ..model.checkpoint import active_projector
from ..model.config import VLMConfig
from ..model.hooks import PROJECTOR_ATTR, get_state
from ..model.projector import MLPProjector
from ..model.vision import VisionTower
from .merge import DTYPES, building, load_merged, merge, prepare_output

logger = logging.getLogger(__name__)

FORMATS = ("llava", "vlm-peft")
# Tower kind -> (vision_feature_select_strategy, num_additional_image_tokens): CLIP's CLS is dropped.
TOWERS = {"clip_vision_model": ("default", 1), "siglip_vision_model": ("full", 0)}
GELU_NAMES = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}  # nn.GELU(approximate=...) -> transformers' ACT2FN


def export(
    source_dir: str | Path,
    out_dir: str | Path,
    *,
    format: str = "llava",
    base: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
) -> Path:
    """Write `out_dir` from an adapter dir (on the base it names, or `base`) or a merged dir, LoRA merged.

    `format="llava"`: a `LlavaForConditionalGeneration` checkpoint + `LlavaProcessor` (mlp projector only).
    `format="vlm-peft"`: the merged dir, as `vlm_peft.merge` writes it (every projector kind)."""
    if format not in FORMATS:
        raise ValueError(f"format {format!r} is not one of {FORMATS}.")
    if format == "vlm-peft":
        return merge(source_dir, out_dir, base=base, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)
    source_dir, out = Path(source_dir), Path(out_dir)
    refuse_projector(VLMConfig.from_pretrained(source_dir), source_dir)
    prepare_output(source_dir, out, base, overwrite)
    llm, processor = load_merged(source_dir, base, dtype)
    config, act = llava_config(llm, processor)
    target = DTYPES[dtype] if isinstance(dtype, str) else dtype or next(llm.parameters()).dtype
    config.dtype = target
    weights = llava_state_dict(llm, target)
    llava_processor = _processor(llm, processor, config)
    with building(out) as tmp:
        tmp.mkdir()
        save_torch_state_dict(weights, tmp, max_shard_size=max_shard_size, metadata={"format": "pt"})
        config.save_pretrained(tmp)
        _generation_config(llm, config.image_token_index).save_pretrained(tmp)
        llava_processor.save_pretrained(tmp)
        (tmp / "README.md").write_text(_card(get_state(llm).config, source_dir, config, act))
    logger.info("exported %s to %s (LLaVA)", source_dir, out)
    return out


def refuse_projector(cfg: VLMConfig, source: Path | str) -> None:
    if cfg.projector != "mlp":
        raise ValueError(
            f"{source}: projector {cfg.projector!r} has no LLaVA equivalent (LLaVA's projector is Linear-GELU-Linear "
            "per patch, vlm-peft's 'mlp' kind). Export the merged dir instead: --format vlm-peft "
            "(format='vlm-peft'), loaded with vlm_peft.load or served with `vlm-peft chat`."
        )


def _refuse(what: str) -> ValueError:
    return ValueError(f"{what}; LLaVA cannot express it exactly. Export the merged dir instead: --format vlm-peft.")


def _activation(projector: nn.Module) -> tuple[str, bool]:
    """transformers' name for the projector's activation, and whether its Linears have biases."""
    if type(projector) is not MLPProjector or set(dict(projector.named_children())) != {"fc_in", "act", "fc_out"}:
        raise _refuse(f"the projector is a {type(projector).__name__}, not vlm-peft's Linear-GELU-Linear")
    act = projector.act
    if type(act) is not nn.GELU or act.approximate not in GELU_NAMES:
        raise _refuse(f"the projector's activation is {act!r}, not GELU")
    biases = {projector.fc_in.bias is not None, projector.fc_out.bias is not None}
    if len(biases) != 1:
        raise _refuse("one of the projector's two Linear layers has a bias and the other has none")
    return GELU_NAMES[act.approximate], biases.pop()


def _tower_layout(tower: VisionTower) -> tuple[str, int]:
    kind = tower.model.config.model_type
    if kind not in TOWERS:
        raise _refuse(f"the vision tower is a {kind!r}; LLaVA exports support {sorted(TOWERS)}")
    if kind == "siglip_vision_model" and tower.feature_layer == -1:
        # Our tower reads SigLIP's last_hidden_state, which has post_layernorm applied; LLaVA (transformers and
        # vLLM alike) reads hidden_states[-1], before it.
        raise _refuse(
            "a SigLIP tower at vision_feature_layer=-1 feeds the projector its post-LayerNorm output, which LLaVA "
            "skips (it reads hidden_states[-1]); models trained with vision_feature_layer=-2 export"
        )
    return TOWERS[kind]


def _image_size(image_processor: Any) -> tuple[int, int]:
    """The (height, width) the image processor gives two differently shaped images: one fixed size or an error."""
    sizes = set()
    for size in ((37, 23), (23, 61)):
        pixels = image_processor(images=[Image.new("RGB", size, (120, 60, 30))], return_tensors="pt")["pixel_values"]
        sizes.add(tuple(pixels.shape[-2:]))
    if len(sizes) != 1:
        raise _refuse(f"the image processor gives images of different sizes {sorted(sizes)}")
    return sizes.pop()


@torch.no_grad()
def _check_features(tower: VisionTower, size: tuple[int, int], strategy: str) -> None:
    """Our tower's features against LLaVA's selection (`hidden_states[layer]`, CLS cropped for "default"),
    on one random image: what any rule above missed shows up here."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, *size, generator=generator).to(device=tower.device, dtype=tower.dtype)
    ours = tower(pixels)
    theirs = tower.model(pixel_values=pixels, output_hidden_states=True).hidden_states[tower.feature_layer]
    theirs = theirs[:, 1:] if strategy == "default" else theirs
    if theirs.shape != ours.shape or not torch.allclose(ours, theirs, rtol=0, atol=1e-6):
        raise _refuse("the vision tower's features differ from the hidden state LLaVA would select")


def llava_config(llm: PreTrainedModel, processor: Any) -> tuple[LlavaConfig, str]:
    """The `LlavaConfig` for an attached, merged model (and the activation's name), after checking that LLaVA
    computes what it computes."""
    state = get_state(llm)
    cfg, tower = state.config, state.vision
    act, bias = _activation(active_projector(llm))
    strategy, _ = _tower_layout(tower)
    height, width = _image_size(processor.image_processor)
    patch = tower.model.config.patch_size
    side = tower.model.config.image_size
    if (height, width) != (side, side) or (height // patch) * (width // patch) != cfg.num_image_tokens:
        raise _refuse(
            f"the image processor makes {height}x{width} px images, but the tower takes "
            f"{side} px and the model {cfg.num_image_tokens} image tokens"
        )
    _check_features(tower, (height, width), strategy)
    ids = processor.tokenizer.encode(cfg.image_token, add_special_tokens=False)
    if ids != [cfg.image_token_id]:
        raise _refuse(f"image_token {cfg.image_token!r} tokenizes to {ids}, not the one token {cfg.image_token_id}")
    text_config = copy.deepcopy(llm.config)
    text_config.architectures = [type(llm).__name__]
    config = LlavaConfig(
        vision_config=copy.deepcopy(tower.model.config),
        text_config=text_config,
        image_token_index=cfg.image_token_id,
        image_seq_length=cfg.num_image_tokens,
        projector_hidden_act=act,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=cfg.vision_feature_layer,
        multimodal_projector_bias=bias,
    )
    config.architectures = ["LlavaForConditionalGeneration"]  # what vLLM and SGLang pick the model class by
    return config, act


def llava_state_dict(llm: PreTrainedModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """LLaVA's weight names: `model.language_model.*`, `model.vision_tower.vision_model.*` (the name CLIP and
    SigLIP checkpoints, llava-hf's and vLLM's loaders use), `model.multi_modal_projector.linear_{1,2}.*` and
    `lm_head.weight`, written even when tied: loaders that do not tie find it too."""
    state = get_state(llm)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in llm.state_dict().items():
        if name.startswith(f"{PROJECTOR_ATTR}."):
            continue
        if name.startswith("model."):
            out["model.language_model." + name[len("model.") :]] = tensor
        elif name == "lm_head.weight":
            out[name] = tensor
        else:
            raise _refuse(f"the language model has a weight {name!r} outside model.* and lm_head")
    if "lm_head.weight" not in out:
        raise _refuse("the language model has no lm_head.weight")
    for name, tensor in state.vision.model.state_dict().items():
        out["model.vision_tower." + (name if name.startswith("vision_model.") else "vision_model." + name)] = tensor
    projector = active_projector(llm)
    for ours, theirs in (("fc_in", "linear_1"), ("fc_out", "linear_2")):
        for kind, tensor in getattr(projector, ours).state_dict().items():
            out[f"model.multi_modal_projector.{theirs}.{kind}"] = tensor
    out = {name: tensor.detach().to(device="cpu", dtype=dtype) for name, tensor in out.items()}
    out["lm_head.weight"] = out["lm_head.weight"].clone()  # tied: shared storage would be written once
    return out


def llava_chat_template(template: str, image_slot: str) -> str:
    """Our chat template as LLaVA's processor and vLLM use it, rendering what `VLMProcessor` renders:
    - one image token per image slot: LLaVA's processor expands it to N (ours passes the N-token run);
    - Qwen3's non-thinking mode unless `enable_thinking=True` is passed, as `VLMProcessor` defaults;
    - a loop over `message.content` that renders nothing: vLLM (and SGLang, which copies its rule) pass image
      parts to a template only when they find such a loop; ours loops inside a macro, which they miss."""
    header = (
        "{#- vlm-peft export: an image slot is one image token (the processor expands it), non-thinking by "
        "default, and the empty loop marks structured content for vLLM. -#}\n"
        f"{{%- set image_placeholder = {json.dumps(image_slot)} -%}}\n"
        "{%- set enable_thinking = enable_thinking | default(false) -%}\n"
        "{%- for message in messages -%}{%- for part in message.content | default([], true) | reject('string') -%}"
        "{%- endfor -%}{%- endfor -%}\n"
    )
    return header + template


def _processor(llm: PreTrainedModel, processor: Any, config: LlavaConfig) -> LlavaProcessor:
    cfg = get_state(llm).config
    strategy, extra = _tower_layout(get_state(llm).vision)
    template = llava_chat_template(
        processor.chat_template, cfg.vision_start_token + cfg.image_token + cfg.vision_end_token
    )
    # vLLM renders with the tokenizer's template when a request has tools: Qwen3's own would drop the images.
    processor.tokenizer.chat_template = template
    return LlavaProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=template,
        image_token=cfg.image_token,
        num_additional_image_tokens=extra,
    )


def _generation_config(llm: PreTrainedModel, image_token_id: int) -> Any:
    # vlm-peft's generate never emits the image token (a generated one starts a run no image fills): same here.
    generation = copy.deepcopy(llm.generation_config)
    generation.suppress_tokens = sorted(set(generation.suppress_tokens or []) | {image_token_id})
    return generation


def _card(cfg: VLMConfig, source: Path, config: LlavaConfig, act: str) -> str:
    slot = cfg.vision_start_token + cfg.image_token + cfg.vision_end_token
    tower = f"{config.vision_config.model_type} tower (hidden state {config.vision_feature_layer}"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "tags: [vlm-peft, llava, qwen3]",
        "---",
        "",
        f"# {source.name} (LLaVA export)",
        "",
        f"A vlm-peft model (base `{cfg.base_model}`, LoRA merged) as a transformers `LlavaForConditionalGeneration`:",
        f"{tower}, {config.vision_feature_select_strategy!r} strategy), Linear-{act}-Linear projector,",
        f"{cfg.num_image_tokens} image tokens `{cfg.image_token}` (id {config.image_token_index}) per image.",
        "",
        "```python",
        "from transformers import AutoProcessor, LlavaForConditionalGeneration",
        "model = LlavaForConditionalGeneration.from_pretrained('PATH_TO_THIS_DIR')",
        "processor = AutoProcessor.from_pretrained('PATH_TO_THIS_DIR')",
        "```",
        "",
        "vLLM: `vllm serve PATH_TO_THIS_DIR --chat-template-content-format openai`.",
        "",
        f"The chat template renders an image as `{slot}` (the processor expands the image token to",
        f"{cfg.num_image_tokens}) and defaults to Qwen3's non-thinking mode, as vlm-peft does. Images are preprocessed",
        "as vlm-peft does, except that vlm-peft also applies EXIF orientation and scales 16/32-bit grey images to",
        "8 bits: rotate and convert such images yourself.",
    ]
    return "\n".join(lines) + "\n"
