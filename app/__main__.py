"""``python -m app``: start the Gradio app (the embedded demo model unless a model is named in the UI)."""

from __future__ import annotations

import argparse
import logging


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve on the network")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--share", action="store_true", help="a public gradio.live link")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from .services import GenerateService
    from .ui import build_app

    build_app(GenerateService(a.device)).queue().launch(server_name=a.host, server_port=a.port, share=a.share)


if __name__ == "__main__":
    main()
