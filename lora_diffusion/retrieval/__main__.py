"""List a LoRA library and search it by prompt::

    python -m lora_diffusion.retrieval --library loras/                        # the listing: base, status, description
    python -m lora_diffusion.retrieval --library loras/ --prompt "a dotted heart" -k 3 --family sd1
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..core.errors import AdapterError
from .library import FAMILIES, LoraLibrary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lora_diffusion.retrieval", description=__doc__.split("::")[0])
    p.add_argument("--library", required=True, help="folder of LoRA files (sub-folders too)")
    p.add_argument("--prompt", action="append", default=[], help="prompt to search for (repeat for several)")
    p.add_argument("-k", "--top-k", type=int, default=3, help="how many LoRAs to retrieve (default 3)")
    p.add_argument("--threshold", type=float, default=None, help="drop matches scoring below this cosine")
    p.add_argument("--family", choices=sorted(FAMILIES), default=None,
                   help="base family of the model: files for another family are never retrieved")
    p.add_argument("--weights", default=None, help="weight-based retriever file (python -m training.train_retriever)")
    p.add_argument("--weight-mix", type=float, default=0.5, help="share of the weight score in the ranking (0..1)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    a = parse_args(argv)
    try:
        lib = LoraLibrary(a.library)
        if not a.prompt:
            print(lib.listing(a.family))
            return 0
        weights = None
        if a.weights:
            from .weights import WeightRetriever

            weights = WeightRetriever.load(a.weights)
        for prompt in a.prompt:
            r = lib.retrieve(prompt, k=a.top_k, threshold=a.threshold, family=a.family, weights=weights,
                             weight_mix=a.weight_mix)
            print(f"{prompt}\n  {r.message}")
            for m in [*r.matches, *r.below_threshold]:
                parts = f"text {m.text_score:.3f} on {m.phrase!r}"
                if m.weight_score is not None:
                    parts += f", weights {m.weight_score:.3f}"
                mark = "" if m in r.matches else "  (under threshold)"
                print(f"  {m.score:.3f}  {m.entry.file}  [{parts}]{mark}")
    except AdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
