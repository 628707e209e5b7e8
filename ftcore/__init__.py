"""ftcore: honest LoRA fine-tuning benchmarks, PyTorch vs MLX on identical inputs."""

__version__ = "0.1.0"
