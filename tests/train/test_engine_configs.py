"""Every shipped accelerate config parses with the installed accelerate, and under DeepSpeed the values that
must follow sftlab's config reach the trainer as "auto": --gradient_accumulation_steps 4 or another
max_grad_norm never meets transformers' "DeepSpeed config values that mismatch TrainingArguments"."""

import os
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_deepspeed_cmd_env

from helpers import REPO

CONFIGS = sorted((REPO / "configs/accelerate").glob("*.yaml"))


def test_the_four_engines_are_shipped_and_each_says_when_to_use_it():
    assert [c.name for c in CONFIGS] == ["ddp.yaml", "fsdp2.yaml", "zero2.yaml", "zero3.yaml"]
    for config in CONFIGS:
        assert config.read_text().startswith("# ") and "Use it " in config.read_text()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_each_config_parses_with_the_installed_accelerate(config):
    parsed = load_config_from_file(str(config))
    assert parsed.num_machines == 1 and parsed.machine_rank == 0 and not parsed.use_cpu
    expected = {"ddp.yaml": "MULTI_GPU", "fsdp2.yaml": "FSDP", "zero2.yaml": "DEEPSPEED", "zero3.yaml": "DEEPSPEED"}
    assert parsed.distributed_type.value == expected[config.name]
    if config.name == "fsdp2.yaml":
        assert parsed.fsdp_config["fsdp_version"] == 2 and parsed.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if config.name == "zero3.yaml":
        assert parsed.deepspeed_config["zero3_save_16bit_model"] is True  # the final save gathers whole weights


def deepspeed_plugin_config(config: Path, monkeypatch) -> dict:
    """The DeepSpeed config a process started by `accelerate launch --config_file CONFIG` builds."""
    from accelerate.utils import DeepSpeedPlugin

    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", "2", "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    return DeepSpeedPlugin().deepspeed_config


@pytest.mark.parametrize("name", ["zero2.yaml", "zero3.yaml"])
def test_deepspeed_values_that_follow_sftlabs_config_are_auto(name, monkeypatch):
    from transformers import TrainingArguments
    from transformers.integrations import deepspeed as hf_deepspeed

    # sftlab's config asks for accumulation 4 and clipping 0.3 (made before the launcher's environment is set)
    args = TrainingArguments(output_dir=os.devnull, gradient_accumulation_steps=4, max_grad_norm=0.3,
                             per_device_train_batch_size=3, use_cpu=True)
    ds_config = deepspeed_plugin_config(REPO / "configs/accelerate" / name, monkeypatch)
    for key in ("gradient_accumulation_steps", "gradient_clipping", "train_micro_batch_size_per_gpu",
                "train_batch_size"):
        assert ds_config[key] == "auto", key
    # transformers' own check of the DeepSpeed config against the training arguments. deepspeed is not installed
    # here, and transformers' config class only inherits accelerate's when it is: the same methods are put on
    # accelerate's class instead
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    methods = {k: v for k, v in vars(hf_deepspeed.HfTrainerDeepSpeedConfig).items() if k != "__init__"}
    hf_config = type("TrainerDeepSpeedConfig", (HfDeepSpeedConfig,), methods)(ds_config)
    hf_config._dtype, hf_config.mismatches = None, []
    hf_config.trainer_config_process(args)
    assert hf_config.mismatches == []
    assert hf_config.config["gradient_accumulation_steps"] == 4 and hf_config.config["gradient_clipping"] == 0.3
