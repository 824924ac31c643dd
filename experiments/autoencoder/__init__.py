"""The deep fully connected autoencoder at several depths without and with LBE: see README.md."""
