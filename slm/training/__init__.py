"""The one training engine (DeepSpeed) used by `slm reference`, `slm finetune` and `slm pretrain`."""
