"""A small `ViTForImageClassification` from a config without and with LBE: see README.md."""
