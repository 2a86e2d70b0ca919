"""``python -m lora_diffusion.generate_lora``: a LoRA from a task description with a trained Text-to-LoRA
hypernetwork (code in :mod:`lora_diffusion.hyper.generate_cli`)."""

from .hyper.generate_cli import main

if __name__ == "__main__":
    main()
