"""``python -m lora_diffusion.internalize``: a text file -> a LoRA with a trained Doc-to-LoRA hypernetwork
(code in :mod:`lora_diffusion.hyper.internalize_cli`)."""

from .hyper.internalize_cli import main

if __name__ == "__main__":
    main()
