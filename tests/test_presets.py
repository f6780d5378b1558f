"""full/presets and full/launch: every method has cited presets the core accepts; the launch files are valid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minipref
from full import presets
from full.data import DesirableRatioSampler

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "full" / "launch"
ALL = presets.available_presets()
FULL = [name for name in ALL if presets.is_full(presets.preset_details(name))]


def test_every_method_has_a_preset_per_model_family():
    for method in minipref.OBJECTIVES:
        for family in presets.MODEL_FAMILIES:
            assert f"{family}-{method}" in ALL, f"no preset for {family}-{method}"
    flow = [f"{family}-{method}" for family in presets.FLOW_FAMILIES for method in ("dpo", "kto")]
    assert set(flow) <= set(ALL)
    assert len(ALL) - len(FULL) == len(minipref.OBJECTIVES) * len(presets.MODEL_FAMILIES) + len(flow)
    # the papers' full fine-tuning recipes (docs/full_finetuning.md)
    assert FULL == ["sd15-contrast-full", "sd15-dpo-full", "sd15-dspo-full", "sd15-kto-full", "sdxl-contrast-full",
                    "sdxl-dpo-full"]


@pytest.mark.parametrize("name", ALL)
def test_preset_is_well_formed_and_every_value_is_cited(name):
    raw = json.loads((presets.PRESET_DIR / f"{name}.json").read_text())
    full = name in FULL
    assert raw["name"] == name == f"{raw['model_family']}-{raw['method']}" + ("-full" if full else "")
    assert raw["method"] in minipref.OBJECTIVES and raw["model_family"] in presets.MODEL_FAMILIES + presets.FLOW_FAMILIES
    for key, entry in raw["flags"].items():
        assert key in presets.PRESET_KEYS
        # A source cites a paper (by its number in docs/methods.md's Papers table), docs/conventions.md or a named
        # public config, or says the value is not in the paper.
        tags = ("paper 00", "docs/conventions.md", "NOT in", "NOT stated", "authors'")
        assert any(tag in entry["source"] for tag in tags), entry
        # never a document users do not have (an outside spec's sections, a ../shared folder)
        assert not any(bad in entry["source"].lower() for bad in ("spec section", "spec identity", "../shared")), entry
    flags = presets.load_preset(name)
    assert set(flags) <= set(presets.PRESET_KEYS)
    assert full or flags == presets.load_preset(raw["model_family"], raw["method"])  # ("sd15", "dpo") is the LoRA one
    for required in ("learning_rate", "train_batch_size", "resolution", "mixed_precision"):
        assert required in flags
    assert flags["resolution"] == {"sd15": 512, "sdxl": 1024, "sd3": 1024, "flux": 1024}[raw["model_family"]]
    if full:  # every weight: no LoRA rank; per-GPU values for a stated GPU count, cited
        assert flags["train_mode"] == "full" and "rank" not in flags and "paper_full_finetune" not in raw
        assert raw["processes"]["value"] > 1
        assert any(tag in raw["processes"]["source"] for tag in ("paper 00", "authors'"))
    else:
        assert "rank" in flags and flags.get("train_mode", "lora") == "lora" and presets.preset_processes(raw) == 1


def test_transcribed_paper_values():
    """The numbers the papers print (a typo here would silently change an experiment)."""
    sd15 = {m: presets.load_preset("sd15", m) for m in minipref.OBJECTIVES}
    for method in ("sft", "csft", "bce", "dpo", "kto", "spin", "contrast", "dspo"):  # paper 000 Sec. 4.2 recipe
        f = sd15[method]
        assert (f["rank"], f["learning_rate"], f["lr_warmup_steps"], f["max_train_steps"]) == (8, 1e-4, 500, 10000)
        assert (f["adam_beta1"], f["adam_beta2"], f["adam_weight_decay"]) == (0.9, 0.999, 0.01)
        assert 4 <= f["train_batch_size"] <= 8
    assert (sd15["kto"]["beta"], sd15["kto"]["desirable_ratio"], sd15["kto"]["utility"]) == (10000.0, 0.8, "kahneman_tversky")
    assert (sd15["contrast"]["beta"], sd15["contrast"]["tau"]) == (2000.0, 0.01)
    assert (sd15["dspo"]["beta"], sd15["dspo"]["dspo_variant"], sd15["dspo"]["dspo_gamma"]) == (0.001, "dspo", 1.0)
    assert (sd15["bce"]["beta"], sd15["dpo"]["beta"]) == (1.0, 5000.0)
    assert (sd15["spo"]["rank"], sd15["spo"]["learning_rate"], sd15["spo"]["beta"]) == (4, 6e-5, 10.0)
    sdxl = {m: presets.load_preset("sdxl", m) for m in minipref.OBJECTIVES}
    assert (sdxl["contrast"]["beta"], sdxl["contrast"]["tau"]) == (5000.0, 0.5)
    assert (sdxl["dspo"]["beta"], sdxl["dspo"]["dspo_variant"]) == (5000.0, "dspo_sdxl")  # huaishengzhu/DSPO launchers/sdxl.sh
    assert (sdxl["spo"]["rank"], sdxl["spo"]["learning_rate"], sdxl["spo"]["gradient_accumulation_steps"]) == (64, 1e-5, 2)
    spo_settings = presets.preset_details("sdxl-spo")["method_settings"]
    assert (spo_settings["threshold"]["value"], spo_settings["clip"]["value"]) == (0.4, 0.1)
    assert presets.preset_details("sd15-spo")["method_settings"]["threshold"]["value"] == 0.3


def test_transcribed_full_finetuning_values():
    """The full fine-tuning recipes as printed (Diffusion-DPO launchers; papers 001, 002, 004): a typo here would
    silently change an experiment."""
    def row(name):
        f, details = presets.load_preset(name), presets.preset_details(name)
        return (presets.preset_processes(details), f["train_batch_size"], f.get("gradient_accumulation_steps", 1),
                f["learning_rate"], f.get("scale_lr", False), f["lr_scheduler"], f["lr_warmup_steps"],
                f["max_train_steps"], f.get("optimizer"), f["beta"])

    assert row("sd15-dpo-full") == (16, 1, 128, 1e-8, True, "constant_with_warmup", 500, 2000, "adamw", 5000.0)
    assert row("sdxl-dpo-full") == (16, 1, 128, 1e-8, True, "constant_with_warmup", 200, 2000, "adafactor", 5000.0)
    assert presets.load_preset("sdxl-dpo-full")["gradient_checkpointing"] is True
    assert row("sd15-kto-full") == (16, 2, 1, 1e-7, False, "constant_with_warmup", 1000, 10000, "adamw", 10000.0)
    assert presets.load_preset("sd15-kto-full")["desirable_ratio"] == 0.8  # paper 001's beta 5000 = 10000 here
    assert row("sd15-dspo-full") == (4, 4, 128, 2.048e-8, False, "inverse_sqrt", 2000, 2000, "adamw", 0.001)
    for family, beta, batch, accumulation, optimizer in (("sd15", 2000.0, 16, 4, "adamw"),
                                                         ("sdxl", 5000.0, 8, 8, "adafactor")):
        processes, b, a, lr, scale, *_, opt, beta_ = row(f"{family}-contrast-full")
        assert (processes, b, a, scale, opt, beta_) == (8, batch, accumulation, False, optimizer, beta)
        assert lr == pytest.approx(2000 / beta * 2.048e-8, rel=1e-12)  # paper 002 App. D: (2000 / beta) 2.048e-8
    for name in FULL:  # 2048 pairs for Diffusion-DPO and DSPO, 512 for Diff-contrast, 32 images for KTO
        processes, b, a, *_ = row(name)
        assert processes * b * a == {"dpo": 2048, "dspo": 2048, "contrast": 512, "kto": 32}[name.split("-")[1]]


def _loss_with_preset(method: str, flags: dict, settings: dict):
    """Call the method's minipref loss with the preset's method hyperparameters on random tensors."""
    g = torch.Generator().manual_seed(0)
    err = lambda: torch.rand(4, generator=g)  # noqa: E731
    desirable = torch.tensor([True, False, True, False])
    kw = {"beta": flags["beta"]} if "beta" in flags else {}
    if method in ("sft", "csft"):
        return minipref.sft_loss(err())
    if method == "bce":
        return minipref.bce_loss(err(), desirable, **kw)
    if method == "dpo":
        return minipref.dpo_loss(err(), err(), err(), err(), **kw)
    if method == "spin":
        return minipref.spin_loss(err(), err(), err(), err(), **kw)
    if method == "kto":
        return minipref.kto_loss(err(), err(), desirable, utility=flags["utility"], **kw)
    if method == "contrast":
        emb = lambda: torch.randn(4, 8, generator=g)  # noqa: E731
        return minipref.contrast_loss(err(), err(), err(), err(), emb(), emb(), tau=flags["tau"], **kw)
    if method == "dspo":
        pred = lambda: torch.randn(4, 3, 2, 2, generator=g)  # noqa: E731
        return minipref.dspo_loss(pred(), pred(), pred(), err(), err(), variant=flags["dspo_variant"],
                                  gamma=flags["dspo_gamma"], **kw)
    if method == "spo":
        return minipref.spo_loss(err(), err(), err(), err(), clip=settings["clip"]["value"], **kw)
    raise AssertionError(f"no check for {method}")


@pytest.mark.parametrize("name", ALL)
def test_preset_values_are_accepted_by_the_core(name):
    details = presets.preset_details(name)
    flags = presets.load_preset(name)
    out = _loss_with_preset(details["method"], flags, details.get("method_settings", {}))
    assert torch.isfinite(out.loss)
    if "desirable_ratio" in flags:
        DesirableRatioSampler([True, False], flags["desirable_ratio"], num_samples=4, seed=0)


def test_load_preset_errors(tmp_path):
    with pytest.raises(ValueError, match="available presets: .*sd15-dpo"):
        presets.load_preset("sd21", "dpo")
    good = json.loads((presets.PRESET_DIR / "sd15-dpo.json").read_text())
    custom = tmp_path / "custom.json"
    custom.write_text(json.dumps(good))
    assert presets.load_preset(str(custom)) == presets.load_preset("sd15-dpo")
    good["flags"]["learning_rat"] = {"value": 1.0, "source": "typo"}
    custom.write_text(json.dumps(good))
    with pytest.raises(ValueError, match="'learning_rat' is not a trainer flag"):
        presets.load_preset(str(custom))
    del good["flags"]["learning_rat"]
    good["flags"]["train_batch_size"] = {"value": "8", "source": "x"}
    custom.write_text(json.dumps(good))
    with pytest.raises(ValueError, match="train_batch_size.*must be int"):
        presets.load_preset(str(custom))
    good["flags"]["train_batch_size"] = {"value": 8}
    custom.write_text(json.dumps(good))
    with pytest.raises(ValueError, match="source"):
        presets.load_preset(str(custom))
    good["flags"]["train_batch_size"] = {"value": 8, "source": "x"}
    good["flags"]["train_mode"] = {"value": "ful", "source": "typo"}  # argparse does not check a default's choice
    custom.write_text(json.dumps(good))
    with pytest.raises(ValueError, match="'train_mode' must be one of lora, full"):
        presets.load_preset(str(custom))
    good["flags"]["train_mode"] = {"value": "full", "source": "x"}
    good["processes"] = {"value": 0, "source": "x"}
    custom.write_text(json.dumps(good))
    with pytest.raises(ValueError, match="'processes' must be"):
        presets.load_preset(str(custom))


def test_preset_choices_are_the_trainers():
    from full import cli

    assert presets.CHOICES == {"train_mode": cli.TRAIN_MODES, "optimizer": cli.OPTIMIZERS}


def test_trainer_accepts_every_preset_key():
    """PRESET_KEYS are flag names of the offline trainer (the trainer applies a preset by flag name): every key is
    the destination of a flag of the real parser (method options included, which the parser builds from
    minipref.METHODS)."""
    from full.trainers.offline import build_parser

    destinations = {action.dest for action in build_parser()._actions}
    missing = [key for key in presets.PRESET_KEYS if key not in destinations]
    assert not missing, f"full.train has no flag for preset keys {missing}"


# ---------------------------------------------------------------------------- launch files


CONFIGS = [("1gpu", 1, "NO")] + [(f"{n}gpu_{engine}", n, kind) for n in (8, 16) for engine, kind in
                                  (("ddp", "MULTI_GPU"), ("zero2", "DEEPSPEED"), ("zero3", "DEEPSPEED"),
                                   ("fsdp", "FSDP"))]


def test_every_engine_has_a_config_for_8_and_16_gpus():
    assert sorted(p.stem for p in (LAUNCH / "accelerate").glob("*.yaml")) == sorted(name for name, *_ in CONFIGS)


@pytest.mark.parametrize("name,processes,kind", CONFIGS)
def test_accelerate_configs_load_with_accelerates_own_loader(name, processes, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(LAUNCH / "accelerate" / f"{name}.yaml"))  # rejects unknown keys
    assert config.num_processes == processes and config.distributed_type.value == kind
    assert config.mixed_precision == "bf16" and config.num_machines == max(1, processes // 8)
    if kind == "DEEPSPEED":
        stage = int(name[-1])
        assert config.deepspeed_config["zero_stage"] == stage
        # Left to the trainer on purpose: DeepSpeed's value would override the trainer's accumulation.
        assert "gradient_accumulation_steps" not in config.deepspeed_config
        # ZeRO-3: the whole UNet is loaded (then the reference copied) before prepare() partitions it, and the final
        # unet/ needs the gathered weights
        assert stage == 2 or (config.deepspeed_config["zero3_init_flag"] is False
                              and config.deepspeed_config["zero3_save_16bit_model"] is True)
    if kind == "FSDP":
        fsdp = config.fsdp_config
        assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD" and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        assert fsdp["fsdp_sync_module_states"] is False and fsdp["fsdp_use_orig_params"] is True


def run_launch(*args, **env):
    environment = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, **env}
    if "DATASET" not in env:
        environment.pop("DATASET", None)
    return subprocess.run(["bash", str(LAUNCH / "train.sh"), *args], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=120)


def test_launch_script_builds_the_accelerate_command():
    result = run_launch("dpo", "sdxl", "8gpu_zero2", "--seed", "3")
    assert result.returncode == 0, result.stderr
    command = result.stdout
    assert f"--config_file {LAUNCH}/accelerate/8gpu_zero2.yaml --mixed_precision bf16 --gradient_accumulation_steps 1 -m full.train" in command
    assert "--method dpo --preset sdxl-dpo" in command and "--dataset_name yuvalkirstain/pickapic_v2" in command
    assert command.rstrip().endswith("--seed 3")  # extra flags last, so they win over the preset
    assert "2 per device x 8 accumulation = 16 examples" in result.stderr and "x 2 x 1 = 16" in result.stderr

    result = run_launch("kto", "sd15", "8gpu_ddp", DATASET="feedback.parquet")
    assert result.returncode == 0 and "--dataset_name feedback.parquet" in result.stdout
    assert "effective batch differs" in result.stderr  # 8 GPUs x 8 images, accumulation already 1
    result = run_launch("rlhf", "sd15", "1gpu")
    assert result.returncode == 2 and "valid methods: sft, csft" in result.stderr


def test_launch_script_maps_a_full_preset_onto_the_chosen_gpus():
    result = run_launch("dpo", "sd15", "8gpu_ddp", "--train_mode", "full")
    assert result.returncode == 0, result.stderr
    assert "--preset sd15-dpo-full" in result.stdout and "--gradient_accumulation_steps 256" in result.stdout
    assert "(for 16 GPU(s)): 1 per device x 128 accumulation = 2048" in result.stderr
    assert "8 process(es) x 1 x 256 = 2048" in result.stderr and "differs" not in result.stderr
    result = run_launch("dspo", "sd15", "16gpu_fsdp", "--train_mode=full", MAIN_PROCESS_IP="10.0.0.1", MACHINE_RANK="1")
    assert result.returncode == 0, result.stderr
    assert "--machine_rank 1 --main_process_ip 10.0.0.1 --main_process_port 29500 -m full.train" in result.stdout
    assert "--preset sd15-dspo-full" in result.stdout and "--gradient_accumulation_steps 32" in result.stdout
    # under DeepSpeed accelerate's accumulation wins over the trainer's: a value among the extra flags goes to both
    result = run_launch("dpo", "sd15", "8gpu_zero3", "--train_mode", "full", "--gradient_accumulation_steps=4")
    assert "--mixed_precision bf16 --gradient_accumulation_steps 4 -m full.train" in result.stdout
    assert "--gradient_accumulation_steps 4 changes the preset's effective batch" in result.stderr
    result = run_launch("dpo", "sdxl", "16gpu_zero3", "--train_mode", "full")  # two machines need their addresses
    assert result.returncode == 2 and "set MAIN_PROCESS_IP" in result.stderr
    result = run_launch("bce", "sd15", "8gpu_zero3", "--train_mode", "full")
    assert result.returncode == 2 and "the --train_mode full presets: sd15-contrast-full" in result.stderr


@pytest.mark.parametrize("method", ["spin", "spo"])
def test_launch_script_sends_online_methods_to_their_own_entry_points(method):
    result = run_launch(method, "sd15", "1gpu")
    assert result.returncode == 0, result.stderr
    assert f"-m full.{method} --preset sd15-{method}" in result.stdout and "--method" not in result.stdout
    assert ("--dataset_name" in result.stdout) == (method == "spin")  # SPO samples its own data
