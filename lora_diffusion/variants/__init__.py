"""Every registered variant, one import line each (importing registers it)."""

from . import adalora, ardlora, deltalora, dora, dylora, loha, lokr, lora, loradrop, lorafa, singlora, tlora, vera  # noqa: F401
