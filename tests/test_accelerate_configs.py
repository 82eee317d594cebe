"""The example Accelerate configs parse with accelerate's own loader and go through its launch-time validation."""

import os
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils import launch as launch_utils


CONFIG_DIR = Path(__file__).resolve().parents[1] / "examples" / "accelerate"

EXPECTED = {
    "single_gpu.yaml": {"distributed_type": DistributedType.NO, "num_processes": 1, "num_machines": 1},
    "multi_gpu.yaml": {"distributed_type": DistributedType.MULTI_GPU, "num_processes": 8, "num_machines": 1},
    "deepspeed_zero2.yaml": {"distributed_type": DistributedType.DEEPSPEED, "num_processes": 8, "num_machines": 1},
    "deepspeed_zero3.yaml": {"distributed_type": DistributedType.DEEPSPEED, "num_processes": 8, "num_machines": 1},
    "fsdp2.yaml": {"distributed_type": DistributedType.FSDP, "num_processes": 8, "num_machines": 1},
    "multi_node.yaml": {"distributed_type": DistributedType.DEEPSPEED, "num_processes": 16, "num_machines": 2},
}
EXPECTED_DEEPSPEED = {
    "deepspeed_zero2.yaml": {"zero_stage": 2, "zero3_init_flag": False, "offload_optimizer_device": "none"},
    "deepspeed_zero3.yaml": {"zero_stage": 3, "zero3_init_flag": True, "zero3_save_16bit_model": True},
    "multi_node.yaml": {"zero_stage": 3, "zero3_init_flag": True, "deepspeed_multinode_launcher": "standard"},
}
EXPECTED_FSDP = {
    "fsdp2.yaml": {
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_reshard_after_forward": True,
    }
}


def _launch_args(name):
    # What `accelerate launch --config_file ... -m trl_hpt.cli train` sees, before any process is started.
    args = launch_command_parser().parse_args(["--config_file", str(CONFIG_DIR / name), "-m", "trl_hpt.cli", "train"])
    return _validate_launch_command(args)


def test_every_config_is_covered():
    assert sorted(path.name for path in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_with_accelerate_loader(name):
    config = load_config_from_file(str(CONFIG_DIR / name))
    assert isinstance(config, ClusterConfig)
    assert config == ClusterConfig.from_yaml_file(str(CONFIG_DIR / name))
    for field, value in EXPECTED[name].items():
        assert getattr(config, field) == value, field
    assert config.mixed_precision == "bf16"
    for key, value in EXPECTED_DEEPSPEED.get(name, {}).items():
        assert config.deepspeed_config[key] == value, key
    for key, value in EXPECTED_FSDP.get(name, {}).items():
        assert config.fsdp_config[key] == value, key
    assert bool(config.deepspeed_config) == (name in EXPECTED_DEEPSPEED)
    assert bool(config.fsdp_config) == (name in EXPECTED_FSDP)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_nested_keys_are_launch_arguments(name):
    # `accelerate launch` copies nested keys onto its arguments with setattr, so a misspelt key would be ignored
    # silently; every key must be one of the launcher's own options.
    config = load_config_from_file(str(CONFIG_DIR / name))
    options = set(vars(launch_command_parser().parse_args(["script.py"])))
    for key in [*config.deepspeed_config, *config.fsdp_config]:
        assert key in options, f"{name}: `{key}` is not an `accelerate launch` option"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_validation_and_plugins(name):
    args, defaults, mixed_precision_from_config = _launch_args(name)
    assert args.num_processes == EXPECTED[name]["num_processes"]
    assert args.use_deepspeed == (name in EXPECTED_DEEPSPEED)
    assert args.use_fsdp == (name in EXPECTED_FSDP)
    assert args.multi_gpu == (name == "multi_gpu.yaml")

    # Another test on this machine may hold the default port; the launcher would only warn or pick another one.
    with mock.patch.object(launch_utils, "is_port_in_use", return_value=False):
        if args.use_deepspeed:
            fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
            args.deepspeed_fields_from_accelerate_config = ",".join(fields)
            _, env = launch_utils.prepare_deepspeed_cmd_env(args)
            with mock.patch.dict(os.environ, env):
                plugin = DeepSpeedPlugin()
            assert plugin.zero_stage == EXPECTED_DEEPSPEED[name]["zero_stage"]
            if EXPECTED[name]["num_machines"] > 1:
                assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 0)
        elif args.use_fsdp:
            env = launch_utils.prepare_multi_gpu_env(args)
            with mock.patch.dict(os.environ, env):
                plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == 2
            assert plugin.state_dict_type.name == "FULL_STATE_DICT"
            assert plugin.reshard_after_forward is True
        elif args.multi_gpu:
            launch_utils.prepare_multi_gpu_env(args)
            assert args.nproc_per_node == "8"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_header_gives_launch_command(name):
    text = (CONFIG_DIR / name).read_text()
    header = text.split("compute_environment:")[0]
    assert f"accelerate launch --config_file examples/accelerate/{name}" in header
    assert "-m trl_hpt.cli train --config examples/recipes/" in header


def test_multi_node_fields_to_edit_are_commented():
    lines = (CONFIG_DIR / "multi_node.yaml").read_text().splitlines()
    for field in ("machine_rank:", "main_process_ip:", "main_process_port:"):
        (line,) = [line for line in lines if line.startswith(field)]
        assert "# EDIT" in line, field
