"""Script form of `trl-hpt train`, for launchers that want a file rather than a module.

    python examples/train_hpt.py --config examples/recipes/hpt_qwen2.5_math_7b.yaml
    accelerate launch --config_file examples/accelerate/multi_gpu.yaml examples/train_hpt.py \
        --config examples/recipes/hpt_qwen2.5_math_7b.yaml

Every flag of `trl-hpt train` works here; to customise the run, copy `trl_hpt.cli.train` (load the dataset, build
`HPTTrainer`, train, save) into this file and edit it.
"""

from trl_hpt.cli import make_parser, train


if __name__ == "__main__":
    script_args, training_args, model_args = make_parser("train", prog="train_hpt.py").parse_args_and_config()
    train(script_args, training_args, model_args)
