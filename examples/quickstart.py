"""HPT in a few lines: Qwen2.5-Math-1.5B on the LUFFY set (see examples/recipes/ for the paper's full settings)."""

from trl_hpt import HPTConfig, HPTTrainer
from trl_hpt.adapters import load_hpt_dataset
from trl_hpt.rewards import REWARD_FUNCS


dataset = load_hpt_dataset("Elliott/Openr1-Math-46k-8192", adapter="luffy")  # prompt, completion (demo), solution
args = HPTConfig(
    output_dir="Qwen2.5-Math-1.5B-HPT", loss_type="dr_grpo", scale_rewards="none", demonstration_loss_coef=0.3
)
trainer = HPTTrainer(
    model="Qwen/Qwen2.5-Math-1.5B", reward_funcs=REWARD_FUNCS["math_verify"], args=args, train_dataset=dataset
)
trainer.train()
trainer.push_to_hub()
