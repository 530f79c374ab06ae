"""The model: stage 1's heatmap codec, stage 2's polar codec, the networks, int8, the training recipes and the model file."""
