"""What the paper's other families share (experiments/resnet, experiments/autoencoder, experiments/vit): the images
(`data`), one training run with its record (`runs`), and the summary over seeds and the result file (`report`)."""
