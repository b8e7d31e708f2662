"""The image-classification half: data, preprocessing, model, checkpoints, training and evaluation."""
