import copy

import pytest
import yaml

from vlm_peft.training.recipe import RecipeError, apply_override, load_recipe

DEMO = yaml.safe_load(open("recipes/demo.yaml"))


def recipe(**changes):
    data = copy.deepcopy(DEMO)
    data.update(changes)
    return data


def test_shipped_recipes_load():
    demo = load_recipe("recipes/demo.yaml")
    assert [s.name for s in demo.stages] == ["align", "sft"]
    assert demo.stage("sft").lora.r == 8 and demo.stage("align").lora is None
    assert [s.name for s in load_recipe("recipes/demo-sft.yaml").stages] == ["sft"]
    for name in ("qwen3-0.6b-clip.yaml", "qwen3-0.6b-clip-49.yaml", "qwen3-8b-clip-fsdp.yaml"):
        real = load_recipe(f"recipes/{name}")
        assert real.llm.name_or_path.startswith("Qwen/Qwen3-")
        assert real.vision.name_or_path == "openai/clip-vit-base-patch16"
        assert [s.train for s in real.stages] == [["projector"], ["projector", "lora"]]


def test_overrides_address_stages_by_name_and_parse_values():
    r = load_recipe(
        "recipes/demo.yaml",
        ["stages.sft.args.max_steps=10", "stages.align.lr.projector=3e-3", "seed=7", "stages.0.eval.batch_size=4"],
    )
    assert r.stage("sft").args["max_steps"] == 10
    assert r.stage("align").lr.projector == 3e-3 and r.seed == 7 and r.stage("align").eval.batch_size == 4
    with pytest.raises(RecipeError, match="no stage 'nope'.*align"):
        load_recipe("recipes/demo.yaml", ["stages.nope.args.max_steps=1"])
    with pytest.raises(RecipeError, match="expected key.path=value"):
        load_recipe("recipes/demo.yaml", ["seed"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(projektor={}), r"projektor: unknown key \(did you mean 'projector'\?\)"),
        (
            lambda d: d["stages"][1]["args"].update(max_stpes=3),
            r"args.max_stpes: not an SFTConfig argument \(did you mean 'max_steps'",
        ),
        (
            lambda d: d["stages"][1]["args"].update(learning_rate=1e-3),
            r"args.learning_rate: not allowed here: use lr",
        ),
        (lambda d: d["stages"][1]["args"].update(output_dir="x"), r"stages.sft.args.output_dir: not allowed"),
        (
            lambda d: d["stages"][0].update(lora={"r": 4}),
            r"stages.align.lora: LoRA settings given",
        ),
        (
            lambda d: d["stages"][0].update(train=["projector", "vision"]),
            r"align.train\[1\]: 'vision' is not one of",
        ),
        (lambda d: d["stages"][0].update(train=[]), r"stages.align.train: list what the stage trains"),
        (lambda d: d["stages"][1].update(name="align"), r"'align' is used twice"),
        (lambda d: d["stages"][0]["data"].pop("train"), r"stages.align.data.train: required key is missing"),
        (
            lambda d: d["projector"].update(num_image_tokens="many"),
            r"num_image_tokens: expected int, got 'many'",
        ),
        (
            lambda d: d["projector"].update(kind="mlp", num_image_tokens=8),
            r"num_image_tokens: projector kind 'mlp' .* must be 16",
        ),
        (lambda d: d["projector"].update(dropout=1.5), r"projector.dropout: must be in \[0, 1\)"),
        (lambda d: d["projector"].update(revision=3), r"projector.revision: 3 is not one of \[1, 2\]"),
        (
            lambda d: d["projector"].update(num_image_tokens=17),
            r"num_image_tokens: 17 is more than this tower's 16 patches",
        ),
        (
            lambda d: d["projector"].update(kind="mlp") or d["stages"][1]["lr"].update(attention=1e-4),
            r"stages.sft.lr.attention: only the gated attention blocks .* projector is 'mlp'",
        ),
        (
            lambda d: d["projector"].update(revision=1) or d["stages"][1]["lr"].update(attention=1e-4),
            r"stages.sft.lr.attention: .* 'cross_attention' \(revision 1\): remove it",
        ),
        (lambda d: d["llm"].update(name_or_path="Qwen/Qwen3-0.6B"), r"llm: set exactly one of name_or_path"),
        (lambda d: d["llm"].pop("tokenizer"), r"llm.tokenizer: required with llm.random"),
        (lambda d: d["llm"].update(dtype="fp8"), r"llm.dtype: 'fp8' is not one of"),
        (lambda d: d["stages"][1]["lr"].update(lora=0), r"stages.sft.lr.lora: must be > 0"),
        (lambda d: d.update(stages=[]), r"stages: at least one stage"),
        (lambda d: d["stages"][0]["data"].update(format="csv"), r"stages.align.data.format: 'csv' is not one of"),
    ],
)
def test_validation_errors_name_the_key(edit, message):
    data = copy.deepcopy(DEMO)
    edit(data)
    with pytest.raises(RecipeError, match=message):
        load_recipe(data)


