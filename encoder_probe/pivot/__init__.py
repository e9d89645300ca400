"""The PIVOT trainer on TRL + accelerate: SFT and DPO from real MLLM checkpoints, the LLaVA recipe, transplant."""
