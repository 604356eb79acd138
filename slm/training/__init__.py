"""The one training engine (DeepSpeed) used by `slm reference` and `slm pretrain`."""
