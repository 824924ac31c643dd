"""Configuration of the deep fully connected autoencoder of Peer et al. (TMLR 2022), the paper's autoencoder family.

This file is copied next to the weights by `save_pretrained` (`register_for_auto_class`) and loaded with
`trust_remote_code=True` on machines without `hf_batch_entropy`, so it may import only `transformers`.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

__all__ = ["DenseAutoencoderConfig"]


class DenseAutoencoderConfig(PreTrainedConfig):
    r"""
    Configuration of [`DenseAutoencoderModel`]: a vanilla fully connected autoencoder on flattened images,

        h_0 = flatten(pixel_values)                       (B, D),  D = num_channels·image_size²
        e_l = act(W_l e_{l-1} + b_l),     l = 1…depth      (B, width)     encoder, e_0 = h_0
        z   = W_z e_depth + b_z                            (B, code_size) the code (linear)
        d_l = act(V_l d_{l-1} + c_l),     l = 1…depth      (B, width)     decoder, d_0 = z
        x̂   = sigmoid(V_out d_depth + c_out)               (B, D)         reconstruction in (0, 1)

    with no skip connection, normalization or dropout and PyTorch's default initialization, as in the paper's
    reference autoencoder (width 256, code 10, depth 1 to 50 per half). The loss is the mean squared error between
    `x̂` and the input (pixels in [0, 1]): non-negative, so LBE's multiplicative term `β·mean_l(lbe_l)·L` only ever
    adds to it.

    Args:
        depth (`int`, defaults to 10): hidden layers in each half (encoder and decoder); 2·depth + 2 linear layers.
        width (`int`, defaults to 256): units per hidden layer.
        code_size (`int`, defaults to 10): size of the code `z`.
        activation (`str`, defaults to `"relu"`): a key of `transformers.activations.ACT2FN`.
        num_channels (`int`, defaults to 1): channels of the input images.
        image_size (`int`, defaults to 28): side of the (square) input images; 28 for MNIST, 8 for scikit-learn digits.
    """

    model_type = "dense_autoencoder"

    depth: int = 10
    width: int = 256
    code_size: int = 10
    activation: str = "relu"
    num_channels: int = 1
    image_size: int = 28

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        from transformers.activations import ACT2FN

        for name in ("depth", "width", "code_size", "num_channels", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DenseAutoencoderConfig: {name} must be an integer >= 1, got {value!r}.")
        if self.activation not in ACT2FN:
            raise ValueError(
                f"DenseAutoencoderConfig: unknown activation {self.activation!r}; "
                f"choose one of transformers.activations.ACT2FN: {sorted(ACT2FN)}."
            )

    @property
    def input_dim(self) -> int:
        """Size of a flattened input image, num_channels·image_size²."""
        return self.num_channels * self.image_size * self.image_size
