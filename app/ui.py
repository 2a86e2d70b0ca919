"""The Gradio front end: a Generate tab over ``app.services`` (the embedded demo model unless another is named)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from .services import DEMO_EXAMPLES, AppError, GenerateRequest, GenerateService, parse_adapters


def make_generate_fn(service: GenerateService) -> Any:
    """The click handler: UI values -> images, with a progress bar; bad input -> one gr.Error naming the field."""

    def run(prompt: str, negative: str, steps: float, guidance: float, seed: float, n: float, model: str,
            files: list[str] | None, scales: str,
            progress: gr.Progress = gr.Progress()) -> list[Any]:  # noqa: B008 - how Gradio asks for a progress bar
        try:
            adapters, scale_values = parse_adapters(files, scales)
            req = GenerateRequest(prompt, negative, int(steps), float(guidance), int(seed), int(n),
                                  model.strip() or None, adapters, scale_values)
            images = service.generate(req, progress=lambda f, desc: progress(f, desc=desc))
            return [_for_display(im) for im in images]
        except AppError as e:
            raise gr.Error(str(e)) from None

    return run


def _for_display(image: Any, min_side: int = 256) -> Any:
    """Small images (the demo model draws 32x32) enlarged with hard pixel edges, so the gallery shows them."""
    factor = -(-min_side // max(1, min(image.size)))
    return image if factor <= 1 else image.resize((image.width * factor, image.height * factor), 0)  # 0: NEAREST


def build_app(service: GenerateService | None = None) -> gr.Blocks:
    service = service or GenerateService()
    with gr.Blocks(title="lora-diffusion") as demo:
        gr.Markdown("# lora-diffusion\nGenerate with a base model and your adapters (LoRA, T-LoRA, LoHa, LoKr, DoRA, "
                    "VeRA; kohya/A1111, LyCORIS, diffusers and PEFT files). Without a model path it uses the "
                    "embedded demo model, a small shapes world that runs on a CPU in seconds.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", value=DEMO_EXAMPLES[0], lines=2)
                    negative = gr.Textbox(label="Negative prompt", value="")
                    gr.Examples([[p] for p in DEMO_EXAMPLES], inputs=[prompt], label="Prompts the demo model knows")
                    with gr.Row():
                        steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                        guidance = gr.Slider(0, 15, value=4.0, step=0.5, label="Guidance")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="Seed")
                        n = gr.Slider(1, 16, value=4, step=1, label="Images")
                    with gr.Accordion("Model and adapters", open=False):
                        model = gr.Textbox(label="Base model (hub id, diffusers folder or .safetensors)",
                                           placeholder="empty: the embedded demo model", value="")
                        files = gr.File(label="Adapter files (.safetensors)", file_count="multiple",
                                        file_types=[".safetensors"], type="filepath")
                        scales = gr.Textbox(label="Scales, comma-separated (empty: 1.0 each)", value="")
                    button = gr.Button("Generate", variant="primary")
                gallery = gr.Gallery(label="Images", columns=4, height="auto")
        button.click(make_generate_fn(service), [prompt, negative, steps, guidance, seed, n, model, files, scales],
                     gallery, api_name="generate")
    return demo
