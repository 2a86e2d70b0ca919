"""``python -m lora_diffusion.chat``: chat with a base LLM and its adapters (code in :mod:`lora_diffusion.llm.chat`)."""

from .llm.chat import main

if __name__ == "__main__":
    main()
