"""Transformers' `ResNetForImageClassification` without and with LBE on its residual blocks: see README.md."""
