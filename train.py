"""Train a medical CLIP model: ``python train.py fit --config configs/demo_cpu.yaml``."""

from medclip_train.cli import cli_main

if __name__ == "__main__":
    cli_main()