def test_override_into_lists_by_index():
    data = copy.deepcopy(DEMO)
    apply_override(data, "stages.1.train=[projector]")
    assert data["stages"][1]["train"] == ["projector"]


@pytest.mark.parametrize("name", ["base", "../x", "a b", ""])
def test_stage_names_must_be_plain_folders(name):
    data = copy.deepcopy(DEMO)
    data["stages"][0]["name"] = name
    with pytest.raises(RecipeError, match="must be a plain folder name"):
        load_recipe(data)


def test_eval_during_training_needs_an_eval_split_and_room_for_an_image():
    with pytest.raises(RecipeError, match="eval_strategy: needs an eval split"):
        load_recipe("recipes/demo.yaml", ["stages.sft.args.eval_strategy=steps", "stages.sft.data.eval=null"])
    with pytest.raises(RecipeError, match="max_length: 10 cannot hold one image"):
        load_recipe("recipes/demo.yaml", ["stages.sft.args.max_length=10"])
    with pytest.raises(RecipeError, match="args.deepspeed: not allowed here"):
        load_recipe("recipes/demo.yaml", ["stages.sft.args.deepspeed=ds.json"])


@pytest.mark.parametrize(
    "override, match",
    [
        ("stages.sft.lr.projector=.nan", r"stages.sft.lr.projector: must be a finite number, got nan"),
        ("stages.sft.lr.lora=.inf", r"stages.sft.lr.lora: must be a finite number, got inf"),
        ("stages.sft.lr.lora=nan", r"stages.sft.lr.lora: must be a finite number"),  # a string, read as a float
        ("stages.sft.args.weight_decay=.nan", r"stages.sft.args.weight_decay: must be a finite number"),
        ("llm.random.rms_norm_eps=-.inf", r"llm.random.rms_norm_eps: must be a finite number"),
        ("projector.dropout=.nan", r"projector.dropout: must be a finite number"),
    ],
)
def test_non_finite_numbers_are_refused_anywhere(override, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe("recipes/demo.yaml", [override])


@pytest.mark.parametrize(
    "override, match",
    [
        ("stages.sft.args.max_steps=ten", r"stages.sft.args.max_steps: expected int, got 'ten'"),
        ("stages.sft.args.max_steps='4'", r"stages.sft.args.max_steps: expected int, got '4' \(str\)"),
        ("stages.sft.args.max_steps=4.5", r"stages.sft.args.max_steps: expected int, got 4.5"),
        ("stages.sft.args.max_length='128'", r"stages.sft.args.max_length: expected int or NoneType, got '128'"),
        ("stages.sft.args.per_device_train_batch_size='8'", r"per_device_train_batch_size: expected int, got '8'"),
        ("stages.sft.args.bf16=1", r"stages.sft.args.bf16: expected bool"),
        ("stages.sft.args.lr_scheduler_type=[1]", r"stages.sft.args.lr_scheduler_type: expected"),
        ("stages.sft.args.gradient_accumulation_steps=0", r"gradient_accumulation_steps: must be >= 1, got 0"),
        ("stages.sft.lora.rank=8", r"stages.sft.lora.rank: unknown key; allowed: \['alpha', 'dropout', 'r'"),
    ],
)
def test_wrong_types_and_keys_are_named_before_anything_is_built(override, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe("recipes/demo.yaml", [override])


def test_typed_args_are_kept_and_yaml11_floats_read():
    r = load_recipe("recipes/demo.yaml", ["stages.sft.args.weight_decay='1e-1'", "stages.sft.args.max_steps=5"])
    assert r.stage("sft").args["weight_decay"] == 0.1 and r.stage("sft").args["max_steps"] == 5


@pytest.mark.parametrize(
    "override, match",
    [
        ("distributed.strategy=deepspeed", r"distributed.deepspeed: required with strategy deepspeed.*zero2.json"),
        ("distributed.deepspeed=nope.json", r"distributed.deepspeed: given, but distributed.strategy is not"),
        ('distributed.fsdp={"version": 2}', r"distributed.fsdp: given, but distributed.strategy is not 'fsdp'"),
        ("distributed.strategy=zero3", r"distributed.strategy: 'zero3' is not one of"),
    ],
)
def test_distributed_settings_that_contradict_each_other_are_refused(override, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe("recipes/demo.yaml", [override])


@pytest.mark.parametrize(
    "fsdp, match",
    [
        ({"version": 1}, r"distributed.fsdp.version: only FSDP2"),
        ({"sync_module_states": True}, r"distributed.fsdp.sync_module_states: not a supported.*reshard_after_forward"),
        ({"cpu_ram_efficient_loading": True}, r"cpu_ram_efficient_loading: not supported: every process loads"),
        ({"fsdp_cpu_offload": True}, r"distributed.fsdp.fsdp_cpu_offload: not supported yet.*offload_optimizer"),
        ({"fsdp_activation_checkpointing": "yes"}, r"distributed.fsdp.activation_checkpointing: expected true or"),
        ({"state_dict_type": "LOCAL"}, r"state_dict_type: one of \['FULL_STATE_DICT'"),
        ({"transformer_layer_cls_to_wrap": [1]}, r"transformer_layer_cls_to_wrap: expected a class name"),
    ],
)
def test_fsdp_options_are_checked_as_the_recipe_is_read(fsdp, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(recipe(distributed={"strategy": "fsdp", "fsdp": fsdp}))
    ok = load_recipe(recipe(distributed={"strategy": "fsdp", "fsdp": {"fsdp_reshard_after_forward": False}}))
    assert ok.distributed.fsdp == {"fsdp_reshard_after_forward": False}


def test_deepspeed_configs_are_read_and_checked_as_the_recipe_is_read(tmp_path):
    from vlm_peft.training.strategies import deepspeed_config, zero_stage

    for name, stage in (("zero2", 2), ("zero3", 3)):
        shipped = load_recipe(
            recipe(distributed={"strategy": "deepspeed", "deepspeed": f"recipes/deepspeed/{name}.json"})
        )
        assert zero_stage(deepspeed_config(shipped.distributed)) == stage
    bad = tmp_path / "bad.json"
    cases = [
        (str(tmp_path / "missing.json"), r"cannot read .*missing.json"),
        ("{broken", None),  # written to the file below
        (
            {"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}},
            r"remove the 'optimizer' section: "
            r"vlm-peft builds the optimizer \(separate projector and LoRA learning rates\)",
        ),  # fmt: skip
        ({"scheduler": {"type": "WarmupLR"}}, r"remove the 'scheduler' section"),
        ({"zero_optimization": {"stage": 4}}, r"zero_optimization.stage must be 0, 1, 2 or 3"),
    ]
    for source, match in cases:
        if source == "{broken":
            bad.write_text(source)
            source, match = str(bad), r".*bad.json is not valid JSON"
        with pytest.raises(RecipeError, match=f"distributed.deepspeed: {match}"):
            load_recipe(recipe(distributed={"strategy": "deepspeed", "deepspeed": source}))
    # An offloaded optimizer stays vlm-peft's own (DeepSpeed would refuse it by default).
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    spec = load_recipe(recipe(distributed={"strategy": "deepspeed", "deepspeed": offload})).distributed
    assert deepspeed_config(spec)["zero_force_ds_cpu_optimizer"] is False and "zero_force" not in str(offload)
