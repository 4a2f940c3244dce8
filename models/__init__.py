"""The DeepLab family: architectures, the safetensors checkpoint and its metadata, training, evaluation."""
