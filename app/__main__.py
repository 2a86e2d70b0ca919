"""``python -m app`` (or ``lora-diffusion-app``): the Gradio app on the embedded demo model unless models are named.

    python -m app --host 0.0.0.0 --port 7860 --auth alice:secret --model demo --model sd15=/models/sd15 \\
        --model flux=black-forest-labs/FLUX.1-dev --library ~/loras --output outputs/app --device cuda

``--model`` may be repeated: the base-model fields offer exactly these (never a path typed in the page).
"""

from __future__ import annotations

import argparse
import logging
import os

from .services import AppError, Settings, parse_models, read_users


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="0.0.0.0 to serve on the network")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--share", action="store_true", help="a public gradio.live link (needs a network)")
    p.add_argument("--auth", action="append", default=[], metavar="USER:PASS", help="a login (repeat for several)")
    p.add_argument("--auth-file", default=None, help="a file of user:password lines")
    p.add_argument("--model", action="append", default=[], metavar="NAME=SOURCE",
                   help="a base model users may pick: 'demo' (the embedded model, the default), or name=hub id, "
                        "diffusers folder or .safetensors file")
    p.add_argument("--library", default="outputs/app/library", help="the adapter library folder")
    p.add_argument("--output", default="outputs/app", help="where training jobs are kept")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--allow-server-paths", action="store_true", help="let users import adapters by a server path")
    p.add_argument("--max-concurrent", type=int, default=1, help="generations at once (default 1: one GPU job)")
    p.add_argument("--max-upload-mb", type=float, default=512.0)
    p.add_argument("--stop-grace", type=float, default=60.0, metavar="SECONDS",
                   help="Stop: how long a trainer may take to finish its step and save a checkpoint before it is killed")
    p.add_argument("--hypernetworks", default=None, metavar="DIR",
                   help="trained Text-to-LoRA / Doc-to-LoRA hypernetworks (default: OUTPUT/hypernetworks)")
    return p.parse_args(argv)


def settings_from(a: argparse.Namespace) -> Settings:
    return Settings(library=a.library, output=a.output, device=a.device, models=parse_models(a.model),
                    allow_server_paths=a.allow_server_paths, max_concurrent_generations=a.max_concurrent,
                    max_upload_mb=a.max_upload_mb, stop_grace_s=a.stop_grace, hyper_dir=a.hypernetworks)


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        users = read_users(a.auth, a.auth_file)
        settings = settings_from(a)
    except AppError as e:
        raise SystemExit(f"error: {e}") from None
    from .services import AppServices
    from .ui import build_app

    demo = build_app(AppServices(settings))
    launch(demo, settings, a.host, a.port, a.share, users)


def launch(demo, settings: Settings, host: str, port: int, share: bool = False, users=None, **kw):  # noqa: ANN001, ANN201
    """Queue (one generation at a time unless configured) and serve; only Gradio's own cache is served."""
    demo.queue(default_concurrency_limit=settings.max_concurrent_generations, max_size=64)
    return demo.launch(server_name=host, server_port=port, share=share, auth=users or None,
                       max_file_size=f"{int(settings.max_upload_mb)}mb", allowed_paths=[], show_error=True, **kw)


if __name__ == "__main__":
    main()
